"""DeepSpeed JSON files hold one source of truth: entries bpo's config decides are "auto" or agree with it."""

import glob
import json
import os

import pytest

from jobs import REPO

from bpo.config import ConfigError, load_config
from bpo.runtime.ds_configs import DS_CONFIGS, INFERENCE, inference_config
from bpo.train import build_ds_config


def _with(tmp_path, change):
    """ds_configs/zero3_cpu.json with `change` applied, written to tmp_path; returns its path."""
    with open(os.path.join(REPO, "ds_configs", "zero3_cpu.json")) as f:
        ds = json.load(f)
    change(ds)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


def test_every_shipped_ds_config_fills_from_the_config():
    """No shipped file sets a value the config also decides: each builds for every dtype."""
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(DS_CONFIGS, "*.json")))
    assert names == ["zero3.json", "zero3_cpu.json", "zero3_inference.json", "zero3_offload.json"]
    for name in set(names) - {"zero3_inference.json"}:
        for dtype in ("bf16", "fp16", "fp32"):
            cfg = load_config(None, [f"train.ds_config={DS_CONFIGS}/{name}", f"model.dtype={dtype}",
                                     "train.micro_batch_size=2", "train.grad_accum=3", "optim.lr=3e-6"])
            ds = build_ds_config(cfg, 4)
            assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
                    ds["train_batch_size"], ds["gradient_clipping"]) == (2, 3, 24, 1.0), name
            assert ds["optimizer"]["params"]["lr"] == 3e-6
            assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (dtype == "bf16", dtype == "fp16"), name


def test_a_literal_that_agrees_stays_and_one_that_disagrees_names_both(tmp_path):
    def literals(ds):
        ds.update(gradient_accumulation_steps=4, train_micro_batch_size_per_gpu=2, train_batch_size=16,
                  gradient_clipping=1.0)
        ds["optimizer"]["params"].update(lr=1e-6, betas=[0.9, 0.999])

    path = _with(tmp_path, literals)
    agreeing = load_config(None, [f"train.ds_config={path}", "train.grad_accum=4", "train.micro_batch_size=2"])
    assert build_ds_config(agreeing, 2)["gradient_accumulation_steps"] == 4
    for overrides, world, message in [
        (["train.grad_accum=8", "train.micro_batch_size=2"], 2,
         "gradient_accumulation_steps is 4 but train.grad_accum is 8"),
        (["train.grad_accum=4", "train.micro_batch_size=1"], 2,
         "train_micro_batch_size_per_gpu is 2 but train.micro_batch_size is 1"),
        (["train.grad_accum=4", "train.micro_batch_size=2"], 4,
         "train_batch_size is 16 but train.micro_batch_size x train.grad_accum x 4 ranks is 32"),
        (["train.grad_accum=4", "train.micro_batch_size=2", "optim.grad_clip=0.5"], 2,
         "gradient_clipping is 1.0 but optim.grad_clip is 0.5"),
        (["train.grad_accum=4", "train.micro_batch_size=2", "optim.lr=2e-6"], 2,
         "optimizer.params.lr is 1e-06 but optim.lr is 2e-06"),
        (["train.grad_accum=4", "train.micro_batch_size=2", "optim.betas=[0.9, 0.95]"], 2,
         r"optimizer.params.betas is \[0.9, 0.999\] but optim.betas is \[0.9, 0.95\]"),
    ]:
        cfg = load_config(None, [f"train.ds_config={path}", *overrides])
        with pytest.raises(ConfigError, match=f"^{path}: {message}; the config decides it: set .* to \"auto\""):
            build_ds_config(cfg, world)


def test_dtype_literal_must_match_model_dtype(tmp_path):
    path = _with(tmp_path, lambda ds: ds.update(bf16={"enabled": True}))
    assert build_ds_config(load_config(None, [f"train.ds_config={path}", "model.dtype=bf16"]), 2)["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="bf16.enabled is True but model.dtype is 'fp32'"):
        build_ds_config(load_config(None, [f"train.ds_config={path}", "model.dtype=fp32"]), 2)


def test_inference_config_is_the_shared_file():
    """ZeRO-3 generation and the reference-cache job read one JSON file, its dtype from model.dtype."""
    ds = inference_config(load_config(None, ["model.dtype=fp16"]).model)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == 1
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (False, True)
    assert os.path.dirname(INFERENCE) == os.path.join(REPO, "ds_configs")
    for module in ("engines/hf.py", "ref_logprobs.py"):  # neither builds a DeepSpeed dict of its own any more
        with open(os.path.join(REPO, "bpo", module)) as f:
            source = f.read()
        assert "inference_config(" in source and '"zero_optimization"' not in source, module
