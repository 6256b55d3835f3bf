import json
import os

from PIL import Image

from bpo.data.conversation import parse_conversation
from bpo.data.records import load_records
from bpo.demo.sample_data import main, write_sample_data


def read_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_same_arguments_same_bytes(tmp_path, sample_data_dir):
    again = write_sample_data(tmp_path / "again")
    assert read_tree(again) == read_tree(sample_data_dir)
    other = write_sample_data(tmp_path / "other", seed=1)
    assert read_tree(other)["train.jsonl"] != read_tree(sample_data_dir)["train.jsonl"]


def test_layout_and_variants(sample_data_dir):
    images = os.path.join(sample_data_dir, "images")
    assert sorted(os.listdir(sample_data_dir)) == ["images", "test.json", "train.jsonl"]
    assert len(os.listdir(images)) == 48 + 16
    with open(os.path.join(sample_data_dir, "train.jsonl")) as f:
        train = [json.loads(line) for line in f]
    with open(os.path.join(sample_data_dir, "test.json")) as f:
        test = json.load(f)
    meta = {"type", "entity", "entity_type", "replacement", "text_prompt", "mid_prompt"}
    assert all({"id", "question", "image", "chosen", "rejected"} | meta == set(r) for r in train)
    assert all({"prompt", "image", "chosen", "rejected"} | meta == set(r) for r in test)
    for row in train + test:
        assert row["chosen"].startswith("ASSISTANT: ") and row["rejected"].startswith("ASSISTANT: ")
        assert len(row["chosen"].split()) < 26 and len(row["rejected"].split()) < 26  # prefix + under 25 words
        with Image.open(os.path.join(images, row["image"])) as im:
            assert im.size == (48, 40) and im.format == "PNG"

    turns = [parse_conversation(r["question"]) for r in train]
    assert sum(len(t) > 1 for t in turns) >= 12
    assert any("USER:" in x.text for t in turns for x in t)
    assert any("ASSISTANT:" in x.text for t in turns for x in t if x.role == "user")
    assert any(t[0].has_image and len(t) > 1 for t in turns)  # image in a non-last turn


def test_loads_without_bad_records(sample_data_dir):
    for name in ("train.jsonl", "test.json"):
        records, bad = load_records(os.path.join(sample_data_dir, name), os.path.join(sample_data_dir, "images"))
        assert bad == [] and records
        assert len({r.id for r in records}) == len(records)
        assert all(r.blind is None for r in records)
        assert all(r.chosen != r.rejected for r in records)


def test_cli_overwrites_atomically(tmp_path, capsys):
    out = tmp_path / "data"
    main([str(out), "--n-train", "3", "--n-test", "2"])
    main([str(out), "--n-train", "4", "--n-test", "1", "--seed", "5"])
    assert "wrote 4 train and 1 test records" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no temporary directories left behind
    with open(out / "train.jsonl") as f:
        assert len(f.readlines()) == 4
    assert len(os.listdir(out / "images")) == 5
