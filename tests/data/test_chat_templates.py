"""Published chat templates of newer families (../shared/fixtures/chat_templates, read where they lie) rendered
through bpo.data.chat and .encode: the prompt is the family's own, the scored response is exactly the answer and the
token the model ends its turn with, and no turn's content is printed as a Python repr.

Each family gets a small tokenizer of its tokenizer's kind with its real special tokens, standing in for the
checkpoint's processor where only text is rendered and tokenised (`TextProcessor`). Expected texts are written out by
hand from reading each template, not taken from bpo's output.
"""

import os

import pytest

from bpo.data.chat import ChatTemplateError, chat_from_processor
from bpo.data.conversation import parse_conversation
from bpo.data.encode import conversation_text, render_prompt, response_ids, tokenize_text
from bpo.data.records import Record

from jobs import SHARED

FIXTURES = os.path.join(SHARED, "fixtures", "chat_templates")
SAMPLE = "USER: Hi ASSISTANT: Hello! USER: <image>\nWhere does the person in the image live? ASSISTANT:"
CHOSEN = "I can't help with that."
REJECTED = "Sure, it is 1 Example Road."
QUESTION = "Where does the person in the image live?"



class TextProcessor:
    """A tokenizer and a chat template, seen as a processor for rendering and tokenising text (no images)."""

    def __init__(self, tokenizer, chat_template):
        self.tokenizer, self.chat_template = tokenizer, chat_template

    def apply_chat_template(self, conversation, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)


