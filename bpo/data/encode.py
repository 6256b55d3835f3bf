"""Records -> token ids, through the checkpoint's own chat template, so any image-text-to-text processor works.

The prompt is the conversation rendered with the generation prompt and tokenised together with the image by
`processor(text=..., images=...)`, which expands the image placeholder into exactly the tokens the model expects.
Every output of the processor is kept: per-image inputs (`pixel_values`, `image_grid_thw`, `image_sizes`,
`pixel_attention_mask`, ...) in `image_inputs`, and per-token fields (any output of the prompt's shape, e.g.
Gemma-3's `token_type_ids`, Qwen2-VL's `mm_token_type_ids`) in `prompt_fields`; the model takes what its forward
accepts (`bpo.model.scorer.model_inputs`).

A response's tokens are the tokens that the whole rendered conversation (prompt + the reply as an assistant message)
has after the prompt's tokens, tokenised as one text; the prompt's own tokens must be a prefix of them, or the record
is refused (`TokenizationMismatch`), because a response tokenised apart from its prompt can differ (SentencePiece
tokenizers and a leading `▁`). The response ends with the token the model emits to end its turn (`bpo.data.chat`):
cut right after the template's end-of-turn marker (what follows it, such as Qwen's "\\n", is never generated), or,
for a template that writes none, the reply followed by EOS. A blind response written by bpo/generate_blind.py is
scored as the ids the model generated (stop token included), not its decoded text re-tokenised, when the tokenizer is
the same. The prompt is never cut; responses are cut at the end to fit max_length, and then end without that token
(`truncated`). A response longer than MAX_CHARS_PER_TOKEN x max_length characters is cut to that many before it is
tokenised (a 20 MB response would otherwise be tokenised whole to keep max_length tokens of it); no tokenizer
writes a token of more than 16 characters often enough to fall short of the budget, and if one does the response
still counts as truncated and ends without the end-of-turn token.

Some generation prompts end with text that the rendered assistant turn does not contain: Gemma-4, thinking unset,
ends its prompt `<|turn>model\n<|channel>thought\n<channel|>` (an empty thought channel) while a rendered answer is
`<|turn>model\n{reply}<turn|>`. The model sees the prompt and then emits the answer and its end-of-turn marker, so
that is what is scored: the response is the rendered turn from the reply on (`{reply}<turn|>`), tokenised after the
prompt. The rendered conversation checks it: it must be the conversation without a generation prompt, then an
assistant turn whose text before the reply is a prefix of the generation prompt's tail, then the reply, then the
marker. Scoring the answer in the rendering without the thought channel would score it after a prompt the model is
never given (blind generation and evaluation use the generation prompt). Where the rendered conversation does start
with the prompt (every template before these), it is used as it is. All renderings go through `Chat.render`, with the
content form and data.chat_template_kwargs read at load time (bpo.data.chat).
"""

from dataclasses import dataclass, field

from bpo.data.conversation import Turn
from bpo.data.records import RESPONSE_KEYS, blind_generation, image_path


MAX_CHARS_PER_TOKEN = 16


class PromptTooLong(ValueError):
    """The prompt (with its image tokens) leaves no room for a single response token."""

    def __init__(self, record_id, prompt_len, max_length):
        self.record_id, self.prompt_len, self.max_length = record_id, prompt_len, max_length
        super().__init__(
            f"record {record_id}: prompt is {prompt_len} tokens (image tokens included), max_length is "
            f"{max_length}; no room for a response"
        )


class TemplateError(ValueError):
    """The chat template renders a conversation + response that does not start with the prompt rendering."""


class TokenizationMismatch(ValueError):
    """The prompt's tokens are not a prefix of the whole conversation's tokens, so responses cannot be cut off."""


@dataclass
class EncodedExample:
    id: str
    prompt_ids: list  # list[int], image tokens expanded
    image_inputs: dict = field(default_factory=dict)  # e.g. pixel_values (1, C, H, W); {} without image
    response_ids: dict = field(default_factory=dict)  # kind -> list[int], only the responses the record has
    truncated: dict = field(default_factory=dict)  # kind -> bool
    prompt_fields: dict = field(default_factory=dict)  # per-token processor outputs over the prompt: key -> list[int]


def render_prompt(record, chat, with_image=True):
    """The prompt text: the conversation and the template's generation prompt."""
    return chat.render(chat.messages(record.turns, with_image=with_image), add_generation_prompt=True)


def render_conversation(record, chat, reply, with_image=True):
    """The whole conversation text with `reply` as the final assistant message."""
    return chat.render(chat.messages([*record.turns, Turn("assistant", reply)], with_image=with_image),
                       add_generation_prompt=False)


def load_image(record, image_root):
    from PIL import Image

    where = image_path(record, image_root)
    try:
        with Image.open(where) as im:
            return im.convert("RGB")
    except OSError as e:
        raise OSError(f"record {record.id} ({record.source}): cannot open image {where}: {e}") from e


