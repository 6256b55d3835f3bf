"""The blind-response job: blinded inputs, determinism, rank invariance, resume, and order/field preservation."""

import json
import os

import pytest

from jobs import REPO, run_job, write_config


@pytest.fixture(scope="module")
def setup(tiny_model_dir, sample_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("blind")
    sections = {
        "model": {"path": str(tiny_model_dir), "dtype": "fp32"},
        "data": {"train_file": os.path.join(sample_data_dir, "train.jsonl"),
                 "image_root": os.path.join(sample_data_dir, "images")},
        "decode": {"max_new_tokens": 8, "batch_size": 4},
        "blind": {"batches_per_shard": 1},
    }
    config = write_config(root / "cfg.yaml", sections)
    out = root / "two_ranks.jsonl"
    run_job("generate_blind.py", config, [f"blind.output_file={out}"])
    return root, config, out


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_blinded_prompt_has_no_image(tiny_model_dir, sample_data_dir):
    from bpo.data.chat import load_chat
    from bpo.data.encode import encode_prompt, render_prompt
    from bpo.data.records import load_records

    chat = load_chat(tiny_model_dir)
    processor = chat.processor
    records, _ = load_records(os.path.join(sample_data_dir, "train.jsonl"), os.path.join(sample_data_dir, "images"))
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    for record in records[:6]:
        ids, image_inputs, _ = encode_prompt(record, chat, os.path.join(sample_data_dir, "images"),
                                             with_image=False)
        assert image_token not in ids and image_inputs == {}
        with_image = render_prompt(record, chat, with_image=True)
        blind = render_prompt(record, chat, with_image=False)
        assert "<image>" in with_image and "<image>" not in blind
        assert blind == with_image.replace("<image>\n", "")  # the text, "in the image" included, is unchanged
        full_ids, full_images, _ = encode_prompt(record, chat, os.path.join(sample_data_dir, "images"))
        assert image_token in full_ids and "pixel_values" in full_images


def test_output_keeps_every_record_field_and_order(setup, sample_data_dir):
    _, _, out = setup
    inputs = _rows(os.path.join(sample_data_dir, "train.jsonl"))
    rows = _rows(out)
    assert len(rows) == len(inputs)
    for src, row in zip(inputs, rows):
        assert {k: v for k, v in row.items() if k not in ("blind", "blind_meta", "blind_error")} == src
        assert row["blind"].startswith("ASSISTANT: ") or row.get("blind_error")
        meta = row["blind_meta"]
        assert meta["decode"]["do_sample"] is False and "model" in meta and "tokenizer" in meta
        if row["blind"]:
            # The generated ids are kept; a response that stopped holds its stop token, a cut one is marked.
            assert meta["finish_reason"] in ("stop", "length")
            assert len(meta["token_ids"]) == meta["new_tokens"] + (meta["finish_reason"] == "stop")
            assert (meta["finish_reason"] == "length") == (meta["new_tokens"] == 8)  # the config's max_new_tokens


def test_one_rank_equals_two_ranks_and_reruns_are_identical(setup):
    root, config, out = setup
    one = root / "one_rank.jsonl"
    run_job("generate_blind.py", config, [f"blind.output_file={one}"], nproc=1)
    assert open(one, "rb").read() == open(out, "rb").read()


def test_kill_and_resume_equals_uninterrupted(setup, tmp_path):
    _, config, out = setup
    resumed = tmp_path / "resumed.jsonl"
    proc = run_job("generate_blind.py", config, [f"blind.output_file={resumed}"],
                   env={"BPO_CRASH_AFTER": "blind_shards:2"}, check=False)
    assert proc.returncode != 0 and not resumed.exists()
    parts = sorted(os.listdir(f"{resumed}.parts"))
    assert 2 <= len([p for p in parts if p.startswith("shard_")]) < 12
    proc = run_job("generate_blind.py", config, [f"blind.output_file={resumed}"])
    assert "already done" in proc.stdout
    assert open(resumed, "rb").read() == open(out, "rb").read()


def test_sampling_is_seeded(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from bpo.config import DecodeConfig
    from bpo.data.chat import load_chat
    from bpo.engines.hf import generate_texts

    chat = load_chat(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    prompts = [(chat.tokenizer(text).input_ids, {}, {}) for text in ("USER: Hi there ASSISTANT:", "USER: Yo ASSISTANT:")]
    decode = DecodeConfig(max_new_tokens=12, do_sample=True, temperature=1.5)
    runs = [generate_texts(model, chat, prompts, decode, seed, synced=False)[0] for seed in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_training_with_bpo_needs_blind(tiny_model_dir, sample_data_dir, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", {
        "model": {"path": str(tiny_model_dir), "dtype": "fp32"},
        "data": {"train_file": os.path.join(sample_data_dir, "train.jsonl"),
                 "image_root": os.path.join(sample_data_dir, "images")},
        "train": {"output_dir": str(tmp_path / "run"), "ds_config": os.path.join(REPO, "ds_configs/zero3_cpu.json")},
    })
    proc = run_job("train.py", config, nproc=1, check=False)
    assert proc.returncode != 0 and "generate_blind.py" in proc.stdout + proc.stderr


def test_training_refuses_empty_blind(tiny_model_dir, sample_data_dir, tmp_path):
    from bpo.data.records import load_records

    rows = _rows(os.path.join(sample_data_dir, "train.jsonl"))[:4]
    for row in rows:
        row["blind"] = "ASSISTANT: fine"
    rows[2]["blind"] = ""
    rows[2]["blind_error"] = "empty generation"
    path = tmp_path / "with_empty.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, bad = load_records(str(path), os.path.join(sample_data_dir, "images"))
    assert len(records) == 3 and len(bad) == 1 and "empty blind" in bad[0].reason


def test_unusable_lines_are_kept_with_an_error(tiny_model_dir, sample_data_dir, tmp_path):
    lines = open(os.path.join(sample_data_dir, "train.jsonl")).read().splitlines()[:3]
    broken = json.loads(lines[1])
    broken["question"] = "no role markers at all"
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([lines[0], json.dumps(broken), "{not json", lines[2]]) + "\n")
    out = tmp_path / "out.jsonl"
    config = write_config(tmp_path / "cfg.yaml", {
        "model": {"path": str(tiny_model_dir), "dtype": "fp32"},
        "data": {"image_root": os.path.join(sample_data_dir, "images")},
        "decode": {"max_new_tokens": 4},
        "blind": {"input_file": str(src), "output_file": str(out)},
    })
    proc = run_job("generate_blind.py", config, nproc=1)
    rows = _rows(out)
    assert len(rows) == 4
    assert rows[0]["blind"].startswith("ASSISTANT: ") and rows[3]["blind"].startswith("ASSISTANT: ")
    assert rows[1]["blind"] == "" and "unparsable conversation" in rows[1]["blind_error"]
    assert rows[2]["blind"] == "" and "invalid JSON" in rows[2]["blind_error"] and rows[2]["source"].endswith(":3")
    assert "2 without a blind response" in proc.stdout


def test_inline_images_are_written_as_names_under_the_image_root(tmp_path):
    """A parquet input's output rows are plain JSONL: the extracted image named under data.image_root and the id its
    bytes gave it, so training on the output reads the same record."""
    from types import SimpleNamespace

    from bpo.data.formats import extract_image
    from bpo.generate_blind import as_file_row

    root = tmp_path / "root"
    image = extract_image(b"\x89PNG\r\n\x1a\n not decoded here", str(root / "cache"))
    record = SimpleNamespace(id="0123456789abcdef")
    raw = {"prompt": "p", "image": image, "chosen": "c", "rejected": "r"}
    row = as_file_row(raw, record, str(root), "d.parquet[0]")
    assert row["id"] == record.id and row["image"] == os.path.relpath(image, root)
    assert row["image"].startswith(os.path.join("cache", "images")) and type(row["image"]) is str
    assert as_file_row({"image": "x.png"}, record, str(root), "x") == {"image": "x.png"}
    with pytest.raises(SystemExit, match=r"d.parquet\[0\]: .* set data.image_cache to data.image_root"):
        as_file_row(raw, record, str(tmp_path / "elsewhere"), "d.parquet[0]")
