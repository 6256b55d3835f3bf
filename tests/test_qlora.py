"""CUDA only: QLoRA (4-bit NF4 base under ZeRO-3) and the paged 8-bit optimizer's resume, on one GPU.

CI machines have no GPU and skip this file; benchmarks/gpu_check.sh runs it on a CUDA box. On CPU the same code
paths are covered where they can be: test_lora.py (LoRA, the merge QLoRA exports take, QLoRA's refusal) and
test_optim.py (8-bit states, exact resume, the paged fallback).
"""

import math
import os

import pytest
import torch

from jobs import REPO, add_blind, read_metrics, run_job, write_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA and paged optimizers need CUDA")
CUDA = {"DS_ACCELERATOR": "cuda"}


@pytest.fixture(scope="module")
def setup(sample_data_dir, tmp_path_factory):
    from bpo.demo.tiny import write_tiny_llava

    root = tmp_path_factory.mktemp("gpu")
    # Wide enough that a flat partition passes bitsandbytes' 1e5-element threshold for paging.
    model = write_tiny_llava(str(root / "model"), hidden_size=128, num_layers=4)
    data = add_blind(os.path.join(sample_data_dir, "train.jsonl"), root / "train_blind.jsonl")

    def config(name, **sections):
        base = {
            "model": {"path": model, "dtype": "bf16", "attn_implementation": "sdpa"},
            "data": {"train_file": data, "image_root": os.path.join(sample_data_dir, "images"), "max_length": 160},
            "optim": {"lr": 1e-2, "warmup_steps": 0},
            "train": {"output_dir": str(root / name), "ds_config": os.path.join(REPO, "ds_configs/zero3.json"),
                      "micro_batch_size": 2, "max_steps": 3, "plot": False, "tensorboard": False},
        }
        for section, values in sections.items():
            base.setdefault(section, {}).update(values)
        return write_config(root / f"{name}.yaml", base), root / name

    return model, config


def test_qlora_trains_adapters_on_a_4bit_base_and_exports(setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from bpo.export.job import PartitionedCheckpoint, export
    from bpo.model.lora import is_adapter_param

    model_dir, config = setup
    cfg, run_dir = config("qlora", model={"finetune": "qlora", "gradient_checkpointing": True},
                          lora={"r": 8, "alpha": 16, "export": "merged"}, optim={"name": "paged_adamw_8bit"},
                          train={"export_16bit": True})
    proc = run_job("train.py", cfg, nproc=1, env=CUDA)
    assert "4-bit NF4 (QLoRA)" in proc.stdout and "reference=policy with adapters off" in proc.stdout
    rows = read_metrics(run_dir)
    assert rows[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-3)  # lora_B = 0: the policy is its 4-bit base
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]

    ckpt = PartitionedCheckpoint(os.path.join(run_dir, "checkpoints", "step_3"))
    assert ckpt.trainable and all(is_adapter_param(n) for n in ckpt.trainable)
    packed = [n for n in ckpt.frozen if ".language_model." in n and n.endswith(".base_layer.weight")]
    assert packed and all(ckpt.shape(n)[1] == 1 for n in packed)  # NF4 blocks, stored (n, 1)
    vision = [n for n in ckpt.frozen if ".vision_tower." in n and n.endswith(".weight") and len(ckpt.shape(n)) == 2]
    assert vision and all(ckpt.shape(n)[1] > 1 for n in vision)  # left in bf16

    ids = torch.randint(5, 400, (2, 13))
    at_end = AutoModelForImageTextToText.from_pretrained(run_dir / "hf_model")  # lora.export=merged, bf16
    with torch.no_grad():
        assert torch.isfinite(at_end(input_ids=ids).logits).all()
    # In fp32: the adapters folded into the base checkpoint compute what PEFT's base + adapter computes.
    merged = AutoModelForImageTextToText.from_pretrained(
        export(str(run_dir / "checkpoints"), str(tmp_path / "merged"), dtype="fp32", merge=True, progress=False),
        dtype=torch.float32).eval()
    adapter = export(str(run_dir / "checkpoints"), str(tmp_path / "adapter"), dtype="fp32", progress=False)
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)


def test_paged_8bit_states_are_paged_again_after_a_resume(setup):
    _, config = setup
    cfg, run_dir = config("paged", optim={"name": "paged_adamw_8bit"}, train={"max_steps": 4, "save_every": 2})
    proc = run_job("train.py", cfg, nproc=1, env={**CUDA, "BPO_CRASH_AFTER": "train_steps:3"}, check=False)
    assert proc.returncode != 0 and len(read_metrics(run_dir)) == 3
    proc = run_job("train.py", cfg, ["--resume"], nproc=1, env=CUDA)
    assert "resumed from step 2 (2 optimizer states back in paged memory)" in proc.stdout
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
