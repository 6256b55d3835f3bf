"""Stage 4, the rewrite: the replaced request (mid_prompt) made to read naturally as a question about the image.

    rewriter = build_rewriter(cfg.build, client)
    question, attempts = rewriter.rewrite(mid_prompt, entity, entity_type, phrase)   # raises Drop

Backends (build.rewrite.backend):
- `llm`: the versioned prompt (prompts/rewrite_v1.txt, written for bpo) gives build.llm the replaced request and
  the phrase, never the entity, and asks for `{"question": ...}`. An answer is used when it holds a JSON object
  whose `question` is non-empty text without an `<image>` or `USER:` / `ASSISTANT:` marker and does not name the
  entity (leak rule of bpo.build_data.replace: the endpoint may guess the name from the context). Anything else is
  re-asked with the problem named (bpo.build_data.llm); after build.llm.max_attempts answers the record is dropped,
  as `leak` when the last answer named the entity.
- `none`: the replaced request as it is.
"""

import os
import re

from bpo.build_data.entity import PROMPT_DIR, load_prompt, prompt_version
from bpo.build_data.llm import Problem, Refused, ask_until_valid, fill, find_json_object
from bpo.build_data.replace import named_in
from bpo.build_data.report import Drop

REWRITE_PROMPT = os.path.join(PROMPT_DIR, "rewrite_v1.txt")
REWRITE_PROMPT_VERSION = "rewrite-v1"  # bump with any change to the prompt file or to the problems' wording
_ROLE_MARKER = re.compile(r"(?<!\S)(USER|ASSISTANT):")


def parse_rewrite_answer(content, entity, entity_type, phrase):
    """parse() for ask_until_valid: (question, None) or (None, Problem)."""
    obj = find_json_object(content)
    if obj is None:
        return None, Problem("not_json", "it holds no JSON object")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        return None, Problem("bad_field", 'the JSON object needs "question": the rewritten request as text')
    question = question.strip()
    if "<image>" in question or _ROLE_MARKER.search(question):
        return None, Problem("bad_field", 'the question must not hold "<image>", "USER:" or "ASSISTANT:"')
    name = named_in(question, entity, entity_type)
    if name:
        return None, Problem("leak", f'it names "{name}"; refer to what the image shows only as "{phrase}"')
    return question, None


class LLMRewriter:
    name = "llm"

    def __init__(self, b, client):
        self.client, self.max_tokens, self.max_attempts = client, b.rewrite.max_tokens, b.llm.max_attempts
        self.path = b.rewrite.prompt_file or REWRITE_PROMPT
        self.template = load_prompt(self.path, ("request", "phrase"))

    def settings(self):
        return {"backend": "llm", **prompt_version(self.path, REWRITE_PROMPT, REWRITE_PROMPT_VERSION),
                "max_tokens": self.max_tokens, "max_attempts": self.max_attempts}

    def describe(self):
        return f"rewrite: llm, prompt {self.path} ({self.settings()['version']}), leak check on"

    def messages(self, request, phrase):
        return [{"role": "user", "content": fill(self.template, request=request, phrase=phrase)}]

    def rewrite(self, request, entity, entity_type, phrase):
        try:
            outcome = ask_until_valid(self.client, self.messages(request, phrase), self.max_tokens,
                                      lambda c: parse_rewrite_answer(c, entity, entity_type, phrase),
                                      self.max_attempts)
        except Refused as e:
            raise Drop("refused", str(e)) from None
        if outcome.problem is not None:
            raise Drop(outcome.problem.code, f"no usable rewrite in {outcome.attempts} attempt(s); last: "
                                             f"{outcome.problem.text}; answer {outcome.last_answer[:200]!r}")
        return outcome.value, outcome.attempts


class KeepRewriter:
    name = "none"

    def settings(self):
        return {"backend": "none"}

    def describe(self):
        return "rewrite: none (the replaced request is the final one)"

    def rewrite(self, request, entity, entity_type, phrase):
        return request, 0


def build_rewriter(b, client):
    return LLMRewriter(b, client) if b.rewrite.backend == "llm" else KeepRewriter()
