"""Live reference vs cached reference log-probs: step time and peak memory per rank, and the caching pass itself.

    python benchmarks/ref_cache_bench.py [--hidden-size 512 --num-layers 8 --steps 8]

Builds a ~20M-parameter LLaVA with bpo.demo.tiny (random weights), the sample data with fixed blind responses, then runs
2-rank ZeRO-3 training on CPU twice (live frozen reference engine; `train.ref_cache`) and the caching job once. Step
time is the median over steps after the first; peak memory is rank 0's max resident set (both ranks are symmetric).
Writes its table into BENCHMARKS.md.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

from jobs import add_blind, read_metrics, run_job, write_config  # noqa: E402
from record import markdown_table, update_section  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from bpo.demo.sample_data import write_sample_data
    from bpo.demo.tiny import write_tiny_llava

    root = tempfile.mkdtemp(prefix="refbench-")
    model = write_tiny_llava(os.path.join(root, "model"), hidden_size=args.hidden_size, num_layers=args.num_layers)
    data_dir = write_sample_data(os.path.join(root, "data"))
    data = add_blind(os.path.join(data_dir, "train.jsonl"), os.path.join(root, "train_blind.jsonl"))
    from safetensors import safe_open

    with safe_open(os.path.join(model, "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    config = write_config(os.path.join(root, "cfg.yaml"), {
        "model": {"path": model, "dtype": "fp32"},
        "data": {"train_file": data, "image_root": os.path.join(data_dir, "images"), "max_length": 160},
        "optim": {"lr": 1e-5},
        "train": {"ds_config": os.path.join(ROOT, "ds_configs/zero3_cpu.json"), "micro_batch_size": 2,
                  "grad_accum": 1, "max_steps": args.steps, "plot": False, "tensorboard": False},
        "cache": {"output_dir": os.path.join(root, "cache"), "batch_size": 2},
    })

    def train(name, extra=()):
        out = os.path.join(root, name)
        run_job("train.py", config, [f"train.output_dir={out}", *extra])
        rows = read_metrics(out)
        return statistics.median(r["step_time"] for r in rows[1:]), max(r["peak_mem_mb"] for r in rows)

    live_time, live_mem = train("live")
    t0 = time.time()
    run_job("ref_logprobs.py", config)
    cache_wall = time.time() - t0
    cached_time, cached_mem = train("cached", [f"train.ref_cache={os.path.join(root, 'cache')}"])
    n_examples = json.load(open(os.path.join(root, "cache", "manifest.json")))["num_examples"]

    table = markdown_table(
        ["reference", "step time (s, median)", "peak RSS rank 0 (MiB)", "vs live"],
        [["live ZeRO-3 engine", f"{live_time:.3f}", f"{live_mem:.0f}", "1.00x"],
         ["cached log-probs", f"{cached_time:.3f}", f"{cached_mem:.0f}", f"{cached_time / live_time:.2f}x time"]])
    table += (f"\n\nModel: {n_params / 1e6:.1f}M parameters (hidden {args.hidden_size}, {args.num_layers} layers), "
              f"2 ranks, micro-batch 2 examples = 6 sequences, {args.steps} steps. Caching pass: {n_examples} "
              f"examples in {cache_wall:.1f}s wall including process start ({n_examples / cache_wall:.1f} ex/s).")
    print(table)
    if not args.no_record:
        update_section("ref_cache", "Reference cache: live vs cached reference (benchmarks/ref_cache_bench.py)",
                       "python benchmarks/ref_cache_bench.py", table)
    subprocess.run(["rm", "-rf", root])


if __name__ == "__main__":
    main()