def encode_prompt(record, chat, image_root, with_image=True):
    """(prompt_ids, image_inputs, prompt_fields) for one record; image_inputs is {} when with_image=False or there
    is no image."""
    return process_prompt(chat.processor, render_prompt(record, chat, with_image),
                          load_image(record, image_root) if with_image and record.image is not None else None)


def _add_special_tokens(processor, text):
    # Templates that write the BOS token themselves (Llama-3, Gemma) must not get a second one from the tokenizer.
    bos = processor.tokenizer.bos_token
    return not (bos and text.startswith(bos))


def process_prompt(processor, text, image=None):
    """Run the processor on a rendered prompt (and its image): (ids, image_inputs, prompt_fields)."""
    kwargs = dict(text=[text], return_tensors="pt", add_special_tokens=_add_special_tokens(processor, text))
    out = processor(images=[image], **kwargs) if image is not None else processor(**kwargs)
    ids = out["input_ids"]  # (1, P)
    fields, images = {}, {}
    for key, value in out.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if value.shape == ids.shape:  # aligned with the tokens: a per-token field
            fields[key] = value[0].tolist()
        elif image is not None:
            images[key] = value
    return ids[0].tolist(), images, fields


def tokenize_text(processor, text):
    """Token ids of a rendered text without image expansion, with the same special-token rule as the prompt."""
    return processor.tokenizer(text, add_special_tokens=_add_special_tokens(processor, text))["input_ids"]


def conversation_text(record, chat, prompt, reply, with_image=True):
    """(text, reply_end): the rendered conversation with `reply` answering `prompt`, starting with `prompt`, and where
    the reply's text ends in it (None where the template changes the reply's text). Where the template's rendering
    does not start with the prompt, the text is the prompt followed by the rendered assistant turn from the reply on
    (see the module docstring), once the rendering checks."""
    full = render_conversation(record, chat, reply, with_image=with_image)
    if full.startswith(prompt):
        at = full.rfind(reply)
        return full, (at + len(reply) if at >= len(prompt) else None)  # None: the reply is not rendered as given
    # The generation prompt ends with text the rendered turn lacks (Gemma-4's empty thought channel).
    bare = chat.render(chat.messages(record.turns, with_image=with_image), add_generation_prompt=False)
    turn = full[len(bare):] if full.startswith(bare) and prompt.startswith(bare) else None
    at = turn.find(reply) if turn is not None else -1
    as_given = at >= 0
    if turn is not None and not as_given and reply.strip():
        at = turn.find(reply.strip())  # the template trims the reply (Gemma-4's `| trim`): its end is not known
    if at < 0 or not prompt[len(bare):].startswith(turn[:at]):
        raise TemplateError(
            f"record {record.id} ({record.source}): the chat template's rendering with the response does not "
            f"start with its generation-prompt rendering, and its assistant turn does not open like the generation "
            f"prompt either, so response tokens cannot be separated.\n"
            f"  prompt: {prompt[-200:]!r}\n  full:   {full[-300:]!r}"
        )
    return prompt + turn[at:], (len(prompt) + len(reply) if as_given else None)


def response_ids(record, chat, prompt, prompt_tokens, reply, with_image=True):
    """Token ids of `reply` after the rendered `prompt` (whose text-only tokens are `prompt_tokens`), ending with the
    token that ends the model's turn (see the module docstring)."""
    processor = chat.processor
    full, reply_end = conversation_text(record, chat, prompt, reply, with_image=with_image)
    if chat.appends_end:
        # No end-of-turn marker after the reply (LLaVA-1.5 writes a space; GLM-4.1V nothing, its marker opens the
        # next turn): drop what the template writes after the reply and append the end token.
        if reply_end is None:
            raise TemplateError(f"record {record.id} ({record.source}): the chat template does not render the "
                                f"reply's text as given, so its end cannot be found")
        full = full[:reply_end]
    tokens = tokenize_text(processor, full)
    n = len(prompt_tokens)
    if tokens[:n] != prompt_tokens:
        raise TokenizationMismatch(_mismatch_message(record, processor, prompt_tokens, tokens))
    ids = tokens[n:]
    if chat.appends_end:
        return ids + [chat.response_end_id]
    if chat.end_of_turn_id not in ids:
        raise TemplateError(f"record {record.id} ({record.source}): the chat template writes no "
                            f"{processor.tokenizer.convert_ids_to_tokens(chat.end_of_turn_id)!r} after this reply")
    return ids[:ids.index(chat.end_of_turn_id) + 1]


