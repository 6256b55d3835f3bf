"""Encoding through the tiny LLaVA's processor, and the batch layout built from it (bpo.data.encode and .dataset)."""

import dataclasses
import os

import pytest
import torch
from PIL import Image

from bpo.data.conversation import parse_conversation, to_messages
from bpo.data.dataset import PreferenceDataset, cat_padded, collate, split_by_kind
from bpo.data.encode import (
    EncodedExample, PromptTooLong, TemplateError, encode_example, encode_prompt, render_prompt,
)
from bpo.data.records import Record, load_records

IMAGE_TOKENS = 16  # (32 / 8) ** 2 patches of the tiny CLIP tower


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    from bpo.data.chat import load_chat

    return load_chat(tiny_model_dir)


@pytest.fixture(scope="module")
def processor(chat):
    return chat.processor


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (48, 40), (30, 120, 200)).save(root / "p.png")
    return str(root)


def make_record(rid="r1", blind=None, chosen="I can't share that.", rejected="Sure, it is 1 Example Road."):
    turns = parse_conversation("USER: Hi ASSISTANT: Hello! USER: <image>\nWhere does the person in the image live? "
                               "ASSISTANT:")
    return Record(id=rid, turns=turns, image="p.png", chosen=chosen, rejected=rejected, blind=blind)


def test_prompt_tokens_are_the_processor_rendering(chat, processor, image_root):
    record = make_record()
    example = encode_example(record, chat, image_root, max_length=200)
    text = processor.apply_chat_template(to_messages(record.turns), add_generation_prompt=True, tokenize=False)
    assert text == "USER: Hi ASSISTANT: Hello!</s>USER: <image>\nWhere does the person in the image live? ASSISTANT:"
    image = Image.open(os.path.join(image_root, "p.png")).convert("RGB")
    expected = processor(text=[text], images=[image], return_tensors="pt")
    assert example.prompt_ids == expected["input_ids"][0].tolist()
    assert example.prompt_ids.count(processor.image_token_id) == IMAGE_TOKENS
    assert set(example.image_inputs) == {"pixel_values"}
    assert torch.equal(example.image_inputs["pixel_values"], expected["pixel_values"])
    assert example.image_inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert (example.prompt_ids, example.image_inputs.keys()) == (
        encode_prompt(record, chat, image_root)[0], encode_prompt(record, chat, image_root)[1].keys())


def test_response_tokens_are_the_template_suffix(chat, processor, image_root):
    record = make_record(blind="It is a house.")
    example = encode_example(record, chat, image_root, max_length=200)
    assert set(example.response_ids) == {"chosen", "rejected", "blind"}
    assert example.truncated == {"chosen": False, "rejected": False, "blind": False}
    tok = processor.tokenizer
    for kind in ("chosen", "rejected", "blind"):
        # The tiny template answers "ASSISTANT: {reply}</s>", so the suffix after the prompt is " {reply}</s>".
        suffix = f" {getattr(record, kind)}</s>"
        assert example.response_ids[kind] == tok(suffix, add_special_tokens=False)["input_ids"]
        assert example.response_ids[kind][-1] == tok.eos_token_id
    # Responses not asked for, or absent, are left out.
    only = encode_example(make_record(), chat, image_root, 200, responses=("chosen", "blind"))
    assert set(only.response_ids) == {"chosen"}


def test_long_responses_are_cut_at_the_end(chat, image_root):
    record = make_record(rejected="Sure, " + "here is more and more detail, " * 10)
    full = encode_example(record, chat, image_root, max_length=400)
    budget = len(full.response_ids["chosen"]) + 1
    cut = encode_example(record, chat, image_root, max_length=len(full.prompt_ids) + budget)
    assert cut.prompt_ids == full.prompt_ids  # the prompt is never cut
    assert cut.response_ids["chosen"] == full.response_ids["chosen"] and not cut.truncated["chosen"]
    assert cut.response_ids["rejected"] == full.response_ids["rejected"][:budget] and cut.truncated["rejected"]


