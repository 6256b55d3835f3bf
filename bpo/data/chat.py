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
that matches the training format (`data.chat_template=vicuna_v1` ships with bpo, or a file of your own).
"""

import os
from dataclasses import dataclass

SHIPPED_TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "templates")
_PROBE_REPLY = "bpo probe reply"
# Packages that some processors import only when built, by the name their ImportError gives: the pip package, and
# the bpo extra that installs it (setup.py).
PROCESSOR_PACKAGES = {"num2words": ("num2words", "families")}  # SmolVLM, SmolVLM2


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
    tokenizer_digest: str  # bpo.fingerprint.tokenizer_digest: generated ids are reused only under the same one

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

    def describe(self):
        """One line for the job's start-up log, and a warning when the template writes no end of turn."""
        tok = self.tokenizer
        line = (f"chat template: {self.template_source}; responses end with "
                f"{tok.convert_ids_to_tokens(self.response_end_id)!r}; generation stops on "
                f"{tok.convert_ids_to_tokens(list(self.stop_ids))}")
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


def load_chat(model_dir, chat_template="", trust_remote_code=False):
    """Load the processor of a local checkpoint (never downloads) and read its turn format."""
    from transformers import AutoProcessor

    from bpo.fingerprint import tokenizer_digest

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
    tok = processor.tokenizer
    end_of_turn = _end_of_turn_id(processor)
    generation_eos = _generation_eos_ids(model_dir)
    eos = tok.eos_token_id if tok.eos_token_id is not None else (generation_eos or [None])[0]
    if eos is None and end_of_turn is None:
        raise ChatTemplateError(f"{model_dir}: the tokenizer has no EOS token and the chat template writes no "
                                f"end-of-turn marker, so no response could end; set data.chat_template=FILE")
    stops = []
    for t in [*generation_eos, eos, end_of_turn]:
        if t is not None and t not in stops:
            stops.append(t)
    return Chat(processor, end_of_turn, eos, tuple(stops), chat_template or "checkpoint", tokenizer_digest(tok))


def missing_package_message(model_dir, error):
    """What to install when a checkpoint's processor fails to import a package."""
    for module, (package, extra) in PROCESSOR_PACKAGES.items():
        if module in str(error):
            return (f"{model_dir}: its processor needs the package `{package}`, which is not installed: pip install "
                    f"{package} (or pip install -e \".[{extra}]\" for every package bpo's families need)")
    return f"{model_dir}: its processor cannot be built, a package it imports is missing: {error}"


def _end_of_turn_id(processor):
    """The first special token the template writes after an assistant reply, or None."""
    user = {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
    reply = {"role": "assistant", "content": [{"type": "text", "text": _PROBE_REPLY}]}
    text = processor.apply_chat_template([user, reply], add_generation_prompt=False, tokenize=False)
    at = text.rfind(_PROBE_REPLY)
    if at < 0:
        raise ChatTemplateError("the chat template does not render an assistant reply's text; set "
                                "data.chat_template=FILE")
    tail = text[at + len(_PROBE_REPLY):]
    tok = processor.tokenizer
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    for token_id in tok(tail, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return token_id
    return None


def _generation_eos_ids(model_dir):
    """eos_token_id of generation_config.json (an int or a list), else of config.json; [] when neither sets one."""
    import json

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
