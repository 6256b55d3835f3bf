"""The optimizers DeepSpeed steps: 8-bit AdamW (bitsandbytes) as its client optimizer in 2-rank ZeRO-3 runs on CPU, as
users launch them, and fp32 weights as their own fp32 master."""

import contextlib
import math
import os

import pytest
import torch

from jobs import REPO, add_blind, read_metrics, run_job, write_config

COMPARED = ["loss", "rewards/chosen", "rewards/rejected", "rewards/blind", "logps/chosen", "logps/blind", "grad_norm",
            "lr"]
STEPS = 6


@pytest.fixture(scope="module")
def setup(tiny_model_dir, sample_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("optim")
    data = add_blind(os.path.join(sample_data_dir, "train.jsonl"), root / "train_blind.jsonl")

    def config(name, optim="adamw_8bit", **train):
        return write_config(root / f"{name}.yaml", {
            "model": {"path": str(tiny_model_dir), "dtype": "fp32"},
            "data": {"train_file": data, "image_root": os.path.join(sample_data_dir, "images"), "max_length": 160},
            "optim": {"name": optim, "lr": 1e-2, "warmup_steps": 1},
            "train": {"output_dir": str(root / name), "ds_config": os.path.join(REPO, "ds_configs/zero3_cpu.json"),
                      "micro_batch_size": 2, "grad_accum": 1, "max_steps": STEPS, "save_every": 2,
                      "keep_checkpoints": 1, "plot": False, "tensorboard": False, **train},
        }), str(root / name)

    return config


@pytest.fixture(scope="module")
def full_run(setup):
    config, run_dir = setup("full")
    proc = run_job("train.py", config)
    return run_dir, read_metrics(run_dir), proc.stdout


def test_8bit_run_learns(full_run):
    _, rows, stdout = full_run
    assert "bitsandbytes AdamW8bit" in stdout and "8-bit moments on CPU" in stdout
    assert len(rows) == STEPS
    assert rows[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)  # step 0: policy = reference
    assert sum(r["loss"] for r in rows[-2:]) / 2 < rows[0]["loss"] - 0.1
    assert rows[0]["lr"] == pytest.approx(1e-2)  # the scheduler drives the client optimizer (1 warm-up step)
    assert rows[-1]["lr"] < rows[1]["lr"]  # cosine decay


def test_8bit_state_is_in_the_checkpoint(full_run):
    """Each rank's optimizer file holds uint8 moments for its whole flat partition, with one scale per 256 values."""
    run_dir, _, _ = full_run
    tag = os.path.join(run_dir, "checkpoints", f"step_{STEPS}")
    sizes = []
    for rank in (0, 1):
        path = os.path.join(tag, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        zero = torch.load(path, weights_only=False)["optimizer_state_dict"]  # DeepSpeed's ZeRO-3 state ...
        (partition,) = zero["fp32_flat_groups"]  # ... this rank's fp32 master partition ...
        (state,) = zero["optimizer_state_dict"]["state"].values()  # ... and the client optimizer's state_dict
        quant = state["__bnb_optimizer_quant_state__"]  # where bitsandbytes' state_dict puts its 8-bit tensors
        for moment in ("state1", "state2"):
            assert quant[moment].dtype == torch.uint8 and quant[moment].numel() == partition.numel(), moment
            assert len(torch.unique(quant[moment])) > 16, moment  # real codes, not a zero buffer
        for scale in ("absmax1", "absmax2"):
            assert quant[scale].dtype == torch.float32 and quant[scale].numel() == math.ceil(partition.numel() / 256)
        assert state["step"] == STEPS
        sizes.append(partition.numel())
    assert sizes[0] == sizes[1]  # two halves of the same flat group


def test_8bit_resume_equals_uninterrupted(full_run, setup):
    _, reference_rows, _ = full_run
    config, run_dir = setup("killed")
    proc = run_job("train.py", config, env={"BPO_CRASH_AFTER": "train_steps:3"}, check=False)
    assert proc.returncode != 0 and len(read_metrics(run_dir)) == 3
    run_job("train.py", config, ["--resume"])  # from step 2: the 8-bit moments of steps 1-2 come from the file
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for got, want in zip(rows, reference_rows):
        for key in COMPARED:
            assert got[key] == want[key], (got["step"], key)  # exactly: fp32 on CPU is deterministic


@pytest.mark.skipif(torch.cuda.is_available(), reason="paging is the point on CUDA; this is the CPU fallback")
def test_paged_runs_unpaged_on_cpu():
    """On CPU bitsandbytes has no paged memory: paged_adamw_8bit takes exactly adamw_8bit's steps, and bpo says so."""
    from bpo.config import load_config
    from bpo.optim import build_optimizer, describe

    steps = []
    for name in ("adamw_8bit", "paged_adamw_8bit"):
        cfg = load_config(None, [f"optim.name={name}", "optim.lr=1e-2"])
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(8192))  # one flat partition, as ZeRO-3 hands it over
        optimizer = build_optimizer([p], cfg.optim)
        with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU") if "paged" in name \
                else contextlib.nullcontext():
            for k in range(3):
                p.grad = torch.sin(torch.arange(8192.0) * (k + 1))
                optimizer.step()
        assert optimizer.state[p]["state1"].dtype == torch.uint8
        steps.append(p.detach().clone())
    assert torch.equal(steps[0], steps[1])
    assert "runs it unpaged here" in describe(cfg.optim, {})


def test_client_optimizer_replaces_the_ds_config_section():
    from bpo.config import ConfigError, load_config
    from bpo.train import build_ds_config

    ds = build_ds_config(load_config(None, ["optim.name=adamw_8bit",
                                            f"train.ds_config={REPO}/ds_configs/zero3_cpu.json"]), 2)
    assert "optimizer" not in ds and ds["zero_allow_untested_optimizer"] is True
    assert build_ds_config(load_config(None, [f"train.ds_config={REPO}/ds_configs/zero3.json"]), 2)["optimizer"]
    with pytest.raises(ConfigError, match="optim.name=adamw_8bit keeps 8-bit optimizer states on the device"):
        build_ds_config(load_config(None, ["optim.name=adamw_8bit",
                                           f"train.ds_config={REPO}/ds_configs/zero3_offload.json"]), 2)
    with pytest.raises(ConfigError, match="optim.name must be one of"):
        load_config(None, ["optim.name=adam8"])


def test_fp32_weights_become_their_own_master_and_train_the_same(tmp_path):
    """DeepSpeed's ZeRO-3 keeps a second fp32 copy of fp32 weights (bpo.optim.share_fp32_master); sharing it frees
    4 bytes per parameter and changes no number: two engines from the same start, with and without, train alike."""
    import json
    import subprocess
    import sys

    from jobs import free_port

    out = tmp_path / "probe"
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(free_port()),
                    os.path.join(REPO, "tests", "scripts", "fp32_master_probe.py"), str(out)], check=True, cwd=REPO,
                   env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=REPO),
                   capture_output=True, timeout=600)
    for rank in (0, 1):
        report = json.load(open(f"{out}.rank{rank}"))
        assert report["aliased"] == [True, True]  # both sub-groups of this rank's partition
        # Fails once DeepSpeed reuses fp32 weights itself: then nothing is freed and the workaround can go.
        assert report["freed"] == 4 * report["partition_numel"] == 4 * 804
        assert report["max_update"] > 1e-3  # the weights did train
        assert report["max_difference"] == 0.0  # fp32 on CPU is deterministic: exactly the same steps


def test_share_fp32_master_leaves_a_real_master_alone():
    """bf16 weights need their fp32 master; matching fp32 ones share storage, and the master stays the same object."""
    from types import SimpleNamespace

    from bpo.optim import share_fp32_master

    bf16, fp32 = torch.ones(8, dtype=torch.bfloat16), torch.arange(6.0)
    masters = [bf16.float(), fp32.clone()]
    kept = masters[1]
    zero = SimpleNamespace(fp16_partitioned_groups_flat=[bf16, fp32], fp32_partitioned_groups_flat=masters)
    assert share_fp32_master(zero) == 6 * 4
    assert masters[0].data_ptr() != bf16.data_ptr() and masters[0].dtype == torch.float32
    assert masters[1] is kept and masters[1].data_ptr() == fp32.data_ptr()
    offloaded = SimpleNamespace(fp16_partitioned_groups_flat=[fp32], fp32_partitioned_groups_flat=[fp32.clone()],
                                offload_optimizer=True)
    assert share_fp32_master(offloaded) == 0
    assert share_fp32_master(SimpleNamespace()) == 0  # not a ZeRO-3 optimizer
