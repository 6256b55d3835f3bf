"""Peak memory of exporting a ZeRO-3 checkpoint: bpo.export (streaming) vs DeepSpeed's in-memory converter.

    python benchmarks/export_bench.py [--sizes 512x8,1024x16]

For each model size (hidden x layers of a bpo.tiny LLaVA), writes a 2-rank ZeRO-3 checkpoint, then measures the peak
resident memory of (a) `python -m bpo.export` with 64 MB shards and (b) DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint` + safetensors save, each in a fresh process (ru_maxrss of the child).
Writes its table into BENCHMARKS.md.
"""

import argparse
import math
import os
import resource
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from record import markdown_table, update_section  # noqa: E402

REFERENCE = """
import sys, torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file
sd = get_fp32_state_dict_from_zero_checkpoint(sys.argv[1])
save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])
"""


def child_peak_mb(cmd, env):
    """Run cmd in a fresh child and return its peak RSS in MiB (the children's max, so run one child at a time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        raise RuntimeError("peak of this child not above an earlier child's; run the largest model last")
    return after / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512x8,1024x24")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from bpo.tiny import write_tiny_llava

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    rows = []
    for size in args.sizes.split(","):
        hidden, layers = (int(x) for x in size.split("x"))
        root = tempfile.mkdtemp(prefix="exportbench-")
        model = write_tiny_llava(os.path.join(root, "model"), hidden_size=hidden, num_layers=layers)
        ckpt = os.path.join(root, "ckpt")
        subprocess.run([launcher, "--num_gpus", "2", "--master_port", "29671",
                        os.path.join(HERE, "make_zero3_checkpoint.py"), model, ckpt],
                       check=True, env=env, cwd=ROOT, capture_output=True)
        ckpt_mb = sum(os.path.getsize(os.path.join(ckpt, "step_0", f)) for f in os.listdir(os.path.join(ckpt, "step_0"))) / 2**20
        from safetensors import safe_open

        with safe_open(os.path.join(model, "model.safetensors"), "pt") as f:
            n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        ours = child_peak_mb([sys.executable, "-m", "bpo.export", ckpt, os.path.join(root, "out"), "--dtype", "fp32",
                              "--max-shard-size", "64MB", "--base-model", model], env)
        theirs = child_peak_mb([sys.executable, "-c", REFERENCE, ckpt, os.path.join(root, "ref.safetensors")], env)
        rows.append([f"{n_params / 1e6:.0f}M", f"{n_params * 4 / 2**20:.0f}", f"{ckpt_mb:.0f}", f"{ours:.0f}",
                     f"{theirs:.0f}"])
        subprocess.run(["rm", "-rf", root])
    table = markdown_table(["parameters", "fp32 weights (MiB)", "checkpoint on disk (MiB)",
                            "bpo.export peak RSS (MiB)", "zero_to_fp32 + save peak RSS (MiB)"], rows)
    table += ("\n\nPeak RSS of a fresh process, python and torch included (~300-400 MiB of it). bpo.export writes "
              "64 MB shards from memory-mapped partitions; its peak grows with the shard size, not the model.")
    print(table)
    if not args.no_record:
        update_section("export", "Export: peak memory vs model size (benchmarks/export_bench.py)",
                       "python benchmarks/export_bench.py", table)


if __name__ == "__main__":
    main()
