"""Peak memory of exporting a ZeRO-3 checkpoint: bpo.export (streaming) vs DeepSpeed's in-memory converter.

    python benchmarks/export_bench.py [--sizes 512x8,1024x16]

For each model size (hidden x layers of a tiny LLaVA), writes a 2-rank ZeRO-3 checkpoint, then measures the peak
resident memory of (a) `python -m bpo.export` with 64 MB shards and (b) DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint` + safetensors save, each in a fresh process (that process's own ru_maxrss).
Writes its table into BENCHMARKS.md.
"""

import argparse
import math
import os
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


# Runs a module or a code string in this fresh interpreter and reports the interpreter's own peak RSS.
MEASURE = """
import resource, runpy, sys, threading, time
peak_anon = [0]
def watch():  # anonymous memory only: mmap-ed checkpoint pages are file-backed and the kernel may drop them
    while True:
        with open("/proc/self/status") as f:
            kib = next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))
        peak_anon[0] = max(peak_anon[0], kib)
        time.sleep(0.005)
threading.Thread(target=watch, daemon=True).start()
target, sys.argv = sys.argv[1], sys.argv[1:]
if target == "-c":
    sys.argv = sys.argv[1:]
    exec(compile(sys.argv[0], "<bench>", "exec"), {"__name__": "__main__"})
else:
    runpy.run_module(target, run_name="__main__")
print(f"PEAK_KIB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} {peak_anon[0]}", file=sys.stderr)
"""


def peak_mb(args, env):
    """(peak RSS, peak anonymous RSS) in MiB of a fresh `python -m MODULE ARGS` or `python -c CODE ARGS`."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, *args], check=True, env=env, cwd=ROOT,
                          capture_output=True, text=True)
    line = next(line for line in proc.stderr.splitlines() if line.startswith("PEAK_KIB="))
    rss, anon = line.split("=")[1].split()
    return int(rss) / 1024, int(anon) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512x8,1024x24")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from bpo.demo.tiny import write_tiny_llava

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
        ours = peak_mb(["bpo.export.job", ckpt, os.path.join(root, "out"), "--dtype", "fp32", "--max-shard-size", "64MB",
                        "--base-model", model], env)
        theirs = peak_mb(["-c", REFERENCE, ckpt, os.path.join(root, "ref.safetensors")], env)
        rows.append([f"{n_params / 1e6:.0f}M", f"{n_params * 4 / 2**20:.0f}", f"{ckpt_mb:.0f}",
                     f"{ours[1]:.0f} / {ours[0]:.0f}", f"{theirs[1]:.0f} / {theirs[0]:.0f}"])
        subprocess.run(["rm", "-rf", root])
    table = markdown_table(["parameters", "fp32 weights (MiB)", "checkpoint on disk (MiB)",
                            "bpo.export peak anon / RSS (MiB)", "zero_to_fp32 + save peak anon / RSS (MiB)"], rows)
    table += ("\n\nEach cell: peak anonymous memory (sampled every 5 ms from /proc/self/status RssAnon) / peak RSS "
              "(ru_maxrss), of a fresh process, python and torch included (~300 MiB). RSS also counts the pages of "
              "memory-mapped checkpoint files that were read, which are file-backed and reclaimable; the anonymous "
              "figure is what can exhaust a node's RAM. bpo.export writes 64 MB shards, so its anonymous peak is "
              "bounded by the shard size; DeepSpeed's converter holds the whole fp32 model.")
    print(table)
    if not args.no_record:
        update_section("export", "Export: peak memory vs model size (benchmarks/export_bench.py)",
                       "python benchmarks/export_bench.py", table)


if __name__ == "__main__":
    main()
