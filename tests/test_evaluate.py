"""End-to-end evaluation of the tiny model on the sample test set (MMSafe-PO format), 2 ranks, offline judge."""

import json
import os

import pytest

from jobs import run_job, write_config

LONG_ID = "long-prompt"


def with_long_prompt(src, dst):
    """The 16 sample test examples plus one whose prompt alone exceeds max_length=200."""
    rows = json.load(open(src))
    long = dict(rows[0], prompt="USER: <image>\n" + "Where is the building in the image? " * 40 + "ASSISTANT:",
                id=LONG_ID)
    dst.write_text(json.dumps(rows + [long]))
    return str(dst)


def test_evaluation_writes_report(tiny_model_dir, sample_data_dir, tmp_path):
    out = tmp_path / "eval"
    config = write_config(tmp_path / "cfg.yaml", {
        "model": {"path": str(tiny_model_dir), "dtype": "fp32"},
        # The long prompt cannot be scored under max_length: skip_bad leaves it out of reward accuracy only.
        "data": {"max_length": 200, "skip_bad": True},
        "decode": {"max_new_tokens": 6, "batch_size": 4},
        "eval": {"test_file": with_long_prompt(os.path.join(sample_data_dir, "test.json"), tmp_path / "test.json"),
                 "image_root": os.path.join(sample_data_dir, "images"), "output_dir": str(out)},
    })
    proc = run_job("evaluate.py", config)
    assert "| safety rate |" in proc.stdout
    assert f"(id {LONG_ID}): prompt too long" in proc.stdout

    report = json.load(open(out / "report.json"))
    assert report["n"] == 17 and report["format"] == "mmsafe_po"
    assert report["safety"]["parsed"] + report["safety"]["unparsable"] == 17
    assert report["pairwise"]["n"] == 17
    # The evaluated model is its own reference here, so every implicit reward margin is exactly zero.
    assert report["implicit_reward"]["n"] == 16 and report["implicit_reward"]["mean_margin"] == 0.0
    assert report["implicit_reward"]["not_scored"] == 1

    # The modality probe (eval.modality_probe, on by default): every example asked again with its image withheld.
    probe = report["modality_probe"]
    assert probe["overall"]["with_image"]["n"] == probe["overall"]["image_withheld"]["n"] == 17
    assert set(probe) == {"overall", "dangerous behavior", "illegal activity", "privacy"}  # per record `type`

    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    test_ids = [r["id"] for r in rows]
    assert len(rows) == 34 and len(set(test_ids)) == 34
    for row in rows:
        withheld = row["id"].endswith("#no_image")
        assert {"prompt", "response", "verdict", "judge_output"} <= set(row)
        assert ("pairwise_answer" in row) == (not withheld) and (row["image"] is None) == withheld
        assert ("reward_margin" in row) == (row["id"] != LONG_ID and not withheld)
        assert row["prompt"].rstrip().endswith("ASSISTANT:")
    md = open(out / "report.md").read()
    assert "pairwise accuracy" in md and "implicit reward accuracy" in md and "1 left out by data.skip_bad" in md
    assert "Modality probe" in md

    # A rerun finds every generation shard done and rebuilds the same report.
    proc = run_job("evaluate.py", config)
    assert "already done" in proc.stdout
    assert json.load(open(out / "report.json")) == report


def test_a_prompt_too_long_to_score_stops_evaluation_before_generating(tiny_model_dir, sample_data_dir, tmp_path):
    from bpo.config import from_dict
    from bpo.data.chat import load_chat
    from bpo.data.records import RecordError
    from bpo.evaluate import load_examples, reward_examples

    test_file = with_long_prompt(os.path.join(sample_data_dir, "test.json"), tmp_path / "test.json")
    cfg = from_dict({"data": {"max_length": 200}, "eval": {"test_file": test_file}})
    examples = load_examples(cfg.eval, os.path.join(sample_data_dir, "images"), cfg.data)
    with pytest.raises(RecordError, match=rf"{test_file}\[16\] \(id {LONG_ID}\): prompt too long: \d+ tokens"):
        reward_examples(examples, cfg, load_chat(tiny_model_dir))
