"""A checkpoint's processor and what bpo reads off it once: its chat template, how an answer ends, when to stop.

    chat = load_chat(model_dir, chat_template=cfg.data.chat_template)
    chat.processor       # the checkpoint's own AutoProcessor (tokenizer, image processor, chat template)
    chat.end_of_turn_id  # the token the template writes after an assistant reply, None if it writes none
    chat.stop_ids        # generation stops on any of these

How an answer ends matters more in preference training than anywhere else: the end of a refusal is where a harmless
and a harmful answer differ, and a response scored without its end token never teaches the model to stop. Every
scored response therefore ends with the token the model emits to end its turn: the template's own end-of-turn marker
when it writes one (`</s>`, `<|im_end|>`, `<end_of_turn>`, `<end_of_utterance>`), else EOS, appended (what TRL's DPO
does). The marker is found by rendering a probe conversation and reading the first special token the template writes
after the reply. Some published templates write none (llava-hf/llava-1.5-7b-hf renders an answer as `text + ' '`,
while LLaVA-1.5 was trained with Vicuna v1's `</s>` after every answer): this is logged with the fix, a template
that matches the training format (`data.chat_template=vicuna_v1` ships with bpo, or a file of your own). A template
that ends an answer only by opening the next turn (GLM-4.1V: the reply is followed by the next `<|user|>`, and by
nothing after the last turn) has that opening token as its marker when the generation config stops on it: the
model ends its turn by emitting it. Such a marker, like EOS, is appended to the scored response.

How a turn's content is given is read off the template too (`Chat.text_content`): transformers' processors take a
list of parts (`[{"type": "image"}, {"type": "text", "text": ...}]`), but some templates print an assistant turn's
content as it is (GLM-4.1V: `{{ msg.content }}`), which turns a list into its Python repr. A probe renders the same
conversation with text given as parts and as strings and keeps the form whose text comes out verbatim; a template
that prints a repr for an image turn (which must be a list) is refused. data.chat_template_kwargs (e.g.
`{enable_thinking: false}`) go to every rendering, probes included (`Chat.render`).
"""

import json
import os
from dataclasses import dataclass, field

from bpo.data.conversation import to_messages
from bpo.runtime.digest import digest_of, tokenizer_digest

SHIPPED_TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "templates")
_PROBE_QUESTION = "bpo probe question"
_PROBE_REPLY = "bpo probe reply"
# Packages that some processors import only when built, by the name their ImportError gives: the pip package, and
# the bpo extra that installs it (setup.py).
PROCESSOR_PACKAGES = {"num2words": ("num2words", "families")}  # SmolVLM, SmolVLM2
# How a probe's parts read when a template prints the list as it is: its Python repr ({{ content }}) or JSON
# ({{ content | tojson }}). Only text made of the probe's own parts counts, so a system prompt quoting JSON does not.
_REPR_OF = ("'text': '{}", '"text": "{}')
_IMAGE_REPRS = ("'type': 'image'", '"type": "image"')


class ChatTemplateError(ValueError):
    """The checkpoint has no usable chat template; the message names data.chat_template as the fix."""


class MissingPackageError(ImportError):
    """The checkpoint's processor imports a package that is not installed; the message names the pip package."""


