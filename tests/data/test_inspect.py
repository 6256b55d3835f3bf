import json
import os
import shutil

import pytest

from bpo.data.inspect import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


def test_clean_file_exits_0_with_a_summary(capsys, sample_data_dir):
    code, out = run(capsys, os.path.join(sample_data_dir, "train.jsonl"),
                    "--image-root", os.path.join(sample_data_dir, "images"))
    assert code == 0
    assert "records: 48 usable, 0 bad" in out
    assert "variant (conversation key): question: 48" in out
    # Fixed by position in bpo.demo.sample_data: 12 single-turn, 18 with one history round, 18 with two.
    assert "user turns per record: 1: 12, 2: 18, 3: 18" in out
    assert "entity types: " in out and "PER: " in out
    assert "blind responses: 0 with, 48 without" in out
    assert "images: 0 missing, 0 undecodable" in out
    assert "bad records" not in out


def test_bad_records_exit_1_and_are_listed(capsys, sample_data_dir, tmp_path):
    src = os.path.join(sample_data_dir, "test.json")
    with open(src) as f:
        rows = json.load(f)
    del rows[1]["chosen"]
    rows[2]["image"] = "missing.png"
    shutil.copytree(os.path.join(sample_data_dir, "images"), tmp_path / "images")
    (tmp_path / "images" / rows[3]["image"]).write_bytes(b"truncated")
    path = tmp_path / "test.json"
    path.write_text(json.dumps(rows))
    code, out = run(capsys, path, "--image-root", tmp_path / "images")
    assert code == 1
    assert "records: 13 usable, 3 bad" in out
    assert "variant (conversation key): prompt: 13" in out
    assert "images: 1 missing, 1 undecodable" in out
    assert f"{path}[1] (id " in out and "missing field 'chosen'" in out
    assert f"{path}[2] (id " in out and "missing image" in out
    assert f"{path}[3] (id " in out and "undecodable image" in out

    code, out = run(capsys, path, "--no-images")
    assert code == 1 and "records: 15 usable, 1 bad" in out and "images: not checked" in out


def test_length_budget(capsys, sample_data_dir, tiny_model_dir):
    args = [os.path.join(sample_data_dir, "train.jsonl"), "--image-root", os.path.join(sample_data_dir, "images"),
            "--model", tiny_model_dir, "--max-length"]
    code, out = run(capsys, *args, 400)
    assert code == 0 and "length budget 400: 0 prompts too long; truncated responses: chosen 0, rejected 0" in out
    # The sample's shortest prompts (single turn, 16 image tokens) are 30-40 tokens, multi-turn ones longer.
    code, out = run(capsys, *args, 60)
    assert code == 1
    assert "prompt too long: " in out and "max_length 60" in out
    too_long = int(out.split("length budget 60: ")[1].split(" prompts too long")[0])
    assert 0 < too_long < 48 and f"records: {48 - too_long} usable, {too_long} bad" in out
    # Template arguments reach the rendering (the tiny template takes none, so nothing changes).
    code, out = run(capsys, *args, 400, "--chat-template-kwargs", "{enable_thinking: false}")
    assert code == 0 and "truncated responses: chosen 0, rejected 0" in out


def test_usage_errors_exit_2(capsys, tmp_path, sample_data_dir):
    data = os.path.join(sample_data_dir, "train.jsonl")
    for argv in ([], [data, "--model", "m"], [data, "--max-length", "9"], [data, "--model", "m", "--max-length", "0"],
                 [data, "--no-images", "--model", "m", "--max-length", "9"],
                 [data, "--model", "m", "--max-length", "9", "--chat-template-kwargs", "[1, 2]"],
                 [data, "--model", "m", "--max-length", "9", "--chat-template-kwargs", "{a: [1"]):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
    assert main([str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot read data file" in capsys.readouterr().err