def test_an_enormous_response_is_cut_before_it_is_tokenised(chat, image_root, monkeypatch):
    """A 20 MB response: tokenised whole it takes minutes and gigabytes, for max_length tokens of it."""
    from bpo.data import encode

    seen = []
    tokenize = encode.tokenize_text
    monkeypatch.setattr(encode, "tokenize_text", lambda p, text: seen.append(len(text)) or tokenize(p, text))
    huge = "Sure, " + "here is more and more detail, " * 700_000  # ~21 MB
    got = encode_example(make_record(rejected=huge), chat, image_root, max_length=200)
    assert max(seen) < 16 * 200 + 2000  # the prompt and MAX_CHARS_PER_TOKEN x max_length of the response
    want = encode_example(make_record(rejected=huge[:100_000]), chat, image_root, max_length=200)
    assert got.response_ids == want.response_ids and got.truncated["rejected"]

    # Cut text that still fits: truncated, and no end-of-turn token after text that did not end there.
    short = encode_example(make_record(rejected="a" * 40), chat, image_root, max_length=200)
    monkeypatch.setattr(encode, "MAX_CHARS_PER_TOKEN", 0.1)  # 20 characters of max_length=200
    cut = encode_example(make_record(rejected="a" * 40), chat, image_root, max_length=200)
    assert cut.truncated["rejected"] and len(cut.response_ids["rejected"]) < len(short.response_ids["rejected"])
    assert cut.response_ids["rejected"][-1] != short.response_ids["rejected"][-1]


def test_prompt_too_long(chat, processor, image_root):
    record = make_record()
    n = len(encode_prompt(record, chat, image_root)[0])
    encode_example(record, chat, image_root, max_length=n + 1)  # one response token fits
    with pytest.raises(PromptTooLong, match=f"record r1: prompt is {n} tokens") as err:
        encode_example(record, chat, image_root, max_length=n)
    assert (err.value.prompt_len, err.value.max_length) == (n, n)


def test_blind_prompt_is_the_same_text_without_the_image(chat, processor, image_root):
    record = make_record()
    with_image = render_prompt(record, chat, with_image=True)
    blind = render_prompt(record, chat, with_image=False)
    assert blind == with_image.replace("<image>\n", "")
    assert "the person in the image" in blind
    ids, image_inputs, fields = encode_prompt(record, chat, image_root, with_image=False)
    assert image_inputs == {} and fields == {}
    assert processor.image_token_id not in ids
    assert ids == processor.tokenizer(blind)["input_ids"]
    example = encode_example(record, chat, image_root, 200, with_image=False)
    assert example.image_inputs == {} and example.prompt_ids == ids


def test_template_that_does_not_extend_the_prompt_is_an_error(chat, processor, image_root):
    class Mismatched:  # renders the prompt differently once a reply is appended
        tokenizer = processor.tokenizer

        def __call__(self, **kwargs):
            return processor(**kwargs)

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            real = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize)
            return real if add_generation_prompt else "SYSTEM: " + real

    with pytest.raises(TemplateError, match="record r1"):
        encode_example(make_record(), dataclasses.replace(chat, processor=Mismatched()), image_root, 200)


