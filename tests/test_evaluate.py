"""End-to-end evaluation of the tiny model on the sample test set (MMSafe-PO format), 2 ranks, offline judge."""

import json
import os

from jobs import run_job, write_config


def test_evaluation_writes_report(tiny_model_dir, sample_data_dir, tmp_path):
    out = tmp_path / "eval"
    config = write_config(tmp_path / "cfg.yaml", {
        "model": {"path": str(tiny_model_dir), "dtype": "fp32"},
        "decode": {"max_new_tokens": 6, "batch_size": 4},
        "eval": {"test_file": os.path.join(sample_data_dir, "test.json"),
                 "image_root": os.path.join(sample_data_dir, "images"), "output_dir": str(out)},
    })
    proc = run_job("evaluate.py", config)
    assert "| safety rate |" in proc.stdout

    report = json.load(open(out / "report.json"))
    assert report["n"] == 16 and report["format"] == "mmsafe_po"
    assert report["safety"]["parsed"] + report["safety"]["unparsable"] == 16
    assert report["pairwise"]["n"] == 16
    # The evaluated model is its own reference here, so every implicit reward margin is exactly zero.
    assert report["implicit_reward"]["n"] == 16 and report["implicit_reward"]["mean_margin"] == 0.0

    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    test_ids = [r["id"] for r in rows]
    assert len(rows) == 16 and len(set(test_ids)) == 16
    for row in rows:
        assert {"prompt", "response", "verdict", "judge_output", "pairwise_answer", "reward_margin"} <= set(row)
        assert row["prompt"].rstrip().endswith("ASSISTANT:")
    md = open(out / "report.md").read()
    assert "pairwise accuracy" in md and "implicit reward accuracy" in md

    # A rerun finds every generation shard done and rebuilds the same report.
    proc = run_job("evaluate.py", config)
    assert "already done" in proc.stdout
    assert json.load(open(out / "report.json")) == report
