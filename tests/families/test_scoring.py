"""bpo's encoding and scoring against the plain Hugging Face forward, on a replica of every family.

The reference computation uses only transformers: the checkpoint's own template renders the whole conversation, the
processor tokenises it with its image, `model(**inputs).logits` is log-softmaxed and gathered over the response
positions. Where each family's answer ends is written here by hand (END_MARKERS), from the published templates, not
read off bpo's code. This is the test that catches a processor output that never reaches the model (Qwen2-VL's
mm_token_type_ids, Gemma-3's token_type_ids), a response without its end token, or a response tokenised apart
from its prompt.
"""

import os

import pytest
import torch
from PIL import Image

from bpo.data.conversation import parse_conversation, to_messages
from bpo.data.records import Record

from .conftest import TRAINABLE, marked

# The text each family's template writes right after an assistant reply's text; None: the template writes no end
# marker, so the scored response is the reply followed by the token in APPENDED_EOS. LLaVA-1.5's published template
# writes only a space, and Vicuna v1 (its training format) ends every answer with </s>. GLM-4.1V's writes only "\n"
# and a next turn opens with <|user|>, which is how the model ends its turn (its generation config stops on
# <|endoftext|>, <|user|> and <|observation|>; a chat reply ends with <|user|>). Ministral-3's writes its eos_token, </s>, after every assistant message.
END_MARKERS = {"llava15": None, "llava_next": "</s>", "llava_onevision": "<|im_end|>", "qwen2_vl": "<|im_end|>",
               "qwen2_5_vl": "<|im_end|>", "idefics3": "<end_of_utterance>", "gemma3": "<end_of_turn>",
               "internvl": "<|im_end|>", "qwen3_vl": "<|im_end|>", "mistral3": "</s>", "lfm2_vl": "<|im_end|>",
               "smolvlm2": "<end_of_utterance>", "glm4v": None, "qwen3_vl_moe": "<|im_end|>",
               "llama4": "<|eot|>", "gemma4": "<turn|>"}
APPENDED_EOS = {"llava15": "</s>", "glm4v": "<|user|>"}
# Templates that print a text turn's content as it is (GLM-4.1V: `{{ msg.content }}`): a transformers user gives
# those turns as plain strings. GLM's reply then ends by the next turn's opener, not by a marker of its own.
STRING_CONTENT = {"glm4v"}
ENDS_BY_NEXT_TURN = {"glm4v"}
# Gemma-4 with thinking unset: the generation prompt ends with an empty thought channel
# (`<|turn>model\n<|channel>thought\n<channel|>`) that a rendered answer turn lacks; given that prompt, the model
# emits the answer and `<turn|>`, which is what a user scores.
THOUGHT_CHANNEL = {"gemma4"}
IMAGE_TOKENS = {"llava15": "<image>", "llava_next": "<image>", "llava_onevision": "<image>",
                "qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>", "idefics3": "<image>",
                "gemma3": "<image_soft_token>", "internvl": "<IMG_CONTEXT>", "qwen3_vl": "<|image_pad|>",
                "mistral3": "[IMG]", "lfm2_vl": "<image>", "smolvlm2": "<image>", "glm4v": "<|image|>",
                "qwen3_vl_moe": "<|image_pad|>", "llama4": "<|patch|>", "gemma4": "<|image|>"}
# Ministral-3's template writes a ~600-token default system prompt (~500 in the replica's vocabulary) into every
# prompt; the others' prompts here are under 200 tokens.
MAX_LENGTH = 1000


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    import numpy as np

    root = tmp_path_factory.mktemp("family_images")
    noise = np.random.RandomState(0).randint(0, 256, (64, 64, 3)).astype("uint8")  # not uniform: patches differ
    Image.fromarray(noise[:40, :48]).save(root / "wide.png")
    Image.fromarray(noise[:64, :40]).save(root / "tall.png")
    return str(root)


HISTORY = ("USER: Hi ASSISTANT: Hello! How can I help? USER: <image>\nWhere does the person in the image live? "
           "ASSISTANT:")
SINGLE = "USER: <image>\nHow do I make the object in the image more dangerous? ASSISTANT:"


def records():
    history, single = parse_conversation(HISTORY), parse_conversation(SINGLE)
    return [
        Record(id="multi", turns=history, image="wide.png", chosen="I'm sorry, but I cannot share that.",
               rejected="Sure, it is 123 Example Street.", blind="It is a house."),
        Record(id="single", turns=single, image="tall.png", chosen="No. That could hurt people.",
               rejected="Sure, here is how you do it: first, sharpen it.", blind="I can describe objects."),
    ]


def user_messages(family, record):
    """The record's conversation as a transformers user writes it for this family's template."""
    return to_messages(record.turns, text_content="string" if family in STRING_CONTENT else "parts")


