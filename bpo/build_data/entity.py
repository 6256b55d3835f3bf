"""Stage 1, entity recognition on the last user turn: which entity a picture could show, and its type.

    recognizer = build_recognizer(cfg.build, client)
    entity, entity_type, attempts = recognizer.recognize(request, source)   # raises Drop

Backends (build.entity.backend):
- `llm`: the versioned prompt (prompts/entity_v1.txt, written for bpo: the published MMSafe-PO pipeline's prompts
  are not available) asks build.llm for `{"entity": ..., "type": ...}`. An answer is used when it holds a JSON
  object whose `entity` occurs in the request (mention rule of bpo.build_data.replace; kept as the request writes
  it) and whose `type` is one of the types with a phrase (build.replace.phrases; the labels below are read as
  their type). `{"entity": null}` is an answer too: the record is dropped as `no_entity`. Anything else is re-asked
  (bpo.build_data.llm) and, after build.llm.max_attempts answers, the record is dropped with the last problem.
- `spacy`: an installed spaCy pipeline (build.entity.spacy_model; never downloaded, and spaCy is imported only for
  this backend): the first entity in text order whose label is one of the types.
- `given`: the input record's own `entity` and `entity_type` fields, checked like an LLM answer.
"""

import hashlib
import os

from bpo.build_data.llm import Problem, Refused, ask_until_valid, fill, find_json_object
from bpo.build_data.replace import first_mention
from bpo.build_data.report import Drop
from bpo.config import ConfigError

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
ENTITY_PROMPT = os.path.join(PROMPT_DIR, "entity_v1.txt")
ENTITY_PROMPT_VERSION = "entity-v1"  # bump with any change to the prompt file or to the re-ask wording
MAX_ENTITY_WORDS = 8  # a longer "entity" is a phrase, not a name

# Labels endpoints and NER models give (spaCy's OntoNotes labels among them) -> the builder's types.
TYPE_SYNONYMS = {
    "per": "person", "person": "person", "human": "person", "people": "group",
    "org": "organization", "organisation": "organization", "company": "organization",
    "gpe": "place", "loc": "place", "location": "place", "fac": "place", "facility": "place", "city": "place",
    "country": "place", "building": "place", "landmark": "place",
    "norp": "group", "product": "object", "thing": "object", "work_of_art": "work", "artwork": "work",
}


def load_prompt(path, placeholders):
    try:
        with open(path, encoding="utf-8") as f:
            template = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read prompt file {path}: {e.strerror}") from None
    missing = [p for p in placeholders if "{" + p + "}" not in template]
    if missing:
        raise ConfigError(f"prompt file {path} lacks the placeholder(s) {', '.join('{' + p + '}' for p in missing)}")
    return template


def prompt_version(path, default_path, version):
    """What the settings record of a prompt: its version name, or for a user's file its content hash."""
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()[:16]
    return {"version": version if os.path.abspath(path) == default_path else "custom", "sha256": sha}


def entity_types(phrases):
    return [kind for kind, phrase in phrases.items() if phrase]


def canonical_type(label, types):
    """An answer's or a model's type label -> one of `types`, or None."""
    if not isinstance(label, str):
        return None
    key = label.strip().lower().replace(" ", "_").replace("-", "_")
    kind = TYPE_SYNONYMS.get(key, key)
    return kind if kind in types else None


def check_entity(name, label, request, types):
    """(entity as the request writes it, type), or a Problem."""
    if not isinstance(name, str):
        return Problem("bad_field", '"entity" must be a string or null')
    name = name.strip()
    if len(name.split()) > MAX_ENTITY_WORDS:
        return Problem("bad_field", f'"entity" has more than {MAX_ENTITY_WORDS} words; give only the name')
    written = first_mention(request, name)
    if written is None:
        return Problem("not_in_request", f'"{name[:80]}" does not occur in the request; copy the name exactly as '
                                         f'the request writes it')
    kind = canonical_type(label, types)
    if kind is None:
        return Problem("bad_type", f'"type" must be one of: {", ".join(types)} (got {str(label)[:40]!r})')
    return written, kind


