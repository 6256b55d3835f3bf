"""Export of a 2-rank ZeRO-3 checkpoint to a Hugging Face directory, checked against DeepSpeed's own converter."""

import json
import os
import shutil

import pytest
import torch

from jobs import REPO, add_blind, run_job, write_config


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, sample_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = add_blind(os.path.join(sample_data_dir, "train.jsonl"), root / "train_blind.jsonl")
    config = write_config(root / "cfg.yaml", {
        # Relative to the job's working directory (REPO): the run's config.yaml must still name it for export.
        # The vision tower is frozen: exercises frozen fragments.
        "model": {"path": os.path.relpath(tiny_model_dir, REPO), "dtype": "fp32"},
        "data": {"train_file": data, "image_root": os.path.join(sample_data_dir, "images"), "max_length": 160},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "train": {"output_dir": str(root / "run"), "ds_config": os.path.join(REPO, "ds_configs/zero3_cpu.json"),
                  "micro_batch_size": 2, "max_steps": 3, "plot": False, "tensorboard": False},
    })
    run_job("train.py", config)
    return root / "run"


def _reference_state_dict(ckpt_dir):
    """DeepSpeed's own (whole-model, in-memory) converter, with the training wrapper's prefix removed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir))
    return {k[len("model."):]: v for k, v in sd.items()}


def test_round_trip_equals_deepspeed_and_loads(run_dir, tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    from bpo.export.job import export

    out = tmp_path / "hf"
    export(str(run_dir / "checkpoints"), str(out), dtype="fp32", max_shard_size="40KB", progress=False)
    index = json.load(open(out / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (out / name).exists(), name

    reference = _reference_state_dict(run_dir / "checkpoints")
    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    params = dict(model.named_parameters())
    assert set(params) == set(reference)
    for name, value in reference.items():
        assert torch.equal(params[name].data, value), name

    base = dict(AutoModelForImageTextToText.from_pretrained(tiny_model_dir).named_parameters())
    changed = [n for n in params if not torch.equal(params[n].data, base[n].data)]
    assert any("language_model" in n for n in changed)  # training moved the LLM ...
    assert not any("vision_tower" in n for n in changed)  # ... and left the frozen vision tower alone

    # Logits of the exported model equal those of the base model carrying DeepSpeed's state dict.
    twin = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    twin.load_state_dict(reference)
    ids = torch.randint(5, 400, (2, 17))
    torch.testing.assert_close(model(input_ids=ids).logits, twin(input_ids=ids).logits, rtol=0, atol=0)


def test_bf16_export(run_dir, tmp_path):
    from safetensors import safe_open

    from bpo.export.job import export

    out = export(str(run_dir / "checkpoints"), str(tmp_path / "bf16"), dtype="bf16", progress=False)
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    with safe_open(os.path.join(out, "model-00001-of-00001.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


def test_refuses_non_empty_output(run_dir, tmp_path):
    from bpo.export.job import ExportError, export

    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        export(str(run_dir / "checkpoints"), str(out), progress=False)
    with pytest.raises(ExportError, match=f"refusing --force: {out} is not a previous export .*precious.txt"):
        export(str(run_dir / "checkpoints"), str(out), force=True, progress=False)
    assert (out / "precious.txt").read_text() == "mine"


def test_force_replaces_only_a_previous_export(run_dir, tmp_path):
    from bpo.export.job import ExportError, export

    # The run directory holds the checkpoint: `export RUN/checkpoints RUN --force` once deleted the whole run.
    with pytest.raises(ExportError, match=f"refusing --force: {run_dir} holds the checkpoint"):
        export(str(run_dir / "checkpoints"), str(run_dir), force=True, progress=False)
    assert (run_dir / "checkpoints" / "latest").exists() and (run_dir / "metrics.jsonl").exists()
    out = tmp_path / "hf"
    export(str(run_dir / "checkpoints"), str(out), dtype="fp32", progress=False)
    stamp = (out / "config.json").stat().st_mtime_ns
    export(str(run_dir / "checkpoints"), str(out), dtype="bf16", force=True, progress=False)
    assert json.load(open(out / "config.json"))["dtype"] == "bfloat16" and (out / "config.json").stat().st_mtime_ns != stamp


def test_base_model_comes_from_the_run_wherever_export_runs(run_dir, tiny_model_dir, tmp_path, monkeypatch):
    import yaml

    from bpo.export.job import export

    saved = yaml.safe_load(open(run_dir / "config.yaml"))["model"]["path"]
    assert saved == os.path.abspath(tiny_model_dir)  # training ran with a relative model.path
    monkeypatch.chdir(tmp_path)  # not the directory training ran in
    out = export(str(run_dir / "checkpoints"), "hf", dtype="fp32", progress=False)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_bad_base_model_fails_before_any_shard_is_written(run_dir, tmp_path, monkeypatch):
    import safetensors.torch

    from bpo.export.job import ExportError, export

    written = []
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: written.append(a))
    with pytest.raises(ExportError, match=f"base model directory {tmp_path} has no config.json"):
        export(str(run_dir / "checkpoints"), str(tmp_path / "out"), base_model=str(tmp_path), progress=False)
    assert written == [] and not (tmp_path / "out").exists()


def test_killed_export_leaves_nothing_behind_once_rerun(run_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "bpo.export", str(run_dir / "checkpoints"), str(out), "--max-shard-size", "40KB"]
    env = dict(os.environ, BPO_CRASH_AFTER="export_shards:2", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 17 and not out.exists()
    assert os.listdir(tmp_path) != []  # the kill left its partial export (a whole model, at scale)
    env.pop("BPO_CRASH_AFTER")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def _broken_copy(run_dir, tmp_path):
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", ckpt)
    shutil.copy(run_dir / "config.yaml", tmp_path / "config.yaml")
    tag = open(ckpt / "latest").read().strip()
    return ckpt, ckpt / tag


def test_missing_rank_file_is_named(run_dir, tmp_path):
    from bpo.export.job import ExportError, export

    ckpt, tag_dir = _broken_copy(run_dir, tmp_path)
    victim = tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.unlink()
    with pytest.raises(ExportError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        export(str(ckpt), str(tmp_path / "out"), base_model=None, progress=False)
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".export-")]


def test_truncated_rank_file_is_named(run_dir, tmp_path):
    from bpo.export.job import ExportError, export

    ckpt, tag_dir = _broken_copy(run_dir, tmp_path)
    victim = tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        export(str(ckpt), str(tmp_path / "out"), progress=False)


def test_cli_reports_errors_cleanly(run_dir, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "bpo.export", str(tmp_path / "nowhere"), str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "export failed: no checkpoint directory" in proc.stderr