@dataclass(frozen=True)
class Chat:
    processor: object
    end_of_turn_id: int | None  # written by the template after an assistant reply; None: the template writes none
    eos_id: int  # appended to every response when end_of_turn_id is None
    stop_ids: tuple  # generation config's end tokens, the tokenizer's EOS and the end-of-turn marker
    template_source: str  # "checkpoint" or the data.chat_template value
    tokenizer_digest: str  # bpo.runtime.digest.tokenizer_digest: generated ids are reused only under the same one
    text_content: str = "parts"  # how a text-only turn's content is given: "parts" (a list) or "string"
    template_kwargs: dict = field(default_factory=dict)  # data.chat_template_kwargs, passed to every rendering
    # True when end_of_turn_id is the next turn's opening (GLM-4.1V: <|user|>): the template writes it only before a
    # following turn, so it is appended to the scored response as EOS is.
    end_of_turn_appended: bool = False

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def pad_id(self):
        """Padding for batches: the tokenizer's pad token, else EOS (padding is always masked)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_id

    @property
    def response_end_id(self):
        """The token every complete response ends with."""
        return self.end_of_turn_id if self.end_of_turn_id is not None else self.eos_id

    @property
    def appends_end(self):
        """Whether response_end_id is appended to the rendered reply rather than read off the rendering."""
        return self.end_of_turn_id is None or self.end_of_turn_appended

    @property
    def template_digest(self):
        """Hash of what renders text: the template, and data.chat_template_kwargs when any are set (so settings
        written before the key existed still match)."""
        template = self.processor.chat_template
        return digest_of([template, self.template_kwargs] if self.template_kwargs else template)

    def messages(self, turns, with_image=True):
        """bpo.data.conversation.to_messages in the content form this template prints verbatim."""
        return to_messages(turns, with_image=with_image, text_content=self.text_content)

    def render(self, messages, add_generation_prompt):
        """The template's text for `messages`, with data.chat_template_kwargs: the one way bpo renders."""
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **self.template_kwargs)

    def describe(self):
        """One line for the job's start-up log, and a warning when the template writes no end of turn."""
        tok = self.tokenizer
        line = (f"chat template: {self.template_source}; responses end with "
                f"{tok.convert_ids_to_tokens(self.response_end_id)!r}"
                f"{' (the next turn opens with it; appended)' if self.end_of_turn_appended else ''}; generation "
                f"stops on {tok.convert_ids_to_tokens(list(self.stop_ids))}")
        if self.text_content == "string":
            line += "; text turns given as strings (the template prints a list of parts as it is)"
        if self.template_kwargs:
            line += f"; template arguments {self.template_kwargs}"
        if self.end_of_turn_id is None:
            line += ("\nWARNING: the chat template writes no end-of-turn marker after an assistant reply, so EOS "
                     "is appended to every scored response, while earlier assistant turns in the history stay as the "
                     "template renders them (without one). If the model was trained with an end token after every "
                     "answer (LLaVA-1.5: Vicuna v1, `</s>`), train with a template that writes it: "
                     "data.chat_template=vicuna_v1 (shipped with bpo) or data.chat_template=FILE.")
        return line


def read_template(value):
    """The text of a data.chat_template value: a shipped template's name (bpo/templates/NAME.jinja) or a file."""
    shipped = os.path.join(SHIPPED_TEMPLATES, f"{value}.jinja")
    path = shipped if os.path.isfile(shipped) else value
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        names = sorted(n[:-6] for n in os.listdir(SHIPPED_TEMPLATES) if n.endswith(".jinja"))
        raise ChatTemplateError(f"data.chat_template={value!r}: cannot read {path} ({e.strerror}); give a Jinja "
                                f"file or one of the shipped templates {names}") from None


def load_chat(model_dir, chat_template="", trust_remote_code=False, template_kwargs=None):
    """Load the processor of a local checkpoint (never downloads) and read its turn format."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except ImportError as e:
        raise MissingPackageError(missing_package_message(model_dir, e)) from e
    if chat_template:
        processor.chat_template = read_template(chat_template)
    if not getattr(processor, "chat_template", None):
        raise ChatTemplateError(
            f"{model_dir} has no chat template (pretrained, non-chat checkpoints such as PaliGemma publish none), so "
            f"bpo cannot render conversations for it. Set data.chat_template=FILE (a Jinja chat template in the "
            f"transformers format that renders the conversation the way the model was trained).")
    try:
        return chat_from_processor(processor, _generation_eos_ids(model_dir), chat_template or "checkpoint",
                                   template_kwargs)
    except ChatTemplateError as e:
        raise ChatTemplateError(f"{model_dir}: {e}") from None


def chat_from_processor(processor, generation_eos=(), template_source="checkpoint", template_kwargs=None):
    """The Chat of a processor that has a chat template; generation_eos: the generation config's end tokens."""
    probe = Chat(processor, None, None, (), template_source, "", "parts", dict(template_kwargs or {}))
    text_content = _text_content(probe)
    probe = Chat(processor, None, None, (), template_source, "", text_content, probe.template_kwargs)
    tok = processor.tokenizer
    end_of_turn, appended = _end_of_turn(probe, list(generation_eos))
    eos = tok.eos_token_id if tok.eos_token_id is not None else (list(generation_eos) or [None])[0]
    if eos is None and end_of_turn is None:
        raise ChatTemplateError("the tokenizer has no EOS token and the chat template writes no end-of-turn marker, "
                                "so no response could end; set data.chat_template=FILE")
    stops = []
    for t in [*generation_eos, eos, end_of_turn]:
        if t is not None and t not in stops:
            stops.append(t)
    return Chat(processor, end_of_turn, eos, tuple(stops), template_source, tokenizer_digest(tok), text_content,
                probe.template_kwargs, appended)


def missing_package_message(model_dir, error):
    """What to install when a checkpoint's processor fails to import a package."""
    for module, (package, extra) in PROCESSOR_PACKAGES.items():
        if module in str(error):
            return (f"{model_dir}: its processor needs the package `{package}`, which is not installed: pip install "
                    f"{package} (or pip install -e \".[{extra}]\" for every package bpo's families need)")
    return f"{model_dir}: its processor cannot be built, a package it imports is missing: {error}"


