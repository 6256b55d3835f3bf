"""Checkpoints: the resume point is chosen by what is on disk, nothing in a checkpoint runs as code, a failed save is
named, and a run saved on 2 ranks resumes on 1 and back.

One real 2-rank run (6 steps, a checkpoint every 2, all kept) is the material: the in-process tests damage copies of
it, the launched ones resume from copies.
"""

import json
import math
import os
import shutil

import pytest
import torch

from jobs import COMPARED, REPO, add_blind, read_metrics, run_job, write_config


@pytest.fixture(scope="module")
def setup(tiny_model_dir, sample_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    data = add_blind(os.path.join(sample_data_dir, "train.jsonl"), root / "train_blind.jsonl")

    def config(name, **train):
        sections = {
            "model": {"path": str(tiny_model_dir), "dtype": "fp32"},
            "data": {"train_file": data, "image_root": os.path.join(sample_data_dir, "images"), "max_length": 160},
            "optim": {"lr": 5e-3, "warmup_steps": 2},
            "train": {"output_dir": str(root / name), "ds_config": os.path.join(REPO, "ds_configs/zero3_cpu.json"),
                      "micro_batch_size": 2, "grad_accum": 2, "max_steps": 6, "save_every": 2,
                      "keep_checkpoints": 0, "plot": False, "tensorboard": False, **train},
        }
        return write_config(root / f"{name}.yaml", sections), root / name

    return config


@pytest.fixture(scope="module")
def base(setup):
    config, run_dir = setup("base")
    run_job("train.py", config)
    return run_dir, read_metrics(run_dir)


def copy_run(run_dir, dst, upto=None):
    """A copy of a run directory holding only the checkpoints (and metrics rows) up to step `upto`."""
    shutil.copytree(run_dir, dst)
    root = dst / "checkpoints"
    if upto is not None:
        for tag in os.listdir(root):
            if tag.startswith("step_") and int(tag[5:]) > upto:
                shutil.rmtree(root / tag)
        rows = [r for r in read_metrics(dst) if r["step"] <= upto]
        (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / "latest").write_text(f"step_{upto}")
    return root


class Payload:
    """Unpickling this creates `path`: what a crafted checkpoint file could do (anything, really)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_payload(tag_dir, rank, marker):
    victim = tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
    states = torch.load(victim, weights_only=True)
    states["buffer_names"] = Payload(str(marker))
    torch.save(states, victim)
    return victim


def test_resume_never_runs_code_from_a_checkpoint(base, setup, tmp_path):
    run_dir, _ = base
    config, evil = setup("evil")
    copy_run(run_dir, evil)
    marker = tmp_path / "payload-ran"
    victim = plant_payload(evil / "checkpoints" / "step_6", 1, marker)
    proc = run_job("train.py", config, ["--resume"], check=False)
    assert proc.returncode != 0
    assert not marker.exists(), "the checkpoint's pickle was executed"
    out = proc.stdout + proc.stderr
    assert f"refusing to resume from {evil / 'checkpoints' / 'step_6'}" in out and str(victim) in out
    assert "io.open" in out  # the refused global is named


def test_deepspeed_loads_are_weights_only(base, tmp_path):
    from bpo.runtime.safe_load import UnsafeCheckpoint, safe_load, weights_only_loads

    run_dir, _ = base
    ckpt = copy_run(run_dir, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    victim = plant_payload(ckpt / "step_6", 0, marker)
    with pytest.raises(UnsafeCheckpoint, match="io.open"):
        safe_load(victim)
    with weights_only_loads():  # what DeepSpeed's engine, universal loader and ds_to_universal call
        with pytest.raises(UnsafeCheckpoint, match=str(victim)):
            torch.load(victim, weights_only=False)
    assert not marker.exists()
    assert torch.load is not None and torch.load.__module__ == "torch.serialization"  # restored after the block
    states = safe_load(ckpt / "step_4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")  # a real one loads
    assert states["optimizer_state_dict"]["partition_count"] == 2


def test_resume_point_is_the_newest_complete_tag(base, tmp_path):
    from bpo.runtime.checkpoint import find_resume_point

    run_dir, _ = base
    root = copy_run(run_dir, tmp_path / "run")
    point, notes = find_resume_point(str(root))
    assert (point.tag, point.step, point.world, notes) == ("step_6", 6, 2, [])

    # `latest` names step_6, but rank 1 never finished it; step_4 has a torn file: step_2 is the one to use.
    (root / "step_6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    torn = root / "step_4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torn.write_bytes(torn.read_bytes()[:5000])
    point, notes = find_resume_point(str(root))
    assert point.tag == "step_2"
    assert "step_6: zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in notes[0]
    assert "step_4: zero_pp_rank_0_mp_rank_00_optim_states.pt is unreadable" in notes[1]

    # An empty `latest` (a kill while an older DeepSpeed wrote it) changes nothing: tags are judged by content.
    (root / "latest").write_text("")
    assert find_resume_point(str(root))[0].tag == "step_2"


def test_damaged_run_is_not_silently_started_over(base, tmp_path):
    from bpo.runtime.checkpoint import CheckpointError, find_resume_point, plan_resume

    run_dir, _ = base
    root = copy_run(run_dir, tmp_path / "run", upto=2)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(step_2\); continue that run with --resume"):
        plan_resume(str(tmp_path / "run"), resume=False)
    (root / "step_2" / "rng_rank1.pt").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint .* although `latest` names step_2"):
        find_resume_point(str(root))
    (root / "latest").unlink()  # never declared complete: a first save that was killed, nothing to keep
    point, notes = find_resume_point(str(root))
    assert point is None and "rng_rank1.pt is missing" in notes[0]


def test_full_disk_names_the_directory_and_keeps_latest(setup):
    config, run_dir = setup("full_disk", max_steps=2)
    tag_dir = run_dir / "checkpoints" / "step_2"
    tag_dir.mkdir(parents=True)
    # Rank 1's optimizer file is written under this temporary name first: /dev/full fails every write with ENOSPC.
    os.symlink("/dev/full", tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt.tmp")
    proc = run_job("train.py", config, ["--resume"], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "incomplete checkpoints only" in out and "starting from step 0" in out  # said, not silent
    assert f"checkpoint {tag_dir} was not saved" in out
    assert f"rank 1: cannot write {tag_dir / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'}" in out
    assert f"GiB free on the filesystem of {tag_dir}" in out
    assert not (run_dir / "checkpoints" / "latest").exists()
    assert "Traceback" not in proc.stdout


def test_resume_on_one_rank_and_back_equals_the_two_rank_run(base, setup, tmp_path):
    """2 ranks -> 1 -> 2, the global batch kept (grad_accum 2 -> 4 -> 2). The 1-rank leg starts from a copy whose
    `latest` is empty and is stopped by the stop file after one step (what the Slurm requeue path does)."""
    from bpo.runtime.checkpoint import check_tag
    from bpo.export.job import PartitionedCheckpoint

    run_dir, want = base
    config, moved = setup("moved", grad_accum=4)
    root = copy_run(run_dir, moved, upto=2)
    (root / "latest").write_text("")
    (moved / "stop_requested").touch()
    proc = run_job("train.py", config, ["--resume"], nproc=1, check=False)
    assert proc.returncode == 75, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from step 2" in proc.stdout and "saved on 2 rank(s)" in proc.stdout
    assert "converting it to DeepSpeed's universal format" in proc.stdout
    assert "stopped on request after step 3 of 6" in proc.stdout
    assert not (moved / "stop_requested").exists()
    assert check_tag(str(root / "step_3")) == (1, None) and (root / "latest").read_text() == "step_3"

    config, _ = setup("moved", grad_accum=2)
    proc = run_job("train.py", config, ["--resume"])
    assert "resuming from step 3" in proc.stdout and "saved on 1 rank(s)" in proc.stdout
    got = read_metrics(moved)
    assert [r["step"] for r in got] == list(range(1, 7))
    assert got[:2] == want[:2]  # copied
    for a, b in zip(want[2:], got[2:]):
        for key in COMPARED:  # a different reduction order across ranks: equal to fp32 rounding, not bit for bit
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    a, b = PartitionedCheckpoint(str(run_dir / "checkpoints" / "step_6")), PartitionedCheckpoint(str(root / "step_6"))
    assert a.names() == b.names()
    for name in a.names():
        torch.testing.assert_close(b.tensor(name), a.tensor(name), rtol=1e-5, atol=1e-6)


def test_a_tag_written_again_drops_what_its_first_writing_left(base, tmp_path):
    from bpo.runtime.checkpoint import _clear_stale, check_tag

    run_dir, _ = base
    root = copy_run(run_dir, tmp_path / "run")
    tag_dir = root / "step_4"
    (tag_dir / "universal").mkdir()  # a converted copy of the old contents: loading it would undo the new save
    (tag_dir / "universal.failed").write_text("x")
    _clear_stale(str(tag_dir), world=1)  # this run has one rank: rank 1's files are another run's
    assert sorted(os.listdir(tag_dir)) == ["rng_rank0.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt",
                                           "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert check_tag(str(root / "step_6")) == (2, None)  # other tags untouched


def changed_config(config, path, edit):
    """A copy of a run's config file with edit(sections) applied."""
    import yaml

    with open(config) as f:
        sections = yaml.safe_load(f)
    edit(sections)
    return write_config(path, sections)


def test_resume_refuses_a_changed_run_and_applies_an_allowed_change(base, setup, tmp_path):
    """Reported: two records deleted, loss.beta and optim.lr changed, the objective switched, and each silently
    taken (the lr silently not). The resume is refused naming each, config.yaml untouched, the refusal kept in the
    history. An allowed lr change then applies from the next step; the metrics rows say which start wrote them; and
    a loss that turns NaN stops the run after train.max_bad_steps, its last finite checkpoint pinned, nothing
    exported."""
    from bpo.runtime.checkpoint import _prune
    from bpo.schedule import lr_multiplier

    from bpo.runtime import run_lock

    run_dir, want = base
    config, run = setup("changed", keep_checkpoints=1, export_16bit=True, max_bad_steps=2)
    root = copy_run(run_dir, run, upto=2)
    before = (run / "config.yaml").read_text()

    # Another job holds the run (here: this process): refused at once on every rank, naming the holder.
    run_lock.acquire(str(run))
    try:
        proc = run_job("train.py", config, ["--resume"], check=False)
    finally:
        run_lock.release(str(run))
    assert proc.returncode != 0 and f"{run} is in use by another job (host " in proc.stdout + proc.stderr
    assert f"pid {os.getpid()}, started 20" in proc.stdout + proc.stderr
    assert os.listdir(run / "history") == os.listdir(run_dir / "history")  # nothing written: base's start only
    fewer = tmp_path / "fewer.jsonl"
    with open(want_data := yaml_value(config, "data", "train_file")) as f:
        fewer.write_text("".join(f.readlines()[2:]))

    def edit(s):
        s["data"]["train_file"] = str(fewer)
        s["loss"] = {"beta": 0.5, "type": "dpo"}
        s["optim"]["lr"] = 1e-3

    proc = run_job("train.py", changed_config(config, tmp_path / "all.yaml", edit), ["--resume"], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"refusing to resume {run}" in out
    for line in ("loss.beta: 0.1 -> 0.5", "loss.type: 'bpo' -> 'dpo'", "optim.lr: 0.005 -> 0.001",
                 f"data.train_file: '{want_data}' -> '{fewer}'", "data.contents: '48 records, sha256 ",
                 "-> '46 records, sha256 "):
        assert line in out, line
    assert "Traceback" not in proc.stdout
    assert (run / "config.yaml").read_text() == before

    # Only the lr changed, and allowed; the save interval too (free). A NaN loss from step 5: steps 5-6 are bad.
    lower = changed_config(config, tmp_path / "lr.yaml", lambda s: s["optim"].update(lr=1e-3))
    proc = run_job("train.py", lower, ["--resume", "--allow-change", "optim.lr", "train.save_every=2"],
                   env={"BPO_NAN_LOSS": "5"}, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "resume: optim.lr changed, allowed by train.resume_allow: 0.005 -> 0.001" in out
    rows = read_metrics(run)
    assert [(r["step"], r["start"]) for r in rows] == [(1, 1), (2, 1), (3, 3), (4, 3), (5, 3), (6, 3)]
    assert rows[:2] == want[:2]
    for r in rows[2:5]:  # the new peak lr on the old schedule, not the checkpoint's
        assert r["lr"] == pytest.approx(1e-3 * lr_multiplier(r["step"] - 1, 6, 2)), r["step"]
    assert rows[5]["lr"] == rows[4]["lr"]  # DeepSpeed skipped step 5's update: the schedule did not move either
    # The NaN reaches the gradients only (the logged loss is the metrics'): ZeRO-3 reports the norm as inf.
    assert [math.isinf(r["grad_norm"]) for r in rows] == [False] * 4 + [True] * 2
    assert (f"training diverged: loss or gradient norm not finite for 2 consecutive steps (train.max_bad_steps), "
            f"steps 5-6; the last finite checkpoint, {root}/step_4, is kept out of rotation") in out
    assert sorted(t for t in os.listdir(root) if t.startswith("step_")) == ["step_4"]  # step_2 rotated out
    assert (root / "step_4" / "pinned").exists() and not (run / "hf_model").exists()
    (root / "step_8").mkdir()
    _prune(str(root), keep=1, current=8)  # a later save: the pinned tag stays
    assert sorted(t for t in os.listdir(root) if t.startswith("step_")) == ["step_4", "step_8"]

    history = sorted(os.listdir(run / "history"))
    assert [h.rsplit("-", 1)[1] for h in history] == ["start1.yaml", "start2.yaml", "start3.yaml"]
    entries = [yaml_load(run / "history" / h) for h in history]
    assert entries[1]["verdict"].startswith(f"refused: refusing to resume {run}")
    assert entries[1]["config"]["loss"]["beta"] == 0.5 and "--resume" in entries[1]["command"]
    assert entries[2]["allowed_changes"] == [{"key": "optim.lr", "from": 0.005, "to": 0.001}]
    assert entries[2]["verdict"] == "resumed from step 2"
    assert yaml_load(run / "config.yaml")["optim"]["lr"] == 0.001  # what the run uses now
    assert (run / ".lock").read_text() == ""  # released at exit


def yaml_load(path):
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def yaml_value(config, section, key):
    return yaml_load(config)[section][key]
