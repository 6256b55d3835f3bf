"""A run's identity: which keys a resume compares, what it refuses and what it records (in-process, no job)."""

import json
import os

import pytest
import yaml

from bpo import run_record
from bpo.config import Config, ConfigError, from_dict


def test_every_training_key_is_math_unless_listed_operational():
    flat = run_record.flat_keys(Config())
    assert set(run_record.OPERATIONAL) <= set(flat), "OPERATIONAL names a key the config no longer has"
    math = set(run_record.math_keys())
    assert math | set(run_record.OPERATIONAL) == set(flat) | {run_record.GLOBAL_BATCH}
    # The reported cases, and the batch shape and schedule, are compared; how often to save is not.
    assert {"loss.beta", "loss.type", "optim.lr", "optim.warmup_steps", "train.global_batch", "train.max_steps",
            "train.seed", "model.path", "data.max_length"} <= math
    assert not {"train.save_every", "train.output_dir", "train.resume"} & math
    assert not {"train.micro_batch_size", "train.grad_accum"} & math  # the split: a resume on other ranks changes it


def test_a_key_added_later_is_math_by_default(monkeypatch):
    import dataclasses

    from bpo import config

    @dataclasses.dataclass
    class Loss(config.LossConfig):
        router_aux_coef: float = 0.0

    @dataclasses.dataclass
    class Cfg(config.Config):
        loss: Loss = dataclasses.field(default_factory=Loss)

    monkeypatch.setattr(run_record, "Config", Cfg)
    assert "loss.router_aux_coef" in run_record.math_keys()


def test_allow_list_names_math_keys_only():
    run_record.check_allow_list(from_dict({}, ["train.resume_allow=[loss.beta, data.contents]"]))
    with pytest.raises(ConfigError, match=r"\['train.save_every'\].*operational keys"):
        run_record.check_allow_list(from_dict({}, ["train.resume_allow=[train.save_every]"]))


def _cfg(tmp_path, *overrides):
    return from_dict({"data": {"train_file": str(tmp_path / "train.jsonl")},
                      "train": {"output_dir": str(tmp_path / "run")}}, overrides)


def test_resume_refuses_each_difference_and_records_allowed_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("BPO_CACHE_DIR", str(tmp_path / "cache"))
    rows = [{"id": str(i), "image": "a.png", "question": "q", "chosen": "c", "rejected": "r"} for i in range(5)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.makedirs(tmp_path / "run")
    notes, changes = run_record.check_resume(_cfg(tmp_path), resuming=False, world=2)
    assert (notes, changes) == ([], [])
    saved = json.loads((tmp_path / "run" / "identity.json").read_text())
    assert saved["data"]["records"] == 5 and saved["config"]["loss.beta"] == 0.1

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    # Two records deleted, beta and lr changed, the objective switched; the save interval too (free), and the
    # accumulation doubled on half the ranks (free: the global batch is the same).
    changed = ("loss.beta=0.5", "optim.lr=1e-4", "loss.type=sft", "train.save_every=7", "train.grad_accum=2")
    with pytest.raises(run_record.ResumeRefused) as e:
        run_record.check_resume(_cfg(tmp_path, *changed), resuming=True, world=1)
    message = str(e.value)
    for line in ("loss.beta: 0.1 -> 0.5", "optim.lr: 1e-06 -> 0.0001", "loss.type: 'bpo' -> 'sft'",
                 "data.contents: '5 records, sha256 "):
        assert line in message
    assert "-> '3 records" in message and "save_every" not in message and "grad_accum" not in message
    assert json.loads((tmp_path / "run" / "identity.json").read_text()) == saved  # a refusal records nothing

    # Allowed: accepted, named, and the new values become the identity the next resume compares with.
    allow = "train.resume_allow=[loss.beta, optim.lr, loss.type, data.contents]"
    notes, changes = run_record.check_resume(_cfg(tmp_path, *changed, allow), resuming=True, world=1)
    assert [k for k, _, _ in changes] == ["loss.beta", "loss.type", "optim.lr", "data.contents"]
    assert any("loss.beta changed, allowed by train.resume_allow: 0.1 -> 0.5" in n for n in notes)
    assert run_record.check_resume(_cfg(tmp_path, *changed), resuming=True, world=1) == ([], [])
    with pytest.raises(run_record.ResumeRefused, match=r"train.global_batch: 2 -> 4"):
        run_record.check_resume(_cfg(tmp_path, *changed), resuming=True, world=2)

    path = run_record.write_history(_cfg(tmp_path, *changed, allow), 2, "resumed from step 4", changes,
                                    argv=["bpo/train.py", "--resume"])
    entry = yaml.safe_load(open(path))
    assert os.path.basename(path).endswith("-start2.yaml") and entry["command"] == ["bpo/train.py", "--resume"]
    assert entry["allowed_changes"][0] == {"key": "loss.beta", "from": 0.1, "to": 0.5}
    assert entry["config"]["loss"]["beta"] == 0.5 and entry["verdict"] == "resumed from step 4"
    assert run_record.next_start(str(tmp_path / "run")) == 3