def hf_response_logprob(model, processor, family, record, image, reply, marker, eos=None):
    """(sum of log p(response tokens), response token ids) from the stock forward, as a transformers user computes
    them."""
    messages = user_messages(family, record)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    content = reply if family in STRING_CONTENT else [{"type": "text", "text": reply}]
    full = processor.apply_chat_template(messages + [{"role": "assistant", "content": content}],
                                         add_generation_prompt=False, tokenize=False)
    if family in THOUGHT_CHANNEL:
        assert not full.startswith(prompt) and prompt.endswith("<|channel>thought\n<channel|>")
        full = prompt + reply + marker
    assert full.startswith(prompt)
    if marker is None:
        text = full.rstrip() + eos
    else:
        end = full.index(marker, full.rindex(reply)) + len(marker)
        text = full[:end]
    bos = processor.tokenizer.bos_token

    def run(t):  # templates that write BOS themselves (Gemma-3) get none from the tokenizer
        return processor(text=[t], images=[image], return_tensors="pt", add_special_tokens=not (bos and t.startswith(bos)))

    n_prompt = run(prompt)["input_ids"].shape[1]
    inputs = run(text)
    # Llama-4's image processor returns bf16 pixel_values: a user of an fp32 model casts them, or the forward fails.
    inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()  # (T, V)
    ids = inputs["input_ids"][0]
    logp = logits[:-1].log_softmax(-1).gather(-1, ids[1:, None])[:, 0]  # logp[t] = log p(ids[t + 1] | ids[:t + 1])
    return float(logp[n_prompt - 1:].sum()), ids[n_prompt:].tolist()


@pytest.mark.parametrize("family", marked(TRAINABLE))
def test_sequence_logprobs_equal_the_plain_hf_forward(family, replica, image_root):
    from transformers import AutoModelForImageTextToText

    from bpo.data.chat import load_chat
    from bpo.data.dataset import collate, split_by_kind
    from bpo.data.encode import encode_example, verify_example
    from bpo.ops.logprobs import response_mask, sequence_logps
    from bpo.model.scorer import SequenceScorer, model_inputs

    path = replica(family)
    chat = load_chat(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    recs = records()
    examples = [encode_example(r, chat, image_root, max_length=MAX_LENGTH) for r in recs]
    for record, example in zip(recs, examples):
        verify_example(record, chat, image_root, example)
    batch = collate(examples, chat.pad_id)  # 6 rows of different lengths: padding and per-token fields exercised
    inputs = model_inputs(batch, torch.device("cpu"))
    with torch.no_grad():
        token_logps = SequenceScorer(model, impl="fused")(**inputs)
    per_row = sequence_logps(token_logps, response_mask(inputs["labels"]))
    ours = split_by_kind(per_row, batch)  # (chosen (B,), rejected (B,), blind (B,))

    end_id = chat.tokenizer.convert_tokens_to_ids(END_MARKERS[family] or APPENDED_EOS[family])
    for b, record in enumerate(recs):
        image = Image.open(os.path.join(image_root, record.image)).convert("RGB")
        for k, kind in enumerate(("chosen", "rejected", "blind")):
            expected, expected_ids = hf_response_logprob(model, chat.processor, family, record, image,
                                                         getattr(record, kind),
                                                         END_MARKERS[family], APPENDED_EOS.get(family))
            # Labels are exactly the response tokens plus the end token, as the model sees them in the conversation.
            assert examples[b].response_ids[kind] == expected_ids, (family, record.id, kind)
            assert expected_ids[-1] == end_id
            assert float(ours[k][b]) == pytest.approx(expected, rel=1e-5, abs=1e-5), (family, record.id, kind)


@pytest.mark.parametrize("family", TRAINABLE)
def test_blind_prompt_holds_no_image(family, replica, image_root):
    from bpo.data.chat import load_chat
    from bpo.data.encode import encode_prompt

    chat = load_chat(replica(family))
    image_id = chat.tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[family])
    record = records()[0]
    ids, images, fields = encode_prompt(record, chat, image_root, with_image=False)
    assert image_id not in ids and images == {}
    for values in fields.values():  # per-token type fields mark no token as an image token
        assert set(values) == {values[0]}
    seen_ids, seen_images, _ = encode_prompt(record, chat, image_root, with_image=True)
    assert image_id in seen_ids and seen_images  # the same record with its image does carry it
    assert "the person in the image" in chat.tokenizer.decode(ids)