def _probe_message(role, text, form, image=False):
    if form == "string" and not image:
        return {"role": role, "content": text}
    return {"role": role, "content": [{"type": "image"}] * image + [{"type": "text", "text": text}]}


def _try_render(chat, messages, add_generation_prompt):
    """(text, None) or (None, why): a template may raise anything for a content form it does not take
    (raise_exception, indexing a string as a list)."""
    try:
        return chat.render(messages, add_generation_prompt), None
    except Exception as e:  # noqa: BLE001 - any failure means "this form does not render"
        return None, f"{type(e).__name__}: {e}"


def _verbatim(text, *wanted):
    """Whether `text` holds each wanted text, and no part of a probe printed as a repr."""
    return (text is not None and all(w in text for w in wanted)
            and not any(r.format(w) in text for r in _REPR_OF for w in wanted)
            and not any(r in text for r in _IMAGE_REPRS))


def _text_content(chat):
    """"parts" or "string": the content form in which the template prints a text turn's text as it is.

    Both forms are rendered (a user question and an assistant reply); "parts" wins when both come out clean, so
    templates that take both (Qwen, Gemma, LLaVA) render exactly as transformers' processor examples give them.
    An image turn is always a list (the image is a part); a template that prints that list as a repr is refused."""
    found = {}
    for form in ("parts", "string"):
        messages = [_probe_message("user", _PROBE_QUESTION, form), _probe_message("assistant", _PROBE_REPLY, form)]
        found[form] = _try_render(chat, messages, False)
    image_turn = [_probe_message("user", _PROBE_QUESTION, "parts", image=True)]
    text, error = _try_render(chat, image_turn, True)
    if not _verbatim(text, _PROBE_QUESTION):
        raise ChatTemplateError(
            f"the chat template does not print a user turn holding an image and text, given as a list of parts "
            f"([{{'type': 'image'}}, {{'type': 'text', ...}}], the form transformers' processors take and the only "
            f"way to place the image), as its text: it renders {error or repr(text[-200:])}. Set "
            f"data.chat_template=FILE, a template that iterates over a list content's parts.")
    for form in ("parts", "string"):
        if _verbatim(found[form][0], _PROBE_QUESTION, _PROBE_REPLY):
            return form
    shown = {form: err or repr(out[-200:]) for form, (out, err) in found.items()}
    raise ChatTemplateError(
        f"the chat template prints a text turn's content neither as a list of parts nor as a string verbatim (a "
        f"Python repr or JSON of the parts, or an error): parts -> {shown['parts']}; string -> {shown['string']}. "
        f"Set data.chat_template=FILE, a template that prints each text part's text.")


def _end_of_turn(chat, generation_eos):
    """(token id, appended): the first special token the template writes after an assistant reply (appended=False);
    else the special token that opens the next turn right after the reply, if generation stops on it (True: the
    model ends its turn by emitting it, GLM-4.1V's <|user|>); else (None, False)."""
    user = _probe_message("user", "Hi", chat.text_content)
    reply = _probe_message("assistant", _PROBE_REPLY, chat.text_content)
    text = chat.render([user, reply], False)
    at = text.rfind(_PROBE_REPLY)
    if at < 0:
        raise ChatTemplateError("the chat template does not render an assistant reply's text; set "
                                "data.chat_template=FILE")
    tok = chat.tokenizer
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    for token_id in tok(text[at + len(_PROBE_REPLY):], add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return token_id, False
    # Nothing after the last reply. A template that delimits turns only by their opening token leaves the model to
    # end its answer by emitting the next one; trust that only when the generation config stops on it and it follows
    # the reply directly. GLM-4 / GLM-4.1V: eos_token_id [151329, 151336, 151338] = <|endoftext|>, <|user|>,
    # <|observation|> (transformers models/glm4/configuration_glm4.py, the default eos_token_id), so a GLM answer
    # ends with <|user|>, the token its template writes right after an assistant turn.
    text, _ = _try_render(chat, [user, reply, user], False)
    if text is None or text.rfind(_PROBE_REPLY) < 0:
        return None, False
    after = tok(text[text.rfind(_PROBE_REPLY) + len(_PROBE_REPLY):], add_special_tokens=False)["input_ids"]
    if after and after[0] in special and after[0] in generation_eos:
        return after[0], True
    return None, False


def _generation_eos_ids(model_dir):
    """eos_token_id of generation_config.json (an int or a list), else of config.json; [] when neither sets one."""
    for name in ("generation_config.json", "config.json"):
        try:
            with open(os.path.join(model_dir, name)) as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            continue
        value = cfg.get("eos_token_id", cfg.get("text_config", {}).get("eos_token_id"))
        if value is not None:
            return [value] if isinstance(value, int) else list(value)
    return []
