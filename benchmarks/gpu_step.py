"""A BPO training step of a ~1B vision-language model on one GPU: rows vs shared-prompt layout (SDPA with a dense
mask, FlexAttention with a block mask), with MFU.

    python benchmarks/gpu_step.py [--hidden-size 2048 --num-layers 16 --steps 6] [--out FILE]
    python benchmarks/gpu_step.py --cpu --hidden-size 64 --num-layers 2 --steps 2     # smoke run of the script

A bpo.demo.tiny LLaVA widened to ~1B parameters (random weights; 576 image tokens per 336-pixel image) on the step
benchmark's MMSafe-PO-shaped data (benchmarks/step_bench.py), bf16, ZeRO-3 on one rank, cached reference log-probs
(built first by bpo/ref_logprobs.py), 4 examples per step. MFU counts the model FLOPs the step needs, 6 x trained
parameters per computed token (forward 2, backward 4), against the card's dense bf16 peak (--peak-tflops, or a table
of known cards). Tokens are what the forward computes, padding excluded, so the shared layout does the same useful
work in fewer tokens: compare step times, and MFU within a layout.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

from jobs import read_metrics, run_job, write_config  # noqa: E402
from record import machine, markdown_table  # noqa: E402
from step_bench import write_data  # noqa: E402

LAYOUTS = {  # name -> overrides
    "rows, sdpa": ["loss.scoring=rows", "model.attn_implementation=sdpa"],
    "shared, sdpa (dense mask)": ["loss.scoring=shared", "model.attn_implementation=sdpa"],
    "shared, flex_attention (block mask)": ["loss.scoring=shared", "model.attn_implementation=flex_attention"],
}
PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10G": 125, "L4": 121}  # dense, no sparsity


def trained_parameters(model_dir):
    """Parameters the paper's setting trains (connector + language model), counted on a weightless copy."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from bpo.config import ModelConfig
    from bpo.model.parts import set_trainable

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir))
    parts = set_trainable(model, ModelConfig())
    return sum(count for trained, count, _ in parts.values() if trained)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--num-layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--cpu", action="store_true", help="run on CPU in fp32 (to check the script itself)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    import torch

    from bpo.demo.sample_data import write_sample_data
    from bpo.demo.tiny import write_tiny_llava

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --cpu to check the script on CPU")
    peak = args.peak_tflops
    if peak is None and not args.cpu:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    root = tempfile.mkdtemp(prefix="gpustep-")
    model = write_tiny_llava(os.path.join(root, "model"), hidden_size=args.hidden_size, num_layers=args.num_layers,
                             image_size=336, patch_size=14)
    data_dir = write_sample_data(os.path.join(root, "data"))
    data = write_data(model, data_dir, os.path.join(root, "train.jsonl"), n=4 * (args.steps + 1))
    config = write_config(os.path.join(root, "cfg.yaml"), {
        "model": {"path": model, "dtype": "fp32" if args.cpu else "bf16"},
        "data": {"train_file": data, "image_root": os.path.join(data_dir, "images"), "max_length": 2048},
        "optim": {"lr": 1e-6, "warmup_steps": 0},
        "train": {"ds_config": os.path.join(ROOT, "ds_configs", "zero3_cpu.json" if args.cpu else "zero3.json"),
                  "micro_batch_size": 4, "grad_accum": 1, "max_steps": args.steps + 1, "plot": False,
                  "tensorboard": False, "ref_cache": os.path.join(root, "cache")},
        "cache": {"output_dir": os.path.join(root, "cache"), "batch_size": 4},
    })
    env = {} if args.cpu else {"DS_ACCELERATOR": "cuda"}
    run_job("ref_logprobs.py", config, nproc=1, env=env, timeout=1800)
    trained = trained_parameters(model)
    rows = []
    for layout, overrides in LAYOUTS.items():
        out = os.path.join(root, str(len(rows)))
        run_job("train.py", config, [f"train.output_dir={out}", *overrides], nproc=1, env=env, timeout=1800)
        metrics = read_metrics(out)[1:]  # the first step carries warm-up
        step = statistics.median(m["step_time"] for m in metrics)
        tokens = statistics.median(m["tokens"] for m in metrics)
        flops = 6 * trained * tokens / step
        mfu = f"{100 * flops / (peak * 1e12):.1f}%" if peak else "n/a"
        rows.append([layout, f"{step:.3f}", f"{tokens:.0f}", f"{tokens / step:.0f}", f"{flops / 1e12:.1f}", mfu,
                     f"{max(m['peak_mem_mb'] for m in metrics) / 1024:.1f}"])
    table = markdown_table(["layout", "step (s, median)", "tokens / step", "tokens / s", "model TFLOP/s", "MFU",
                            "peak memory (GiB)"], rows)
    table += (f"\n\n{trained / 1e9:.2f}B trained parameters (hidden {args.hidden_size}, {args.num_layers} layers), "
              f"4 examples per step, {args.steps} measured steps, {'fp32 CPU' if args.cpu else 'bf16'}, cached "
              f"reference; {machine(cuda=not args.cpu)}; peak {peak} TFLOP/s.")
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    json.dump({"rows": rows}, open(os.path.join(root, "result.json"), "w"))


if __name__ == "__main__":
    main()