def test_collate_layout(chat, processor, image_root):
    examples = [
        encode_example(make_record("a"), chat, image_root, 200),
        encode_example(make_record("b", blind="It is a house."), chat, image_root, 200),
    ]
    pad = processor.tokenizer.pad_token_id
    batch = collate(examples, pad)
    # Rows: chosen a, chosen b, rejected a, rejected b, blind b.
    assert batch["kind"].tolist() == [0, 0, 1, 1, 2]
    assert batch["example_index"].tolist() == [0, 1, 0, 1, 1]
    assert batch["ids"] == ["a", "b"]
    assert batch["has_blind"].tolist() == [False, True]
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][4], examples[1].image_inputs["pixel_values"][0])
    rows = [("chosen", 0), ("chosen", 1), ("rejected", 0), ("rejected", 1), ("blind", 1)]
    width = max(len(examples[i].prompt_ids) + len(examples[i].response_ids[k]) for k, i in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (5, width)
    for r, (kind, i) in enumerate(rows):
        prompt, response = examples[i].prompt_ids, examples[i].response_ids[kind]
        n = len(prompt) + len(response)
        assert batch["input_ids"][r].tolist() == prompt + response + [pad] * (width - n)
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (width - n)
        # Labels are exactly the response tokens, unshifted; prompt and padding are ignored.
        assert batch["labels"][r].tolist() == [-100] * len(prompt) + response + [-100] * (width - n)


def test_collate_concatenates_flattened_patches_once_per_row():
    # Qwen2-VL style: pixel_values are (patches, D) and image_grid_thw (1, 3), one image per example.
    examples = [
        EncodedExample("a", [1, 2], {"pixel_values": torch.ones(4, 6), "image_grid_thw": torch.tensor([[1, 2, 2]])},
                       {"chosen": [3], "rejected": [4]}),
        EncodedExample("b", [1], {"pixel_values": torch.zeros(8, 6), "image_grid_thw": torch.tensor([[1, 2, 4]])},
                       {"chosen": [3, 5], "rejected": [4]}),
    ]
    batch = collate(examples, pad_token_id=0)
    assert batch["pixel_values"].shape == (24, 6)  # rows a, b, a, b
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4], [1, 2, 2], [1, 2, 4]]
    assert batch["has_blind"].tolist() == [False, False]


def testcat_padded_pads_tile_counts():
    # LLaVA-NeXT style: (1, tiles, C, H, W) with a different tile count per image.
    out = cat_padded([torch.ones(1, 3, 2, 4, 4), torch.ones(1, 5, 2, 4, 4)])
    assert out.shape == (2, 5, 2, 4, 4)
    assert out[0, 3:].abs().sum() == 0 and out[1].sum() == 5 * 2 * 4 * 4


def test_split_by_kind_is_differentiable():
    batch = {"kind": torch.tensor([0, 0, 1, 1, 2]), "example_index": torch.tensor([0, 1, 0, 1, 1]), "ids": ["a", "b"]}
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    chosen, rejected, blind = split_by_kind(values, batch)
    assert chosen.tolist() == [1.0, 2.0] and rejected.tolist() == [3.0, 4.0] and blind.tolist() == [0.0, 5.0]
    (chosen.sum() + 2 * rejected.sum() + 3 * blind.sum()).backward()
    assert values.grad.tolist() == [1.0, 1.0, 2.0, 2.0, 3.0]


def test_dataset_over_sample_data(chat, processor, sample_data_dir):
    records, bad = load_records(os.path.join(sample_data_dir, "train.jsonl"),
                                image_root=os.path.join(sample_data_dir, "images"))
    assert bad == []
    dataset = PreferenceDataset(records[:4], chat, os.path.join(sample_data_dir, "images"), max_length=160,
                                responses=("chosen", "rejected"))
    assert len(dataset) == 4
    batch = collate([dataset[i] for i in range(4)], processor.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 8 and batch["pixel_values"].shape == (8, 3, 32, 32)
    assert batch["ids"] == [r.id for r in records[:4]]
    # Every row holds exactly its example's 16 image tokens.
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == [IMAGE_TOKENS] * 8


def test_blind_response_is_scored_as_the_ids_the_model_generated(chat, image_root):
    """Decoding and re-tokenising can change the tokens (a stripped leading space, a non-canonical split); the blind
    job keeps the generated ids, and training scores exactly them when the tokenizer is the same."""
    tok = chat.tokenizer
    generated = tok("It is", add_special_tokens=False)["input_ids"] + tok(" a house.", add_special_tokens=False)[
        "input_ids"] + [chat.response_end_id]  # a split the tokenizer would not make of "It is a house."
    record = make_record(blind="It is a house.")
    retokenized = encode_example(record, chat, image_root, 200).response_ids["blind"]
    assert retokenized != generated
    meta = {"token_ids": generated, "tokenizer": chat.tokenizer_digest, "finish_reason": "stop"}
    record.meta["blind_meta"] = meta
    assert encode_example(record, chat, image_root, 200).response_ids["blind"] == generated
    record.meta["blind_meta"] = dict(meta, tokenizer="another tokenizer")  # ids of another vocabulary: not reused
    assert encode_example(record, chat, image_root, 200).response_ids["blind"] == retokenized