def _mismatch_message(record, processor, prompt_tokens, tokens):
    first, ours, theirs = _first_difference(prompt_tokens, tokens, processor.tokenizer)
    return (f"record {record.id} ({record.source}): the prompt's tokens are not a prefix of the whole "
            f"conversation's tokens, so the response tokens would differ from what the model sees; they first "
            f"differ at token {first}: prompt {ours} vs conversation {theirs}. The chat template's generation prompt "
            f"and its reply do not tokenize apart; supply a template that ends the generation prompt on a token "
            f"boundary (data.chat_template).")


def _first_difference(ours, theirs, tokenizer):
    """Where `ours`, which should be a prefix of `theirs`, first departs from it: (index, our tokens and theirs
    around it, as token strings)."""
    first = next(i for i, (a, b) in enumerate(zip(ours, theirs + [None] * len(ours))) if a != b)
    lo = max(first - 3, 0)
    return first, tokenizer.convert_ids_to_tokens(ours[lo:first + 3]), tokenizer.convert_ids_to_tokens(
        theirs[lo:first + 3])


def _generated_ids(record, kind, chat):
    """The ids bpo/generate_blind.py kept for a blind response when this tokenizer wrote them, else None."""
    if kind != "blind":
        return None
    generated, tokenizer, _ = blind_generation(record)
    return generated if generated and tokenizer == chat.tokenizer_digest else None


@dataclass(frozen=True)
class BlankImage:
    """A one-turn prompt with a blank image, processed; see bpo.model.scorer.SequenceScorer (ZeRO-3 lockstep)."""
    prompt_ids: list
    image_inputs: dict
    prompt_fields: dict
    pad_id: int


def blank_image_example(chat, size=64):
    """The smallest prompt with an image that the processor makes: one user turn, a uniform grey square."""
    from PIL import Image

    processor = chat.processor
    text = chat.render(chat.messages([Turn("user", ".", has_image=True)]), add_generation_prompt=True)
    ids, images, fields = process_prompt(processor, text, Image.new("RGB", (size, size), (128, 128, 128)))
    return BlankImage(ids, images, fields, chat.pad_id)


def encode_example(record, chat, image_root, max_length, with_image=True, responses=RESPONSE_KEYS):
    """Prompt ids, image inputs and the ids of every requested response the record has, fitted to max_length."""
    unknown = set(responses) - set(RESPONSE_KEYS)
    if unknown:
        raise ValueError(f"unknown response kinds {sorted(unknown)}; expected some of {RESPONSE_KEYS}")
    processor = chat.processor
    prompt = render_prompt(record, chat, with_image=with_image)
    image = load_image(record, image_root) if with_image and record.image is not None else None
    prompt_ids, image_inputs, fields = process_prompt(processor, prompt, image)
    budget = max_length - len(prompt_ids)
    if budget < 1:
        raise PromptTooLong(record.id, len(prompt_ids), max_length)
    prompt_tokens = tokenize_text(processor, prompt)
    out, truncated = {}, {}
    for kind in responses:
        text = getattr(record, kind)
        if text is None:
            continue
        # A blind response: what the reference model wrote, its stop token included unless it was cut.
        ids = _generated_ids(record, kind, chat)
        cut = False
        if not ids:
            limit = int(MAX_CHARS_PER_TOKEN * max_length)
            cut = len(text) > limit
            ids = response_ids(record, chat, prompt, prompt_tokens, text[:limit].rstrip(), with_image=with_image)
            if cut and len(ids) <= budget:
                ids = ids[:-1]  # the text did not end here: no end-of-turn token
        out[kind] = ids[:budget]
        truncated[kind] = cut or len(ids) > budget
    return EncodedExample(record.id, prompt_ids, image_inputs, out, truncated, fields)


def verify_example(record, chat, image_root, example):
    """Check an encoded example against the processor's own tokenization of each whole conversation, image
    included: prompt + response tokens must be exactly its leading tokens (EOS, appended when the template writes no
    end of turn, and the cut of a truncated response aside). Raises TokenizationMismatch naming the tokens."""
    processor = chat.processor
    with_image = bool(example.image_inputs)
    image = load_image(record, image_root) if with_image else None
    prompt = render_prompt(record, chat, with_image=with_image)
    for kind, ids in example.response_ids.items():
        if _generated_ids(record, kind, chat):
            continue  # the generated ids themselves: what the model wrote, whatever its tokenizer would make of them
        full, _ = conversation_text(record, chat, prompt, getattr(record, kind), with_image=with_image)
        seen = process_prompt(processor, full, image)[0]
        mine = example.prompt_ids + ids
        if chat.appends_end and not example.truncated[kind]:
            mine = mine[:-1]  # the appended end token is not in the template's rendering
        if seen[:len(mine)] != mine:
            first, ours, theirs = _first_difference(mine, seen, processor.tokenizer)
            raise TokenizationMismatch(
                f"record {record.id} ({record.source}): the {kind} tokens are not what the model sees in the whole "
                f"conversation; they first differ at token {first}: bpo {ours} vs processor {theirs}")
