"""Checks to run on every node before a job's heavy work, so a bad node or path fails in seconds, not after loading.

    srun --ntasks-per-node=1 python launch/preflight.py --gpus-per-node 8 --readable MODEL_DIR DATA_FILE \\
        --writable RUN_DIR --checkpoint-model MODEL_DIR --keep-checkpoints 2

Each check prints one line `preflight <host>: ok|FAIL ...`; any FAIL ends with exit code 1 after all checks ran.
  GPUs            as many visible as requested (nvidia-smi -L, else torch.cuda.device_count); --gpus-per-node 0
                  (the CPU profile) skips it
  --readable      each path exists and can be read (a directory: listed) on this node
  --writable      each directory can be created and written to (a file is written and removed)
  free disk       at the first --writable directory: room for --keep-checkpoints + 1 checkpoints (one being written
                  while the kept ones stay) of --checkpoint-model, sized by bpo.plan.estimate.checkpoint_bytes, less those
                  already there; or for an --export-model in --export-dtype; or --need-gb
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile

GiB = 2**30


def count_gpus():
    """(count, how it was counted)."""
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            return sum(1 for line in proc.stdout.splitlines() if line.startswith("GPU ")), "nvidia-smi -L"
    import torch

    return torch.cuda.device_count(), "torch.cuda.device_count()"


def check_gpus(requested):
    if requested == 0:
        return True, "GPU check skipped (CPU profile)"
    found, how = count_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    note = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    if found < requested:
        return False, f"{found} GPUs visible by {how}{note}, {requested} requested per node"
    return True, f"{found} GPUs visible ({how}), {requested} used"


def check_readable(path):
    if not os.path.exists(path):
        return False, f"{path} does not exist on this node (is it on a shared filesystem?)"
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError as e:
        return False, f"{path} is not readable: {e.strerror}"
    return True, f"readable {path}"


def check_writable(path):
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".preflight-"):
            pass
    except OSError as e:
        return False, f"cannot write to {path}: {e.strerror}"
    return True, f"writable {path}"


def existing_checkpoints(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    return len([t for t in os.listdir(root) if t.startswith("step_")]) if os.path.isdir(root) else 0


def checkpoint_need(model, keep, run_dir):
    """Bytes still to find for checkpoints: (keep + 1 - already written) x one checkpoint, at least one."""
    from bpo.plan.catalog import load_dims
    from bpo.plan.estimate import checkpoint_bytes

    one = checkpoint_bytes(load_dims(model))
    return one * max(1, keep + 1 - existing_checkpoints(run_dir)), one


def export_need(model, dtype):
    from bpo.plan.catalog import load_dims

    return load_dims(model).total_params * (4 if dtype == "fp32" else 2)


def check_disk(path, need_bytes, what):
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        return False, f"{free / GiB:.1f} GiB free at {path}, {what} needs {need_bytes / GiB:.1f} GiB"
    return True, f"{free / GiB:.1f} GiB free at {path} ({what}: {need_bytes / GiB:.1f} GiB)"


def disk_check(args):
    target = args.writable[0]
    if args.need_gb:
        return check_disk(target, args.need_gb * GiB, "--need-gb")
    try:
        if args.export_model:
            need = export_need(args.export_model, args.export_dtype)
            return check_disk(target, need, f"a {args.export_dtype} export")
        need, one = checkpoint_need(args.checkpoint_model, args.keep_checkpoints, target)
    except (ValueError, SystemExit) as e:  # a model bpo.plan cannot size: say so; the run may still fit
        return True, f"disk check skipped: cannot size {args.export_model or args.checkpoint_model}: {e}"
    return check_disk(target, need, f"checkpoints of {one / GiB:.1f} GiB, keeping {args.keep_checkpoints}")


def run_checks(args):
    results = [check_gpus(args.gpus_per_node)]
    results += [check_readable(p) for p in args.readable]
    results += [check_writable(p) for p in args.writable]
    if args.writable and (args.need_gb or args.checkpoint_model or args.export_model):
        results.append(disk_check(args))
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="0 skips the GPU check")
    parser.add_argument("--readable", nargs="*", default=[], metavar="PATH")
    parser.add_argument("--writable", nargs="*", default=[], metavar="DIR")
    parser.add_argument("--checkpoint-model", help="model (directory or bpo.plan.catalog built-in) to size checkpoints by")
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--export-model", help="model to size an export by (parameters x dtype bytes)")
    parser.add_argument("--export-dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--need-gb", type=float, help="free GiB to require instead of the checkpoint estimate")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    host = socket.gethostname()
    node = os.environ.get("SLURMD_NODENAME")
    where = f"{host} ({node})" if node and node != host else host
    results = run_checks(args)
    for ok, message in results:
        print(f"preflight {where}: {'ok  ' if ok else 'FAIL'} {message}", flush=True)
    failed = sum(not ok for ok, _ in results)
    if failed:
        print(f"preflight {where}: {failed} check(s) failed; stopping before any heavy work", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make `bpo` importable for the checkpoint estimate
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