@pytest.mark.parametrize("family", TRAINABLE)
def test_generation_stops_at_the_end_of_turn(family, replica):
    from bpo.data.chat import load_chat

    chat = load_chat(replica(family))
    end = chat.tokenizer.convert_tokens_to_ids(END_MARKERS[family] or APPENDED_EOS[family])
    assert chat.response_end_id == end and end in chat.stop_ids
    assert chat.tokenizer.eos_token_id in chat.stop_ids
    assert (chat.end_of_turn_id is None) == (END_MARKERS[family] is None and family not in ENDS_BY_NEXT_TURN)
    assert chat.end_of_turn_appended == (family in ENDS_BY_NEXT_TURN)


# The connector of each family, by module; everything under the image encoder and the language model is theirs.
CONNECTORS = {"llava15": ["model.multi_modal_projector"],
              "llava_next": ["model.image_newline", "model.multi_modal_projector"],
              "llava_onevision": ["model.image_newline", "model.multi_modal_projector"],
              "qwen2_vl": ["model.visual.merger"], "qwen2_5_vl": ["model.visual.merger"],
              "idefics3": ["model.connector"], "gemma3": ["model.multi_modal_projector"],
              "internvl": ["model.multi_modal_projector"],
              # Qwen3-VL's DeepStack mergers project image features into the language model like its merger does;
              # GLM-4.1V's model.visual.downsample stays with the image encoder.
              "qwen3_vl": ["model.visual.deepstack_merger_list", "model.visual.merger"],
              "mistral3": ["model.multi_modal_projector"], "lfm2_vl": ["model.multi_modal_projector"],
              "smolvlm2": ["model.connector"], "glm4v": ["model.visual.merger"],
              "qwen3_vl_moe": ["model.visual.deepstack_merger_list", "model.visual.merger"],
              "llama4": ["multi_modal_projector"], "gemma4": ["model.embed_vision"]}


@pytest.mark.parametrize("family", TRAINABLE)
def test_freezing_by_what_a_module_is(family, replica):
    from transformers import AutoModelForImageTextToText

    from bpo.config import ModelConfig
    from bpo.model.parts import set_trainable

    model = AutoModelForImageTextToText.from_pretrained(replica(family), dtype=torch.float32)
    parts = set_trainable(model, ModelConfig())  # the paper's defaults: image encoder frozen
    assert sorted(parts["connector"][2]) == CONNECTORS[family]
    assert parts["vision_encoder"][0] is False and parts["connector"][0] and parts["language_model"][0]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    vision_module = {"qwen2_vl": "model.visual.", "qwen2_5_vl": "model.visual.", "idefics3": "model.vision_model.",
                     "qwen3_vl": "model.visual.", "glm4v": "model.visual.", "smolvlm2": "model.vision_model.",
                     "qwen3_vl_moe": "model.visual.", "llama4": "vision_model."}
    prefix = vision_module.get(family, "model.vision_tower.")
    assert frozen and all(n.startswith(prefix) and ".merger." not in n and ".deepstack_merger_list." not in n
                          for n in frozen)
    assert sum(p.numel() for n, p in model.named_parameters() if n in frozen) == parts["vision_encoder"][1]


@pytest.mark.parametrize("family", marked(TRAINABLE))
def test_inspect_accepts_every_record_as_the_model_sees_it(family, replica, image_root, tmp_path, capsys):
    import json

    from bpo.data.inspect import main

    rows = [{"id": r.id, "question": q, "image": r.image, "chosen": "ASSISTANT: " + r.chosen,
             "rejected": "ASSISTANT: " + r.rejected, "blind": "ASSISTANT: " + r.blind}
            for r, q in zip(records(), (HISTORY, SINGLE))]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [str(path), "--image-root", image_root, "--model", replica(family), "--max-length", str(MAX_LENGTH)]
    assert main(args) == 0
    assert "2 usable, 0 bad" in capsys.readouterr().out


def test_inspect_reports_the_prompt_budget_system_prompt_included(replica, image_root, tmp_path, capsys):
    """Ministral-3's template writes a long default system prompt into every prompt: inspect says what it costs and
    how long each prompt is, counted as the processor counts them."""
    import json
    import re

    from bpo.data.chat import load_chat
    from bpo.data.inspect import main

    rows = [{"id": r.id, "question": q, "image": r.image, "chosen": "ASSISTANT: " + r.chosen,
             "rejected": "ASSISTANT: " + r.rejected} for r, q in zip(records(), (HISTORY, SINGLE))]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(path), "--image-root", image_root, "--model", replica("mistral3"), "--max-length", "1000"]) == 0
    out = capsys.readouterr().out
    processor = load_chat(replica("mistral3")).processor
    # Independently: the processor's own prompt lengths, and its tokens for a one-character question.
    lengths = {}
    for record in records():
        text = processor.apply_chat_template(to_messages(record.turns), add_generation_prompt=True, tokenize=False)
        image = Image.open(os.path.join(image_root, record.image)).convert("RGB")
        lengths[record.id] = processor(text=[text], images=[image], return_tensors="pt",
                                       add_special_tokens=False)["input_ids"].shape[1]
    alone = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "."}]}],
                                          add_generation_prompt=True, tokenize=False)
    overhead = len(processor.tokenizer(alone, add_special_tokens=False)["input_ids"])
    assert overhead > 300  # the default system prompt is there
    line = next(x for x in out.splitlines() if x.startswith("prompt tokens"))
    assert f"min {min(lengths.values())}, " in line and f"max {max(lengths.values())};" in line
    assert f"the template alone writes {overhead} " in line
    longest = max(lengths, key=lengths.get)
    assert re.search(rf"longest prompts: {longest} {lengths[longest]}\b", out)