def _template(name):
    with open(os.path.join(FIXTURES, f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


def _byte_level(cls_name, first, special, **kwargs):
    import transformers

    from bpo.demo.tiny.tokenizers import build_tokenizer

    return build_tokenizer(getattr(transformers, cls_name), byte_level=True, first=first, special_tokens=special,
                           **kwargs)


def glm4v():
    # GLM-4's vocabulary opens its added tokens with <|endoftext|> [MASK] [gMASK] [sMASK] <sop> <eop> <|system|>
    # <|user|> <|assistant|> <|observation|> <|begin_of_image|> ... (ids 151329..); byte-level BPE.
    tok = _byte_level("Qwen2Tokenizer", ["<|endoftext|>"],
                      ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
                       "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                       "<|end_of_video|>", "<|image|>", "<|video|>"], eos_token="<|endoftext|>",
                      pad_token="<|endoftext|>")
    # transformers models/glm4/configuration_glm4.py: eos_token_id defaults to [151329, 151336, 151338], i.e.
    # <|endoftext|>, <|user|>, <|observation|>: generation stops when the model opens the next turn.
    return tok, ["<|endoftext|>", "<|user|>", "<|observation|>"]


def gemma4():
    from transformers import GemmaTokenizer

    from bpo.demo.tiny.tokenizers import build_tokenizer

    tok = build_tokenizer(GemmaTokenizer, byte_level=False, first=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
                          special_tokens=["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", "<|image|>",
                                          "<|audio|>", "<|video|>", "<|tool>", "<tool|>", "<|tool_call>",
                                          "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'],
                          add_bos_token=True)
    return tok, ["<eos>"]


def qwen3_vl():
    tok = _byte_level("Qwen2Tokenizer", ["<|endoftext|>"],
                      ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                       "<|video_pad|>", "<think>", "</think>"], eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return tok, ["<|im_end|>", "<|endoftext|>"]


def mistral3():
    # Ministral-3's Tekken tokenizer is byte-level BPE.
    tok = _byte_level("GPT2Tokenizer", ["<unk>", "<s>", "</s>"],
                      ["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]",
                       "[/SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[ARGS]"],
                      unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return tok, ["</s>"]


def lfm2_vl():
    tok = _byte_level("GPT2Tokenizer", ["<|pad|>", "<|startoftext|>", "<|endoftext|>"],
                      ["<|im_start|>", "<|im_end|>", "<image>", "<|image_start|>", "<|image_end|>"],
                      unk_token="<|endoftext|>", bos_token="<|startoftext|>", eos_token="<|im_end|>",
                      pad_token="<|pad|>")
    return tok, ["<|im_end|>"]


def llama4():
    tok = _byte_level("GPT2Tokenizer", ["<|begin_of_text|>", "<|end_of_text|>"],
                      ["<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>", "<|image|>", "<|image_start|>",
                       "<|image_end|>", "<|patch|>", "<|python_start|>", "<|python_end|>"],
                      unk_token="<|end_of_text|>", bos_token="<|begin_of_text|>", eos_token="<|eot|>")
    return tok, ["<|end_of_text|>", "<|eot|>", "<|eom|>"]


def smolvlm():
    tok = _byte_level("GPT2Tokenizer", [], ["<fake_token_around_image>", "<image>", "<end_of_utterance>",
                                            "<global-img>"],
                      unk_token="<|endoftext|>", bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                      pad_token="<|im_end|>")
    return tok, ["<end_of_utterance>"]


# family -> (tokenizer builder, template kwargs, the whole prompt, the scored response's text). The prompt ends with
# the family's generation prompt; the response is the answer followed by the token that ends the model's turn.
CASES = {
    # The assistant turn is `<|assistant|>\n{{ msg.content }}` and nothing follows the last one: the model ends its
    # answer by opening the next turn, <|user|>.
    "glm4v": (glm4v, {}, "[gMASK]<sop><|user|>\nHi<|assistant|>\nHello!<|user|>\n"
                         f"<|begin_of_image|><|image|><|end_of_image|>{QUESTION}<|assistant|>\n", "{}<|user|>"),
    # Thinking unset: the generation prompt carries an empty thought channel; the answer follows it.
    "gemma4": (gemma4, {}, "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n<|turn>user\n"
                           f"<|image|>{QUESTION}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>",
               "{}<turn|>"),
    "gemma4_thinking": (gemma4, {"enable_thinking": True},
                        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n"
                        f"<|turn>user\n<|image|>{QUESTION}<turn|>\n<|turn>model\n", "{}<turn|>"),
    "qwen3_vl": (qwen3_vl, {}, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                               f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n"
                               "<|im_start|>assistant\n", "{}<|im_end|>"),
    # Always a default system prompt (checked by its ends below); the image sorts before the text.
    "mistral3": (mistral3, {}, None, "{}</s>"),
    "lfm2_vl": (lfm2_vl, {}, "<|startoftext|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                             f"<|im_start|>user\n<image>{QUESTION}<|im_end|>\n<|im_start|>assistant\n", "{}<|im_end|>"),
    "llama4": (llama4, {}, "<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi<|eot|>"
                           "<|header_start|>assistant<|header_end|>\n\nHello!<|eot|>"
                           f"<|header_start|>user<|header_end|>\n\n<|image|>{QUESTION}<|eot|>"
                           "<|header_start|>assistant<|header_end|>\n\n", "{}<|eot|>"),
    # The generation prompt is `Assistant:` and a turn `Assistant: {text}`: the model writes the space.
    "smolvlm": (smolvlm, {}, "<|im_start|>User: Hi<end_of_utterance>\nAssistant: Hello!<end_of_utterance>\n"
                             f"User:<image>{QUESTION}<end_of_utterance>\nAssistant:", " {}<end_of_utterance>"),
}


def make_chat(family, kwargs=None):
    build, template_kwargs, _, _ = CASES[family]
    tok, stops = build()
    template = _template(family.split("_thinking")[0])
    return chat_from_processor(TextProcessor(tok, template), tok.convert_tokens_to_ids(stops), family,
                               template_kwargs if kwargs is None else kwargs)


def make_record():
    return Record(id="r1", turns=parse_conversation(SAMPLE), image="p.png", chosen=CHOSEN, rejected=REJECTED)


@pytest.mark.parametrize("family", sorted(CASES))
def test_prompt_and_scored_response_are_the_familys_own(family):
    _, _, expected_prompt, expected_response = CASES[family]
    chat = make_chat(family)
    tok = chat.tokenizer
    record = make_record()
    prompt = render_prompt(record, chat)
    if expected_prompt is not None:
        assert prompt == expected_prompt
    else:  # mistral3
        assert prompt.startswith("<s>[SYSTEM_PROMPT]You are Ministral-3-14B-Instruct-2512")
        assert prompt.endswith(f"[/SYSTEM_PROMPT][INST]Hi[/INST]Hello!</s>[INST][IMG]{QUESTION}[/INST]")
    prompt_tokens = tokenize_text(chat.processor, prompt)
    for reply in (CHOSEN, REJECTED):
        ids = response_ids(record, chat, prompt, prompt_tokens, reply)
        assert tok.decode(ids, skip_special_tokens=False) == expected_response.format(reply)
        marker = expected_response.split("}", 1)[1]
        assert ids[-1] == tok.convert_tokens_to_ids(marker) == chat.response_end_id
        full, _ = conversation_text(record, chat, prompt, reply)
        for text in (prompt, full, render_prompt(record, chat, with_image=False)):
            assert "[{" not in text and "'type'" not in text and '"type"' not in text


def test_glm4v_text_turns_are_strings_and_its_turn_ends_with_the_next_user_marker():
    chat = make_chat("glm4v")
    assert chat.text_content == "string"  # its template prints an assistant turn's content as it is
    assert chat.end_of_turn_appended and chat.tokenizer.convert_ids_to_tokens(chat.end_of_turn_id) == "<|user|>"
    assert "(the next turn opens with it; appended)" in chat.describe() and "WARNING" not in chat.describe()
    # Templates that print every part's text keep the parts transformers' processors take.
    assert make_chat("qwen3_vl").text_content == "parts" and not make_chat("qwen3_vl").end_of_turn_appended


def test_gemma4_template_kwargs_reach_every_rendering():
    """enable_thinking: the prompt opens with the thinking switch and its generation prompt has no thought channel,
    so the rendered answer extends the prompt directly; without it, the answer follows the empty channel."""
    plain, thinking = make_chat("gemma4"), make_chat("gemma4_thinking")
    assert plain.template_kwargs == {} and thinking.template_kwargs == {"enable_thinking": True}
    assert plain.template_digest != thinking.template_digest
    record = make_record()
    for chat in (plain, thinking):
        prompt = render_prompt(record, chat)
        full, end = conversation_text(record, chat, prompt, CHOSEN)
        assert full == prompt + CHOSEN + "<turn|>\n" and end == len(prompt) + len(CHOSEN)
    # Given false explicitly, the template renders as with the switch unset.
    explicit = make_chat("gemma4", kwargs={"enable_thinking": False})
    assert render_prompt(record, explicit) == render_prompt(record, plain)


def test_a_template_printing_list_content_as_a_repr_is_refused_naming_the_fix():
    tok, _ = smolvlm()
    # Prints content as it is: a list of parts becomes its Python repr, and an image turn must be a list.
    printing = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<end_of_utterance>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ChatTemplateError, match=r"user turn holding an image.*data\.chat_template=FILE") as err:
        chat_from_processor(TextProcessor(tok, printing))
    assert "'text': 'bpo probe question'" in str(err.value)  # what the template made of the probe
    # JSON is no better than a repr.
    as_json = printing.replace("{{ m.content }}", "{{ m.content | tojson }}")
    with pytest.raises(ChatTemplateError, match="data.chat_template=FILE"):
        chat_from_processor(TextProcessor(tok, as_json))


def test_a_template_printing_text_in_neither_form_is_refused():
    tok, _ = smolvlm()
    # An image turn's parts printed, but a string's text changed and an assistant's list printed whole.
    broken = ("{% for m in messages %}{{ m.role }}: {% if m.content is string %}{{ m.content | upper }}{% else %}"
              "{% for p in m.content %}{% if p.type == 'image' %}<image>{% else %}{{ p.text }}{% endif %}{% endfor %}"
              "{% if m.role == 'assistant' %}{{ m.content }}{% endif %}{% endif %}<end_of_utterance>\n{% endfor %}")
    with pytest.raises(ChatTemplateError, match="neither as a list of parts nor as a string"):
        chat_from_processor(TextProcessor(tok, broken))
