"""Records -> token ids, through the processor's own chat template, so any image-text-to-text processor works.

The prompt is the conversation rendered with the generation prompt and tokenised together with the image by
`processor(text=..., images=...)`, which expands the image placeholder into exactly the tokens the model expects.
A response's tokens are what the template adds after that prompt when the response is appended as an assistant
message (the reply text plus the template's end-of-turn marker, e.g. "</s>" or "<|im_end|>\\n"), tokenised without
special tokens. The prompt is never cut; responses are cut at the end to fit max_length.
"""

from dataclasses import dataclass, field

from bpo.data.conversation import to_messages
from bpo.data.records import RESPONSE_KEYS, image_path

# Keys a processor returns that are per-token text fields, not image inputs.
_TEXT_KEYS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"}


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


@dataclass
class EncodedExample:
    id: str
    prompt_ids: list  # list[int], image tokens expanded
    image_inputs: dict = field(default_factory=dict)  # e.g. pixel_values (1, C, H, W); {} without image
    response_ids: dict = field(default_factory=dict)  # kind -> list[int], only the responses the record has
    truncated: dict = field(default_factory=dict)  # kind -> bool


def render_prompt(record, processor, with_image=True):
    """The prompt text: the conversation and the template's generation prompt."""
    messages = to_messages(record.turns, with_image=with_image)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def load_image(record, image_root):
    from PIL import Image

    where = image_path(record, image_root)
    try:
        with Image.open(where) as im:
            return im.convert("RGB")
    except OSError as e:
        raise OSError(f"record {record.id} ({record.source}): cannot open image {where}: {e}") from e


def encode_prompt(record, processor, image_root, with_image=True):
    """(prompt_ids, image_inputs) for one record; image_inputs is {} when with_image=False or there is no image."""
    return _tokenize_prompt(record, processor, image_root, render_prompt(record, processor, with_image), with_image)


def _tokenize_prompt(record, processor, image_root, text, with_image):
    # Templates that write the BOS token themselves (Llama-3, Gemma) must not get a second one from the tokenizer.
    bos = processor.tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    if with_image and record.image is not None:
        out = processor(
            text=[text], images=[load_image(record, image_root)], return_tensors="pt", add_special_tokens=add_special
        )
        image_inputs = {k: v for k, v in out.items() if k not in _TEXT_KEYS}
    else:
        out = processor(text=[text], return_tensors="pt", add_special_tokens=add_special)
        image_inputs = {}
    return out["input_ids"][0].tolist(), image_inputs


def response_suffix(record, processor, prompt, reply, with_image=True):
    """The text the chat template adds after the rendered `prompt` for an assistant message `reply`."""
    messages = to_messages(record.turns, with_image=with_image)
    messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    full = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    if not full.startswith(prompt):
        raise TemplateError(
            f"record {record.id} ({record.source}): the chat template's rendering with the response does not "
            f"start with its generation-prompt rendering, so response tokens cannot be separated.\n"
            f"  prompt: {prompt[-200:]!r}\n  full:   {full[-300:]!r}"
        )
    return full[len(prompt):]


def encode_example(record, processor, image_root, max_length, with_image=True, responses=RESPONSE_KEYS):
    """Prompt ids, image inputs and the ids of every requested response the record has, fitted to max_length."""
    unknown = set(responses) - set(RESPONSE_KEYS)
    if unknown:
        raise ValueError(f"unknown response kinds {sorted(unknown)}; expected some of {RESPONSE_KEYS}")
    prompt = render_prompt(record, processor, with_image=with_image)
    prompt_ids, image_inputs = _tokenize_prompt(record, processor, image_root, prompt, with_image)
    budget = max_length - len(prompt_ids)
    if budget < 1:
        raise PromptTooLong(record.id, len(prompt_ids), max_length)
    response_ids, truncated = {}, {}
    for kind in responses:
        text = getattr(record, kind)
        if text is None:
            continue
        suffix = response_suffix(record, processor, prompt, text, with_image=with_image)
        ids = processor.tokenizer(suffix, add_special_tokens=False)["input_ids"]
        response_ids[kind] = ids[:budget]
        truncated[kind] = len(ids) > budget
    return EncodedExample(record.id, prompt_ids, image_inputs, response_ids, truncated)