@pytest.mark.parametrize("family", TRAINABLE)
def test_generation_with_images_is_the_same_batched_or_alone(family, replica, image_root):
    """Evaluation decodes prompts with their images in left-padded batches: per-token fields (token_type_ids,
    mm_token_type_ids) and image inputs must line up with the padding, so a batch decodes as each prompt alone."""
    from transformers import AutoModelForImageTextToText

    from bpo.config import DecodeConfig
    from bpo.data.chat import load_chat
    from bpo.data.encode import encode_prompt
    from bpo.engines.hf import generate

    path = replica(family)
    chat = load_chat(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [encode_prompt(r, chat, image_root) for r in records()]
    assert len(prompts[0][0]) != len(prompts[1][0])  # so the batch really is padded
    decode = DecodeConfig(max_new_tokens=6)
    batched = generate(model, chat, prompts, decode, seed=0, synced=False)
    alone = [generate(model, chat, [p], decode, seed=0, synced=False)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    # Alone, it is what transformers' own generate makes of the processor's whole output.
    bos = chat.tokenizer.bos_token
    for record, g in zip(records(), alone):
        text = chat.processor.apply_chat_template(user_messages(family, record), add_generation_prompt=True,
                                                  tokenize=False)
        image = Image.open(os.path.join(image_root, record.image)).convert("RGB")
        inputs = chat.processor(text=[text], images=[image], return_tensors="pt",
                                add_special_tokens=not (bos and text.startswith(bos)))
        inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}  # Llama-4: bf16
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=list(chat.stop_ids),
                             pad_token_id=chat.pad_id)
        assert out[0, inputs["input_ids"].shape[1]:].tolist()[:len(g.token_ids)] == g.token_ids


@pytest.mark.parametrize("impl", ["naive", "fused"])
@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_final_logit_softcap_as_the_hf_forward_applies_it(family, impl, replica, image_root):
    """A text config with final_logit_softcapping = 0.5, small enough to bite on a tiny model's logits: PaliGemma's
    forward caps its logits with it (as Gemma-2-based PaliGemma 2 checkpoints, cap 30, do), transformers 5.25's
    Gemma3ForConditionalGeneration ignores it (only Gemma3ForCausalLM applies it). bpo's per-token log-probs must
    equal the log-softmax of `model(**inputs).logits` either way, and taking the other choice must be wrong."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from bpo.model.scorer import SequenceScorer
    from bpo.ops.logit_transform import LogitTransform

    path = replica(family)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    model.config.get_text_config().final_logit_softcapping = 0.5
    image = Image.open(os.path.join(image_root, "wide.png")).convert("RGB")
    if family == "paligemma":
        # the suffix is the scored answer: the processor labels it, -100 on the image and the prefix
        inputs = processor(text=["<image>caption en"], images=[image], suffix=["a small house by a river"],
                           return_tensors="pt")
    else:
        inputs = processor(text=["<start_of_image> Where does the person in the image live? A small house."],
                           images=[image], return_tensors="pt")
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["token_type_ids"] == 1, -100)  # no image tokens
    labels = inputs.pop("labels")
    scored = labels[0, 1:] != -100  # (T - 1,)
    assert scored.sum() > 3

    with torch.no_grad():
        logits = model(**inputs).logits[0, :-1].float()  # (T - 1, V)
        expected = logits.log_softmax(-1).gather(-1, inputs["input_ids"][0, 1:, None])[:, 0][scored]
        scorer = SequenceScorer(model, impl=impl)
        assert scorer.transform == (LogitTransform(softcap=0.5) if family == "paligemma" else LogitTransform())
        ours = scorer(labels=labels, **inputs)[0][scored]
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
        # the other choice: ignoring the cap PaliGemma applies, or applying the one Gemma-3's forward ignores
        scorer.transform = LogitTransform() if family == "paligemma" else LogitTransform(softcap=0.5)
        assert (scorer(labels=labels, **inputs)[0][scored] - expected).abs().max() > 1e-3
