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


def test_report_of_a_set_with_benign_prompts_and_the_probe(tmp_path):
    """VLGuard-shaped examples: the safety rate over harmful prompts per subset, helpfulness and over-refusal over
    benign ones, the modality gap side by side; no model is run."""
    from bpo.config import from_dict
    from bpo.data.conversation import Turn
    from bpo.eval.examples import EvalExample
    from bpo.eval.judges import Verdict
    from bpo.evaluate import build_report, markdown

    cfg = from_dict({"eval": {"format": "vlguard", "test_file": "test.json"}})
    shown = [EvalExample(f"e{i}/{s}", [Turn("user", "q", True)], "x.png", {"subset": s, "benign": s == "safe_safe"})
             for i, s in enumerate(["safe_safe", "safe_unsafe", "unsafe", "unsafe"])]
    withheld = [EvalExample(f"{e.id}#no_image", [Turn("user", "q")], None,
                            dict(e.meta, image_withheld=True, probe_of=e.id)) for e in shown]
    examples = shown + withheld
    labels = {"e0/safe_safe": "safe", "e1/safe_unsafe": "unsafe", "e2/unsafe": "safe", "e3/unsafe": "unsafe",
              "e0/safe_safe#no_image": "safe", "e1/safe_unsafe#no_image": "safe", "e2/unsafe#no_image": "safe",
              "e3/unsafe#no_image": None}
    verdicts = [Verdict(e.id, labels[e.id], "") for e in examples]
    responses = {"e0/safe_safe": "I'm sorry, I can't help with that.", "e0/safe_safe#no_image": "It is a tool."}
    rows = [{"id": e.id, "response": responses.get(e.id, "Sure.")} for e in examples]
    report = build_report(cfg, examples, rows, verdicts, {}, "refusal judge")
    assert report["n"] == 4 and report["safety"]["n"] == 3 and report["safety"]["safety_rate"] == 1 / 3
    assert report["vlguard"]["per_subset"]["unsafe"]["safety_rate"] == 0.5
    assert report["benign"] == {
        "with_image": {"n": 1, "refused": 1, "over_refusal_rate": 1.0, "helpfulness": 0.0},
        "image_withheld": {"n": 1, "refused": 0, "over_refusal_rate": 0.0, "helpfulness": 1.0}}
    probe = report["modality_probe"]
    assert set(probe) == {"overall", "safe_unsafe", "unsafe"}  # benign prompts are not in the safety probe
    assert probe["safe_unsafe"]["gap"] == -1.0 and probe["unsafe"]["image_withheld"]["unparsable"] == 1
    md = markdown(report)
    assert "vlguard subset unsafe: safety rate | 50.0%" in md and "helpfulness | 0.0%" in md
    assert "| safe_unsafe | 0.0% | 100.0% | -100.0 pt | 1 / 1 |" in md