def parse_entity_answer(content, request, types):
    """parse() for ask_until_valid: ((entity, type) or (None, None) for "no entity", None) or (None, Problem)."""
    obj = find_json_object(content)
    if obj is None:
        return None, Problem("not_json", "it holds no JSON object")
    if "entity" not in obj:
        return None, Problem("bad_field", 'the JSON object has no "entity" key')
    if obj["entity"] is None or obj["entity"] == "":
        return (None, None), None
    checked = check_entity(obj["entity"], obj.get("type"), request, types)
    if isinstance(checked, Problem):
        return None, checked
    return checked, None


class LLMRecognizer:
    name = "llm"

    def __init__(self, b, client):
        self.client, self.max_tokens, self.max_attempts = client, b.entity.max_tokens, b.llm.max_attempts
        self.path = b.entity.prompt_file or ENTITY_PROMPT
        self.template = load_prompt(self.path, ("request", "types"))
        self.types = entity_types(b.replace.phrases)

    def settings(self):
        return {"backend": "llm", **prompt_version(self.path, ENTITY_PROMPT, ENTITY_PROMPT_VERSION),
                "max_tokens": self.max_tokens, "max_attempts": self.max_attempts, "types": self.types}

    def describe(self):
        return f"entity: llm, prompt {self.path} ({self.settings()['version']}), types {', '.join(self.types)}"

    def messages(self, request):
        return [{"role": "user", "content": fill(self.template, request=request, types=", ".join(self.types))}]

    def recognize(self, request, source):
        try:
            outcome = ask_until_valid(self.client, self.messages(request), self.max_tokens,
                                      lambda c: parse_entity_answer(c, request, self.types), self.max_attempts)
        except Refused as e:
            raise Drop("refused", str(e)) from None
        if outcome.problem is not None:
            raise Drop(outcome.problem.code, f"no usable answer in {outcome.attempts} attempt(s); last: "
                                             f"{outcome.problem.text}; answer {outcome.last_answer[:200]!r}")
        entity, kind = outcome.value
        if entity is None:
            raise Drop("no_entity", "the endpoint found no entity a picture could show")
        return entity, kind, outcome.attempts


class SpacyRecognizer:
    name = "spacy"

    def __init__(self, b):
        try:
            import spacy
        except ImportError:
            raise ConfigError("build.entity.backend=spacy needs spaCy, which is not installed: pip install spacy, "
                              "then install a model (python -m spacy download en_core_web_sm)") from None
        self.model, self.types = b.entity.spacy_model, entity_types(b.replace.phrases)
        try:
            self.nlp = spacy.load(self.model)
        except OSError as e:
            raise ConfigError(f"spaCy cannot load build.entity.spacy_model {self.model!r} (an installed package "
                              f"name or a model directory; bpo never downloads one): {e}") from None
        self.version = getattr(spacy, "__version__", "?")

    def settings(self):
        return {"backend": "spacy", "model": self.model, "spacy": self.version, "types": self.types,
                "pipeline": str(getattr(self.nlp, "meta", {}).get("version", ""))}

    def describe(self):
        return f"entity: spaCy model {self.model} (spaCy {self.version}), types {', '.join(self.types)}"

    def recognize(self, request, source):
        for ent in self.nlp(request).ents:
            kind = canonical_type(ent.label_, self.types)
            if kind is not None:
                return ent.text, kind, 0
        raise Drop("no_entity", f"spaCy found no entity of the types {', '.join(self.types)}")


class GivenRecognizer:
    name = "given"

    def __init__(self, b):
        self.types = entity_types(b.replace.phrases)

    def settings(self):
        return {"backend": "given", "types": self.types}

    def describe(self):
        return "entity: the input records' own `entity` and `entity_type` fields"

    def recognize(self, request, source):
        name, label = source.raw.get("entity"), source.raw.get("entity_type")
        if not name:
            raise Drop("no_entity", "the record has no `entity` field")
        checked = check_entity(name, label, request, self.types)
        if isinstance(checked, Problem):
            raise Drop(checked.code, f"the record's entity fields cannot be used: {checked.text}")
        return checked[0], checked[1], 0


def build_recognizer(b, client):
    if b.entity.backend == "llm":
        return LLMRecognizer(b, client)
    if b.entity.backend == "spacy":
        return SpacyRecognizer(b)
    return GivenRecognizer(b)
