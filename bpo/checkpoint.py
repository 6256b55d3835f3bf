"""Training checkpoints through the DeepSpeed engine, plus what DeepSpeed does not keep: RNG state per rank.

Layout: OUTPUT_DIR/checkpoints/step_N/ (DeepSpeed's ZeRO-3 shards, one set per rank, and rng_rank{r}.pt) and
OUTPUT_DIR/checkpoints/latest, which DeepSpeed rewrites only after every rank has finished writing step_N, so a kill
during a save leaves the previous checkpoint as the one to resume from.
"""

import os
import random
import shutil

import torch

from bpo import dist


def checkpoint_root(output_dir):
    return os.path.join(output_dir, "checkpoints")


def latest_tag(root):
    path = os.path.join(root, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def _rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, output_dir, step, keep):
    root = checkpoint_root(output_dir)
    tag = f"step_{step}"
    os.makedirs(os.path.join(root, tag), exist_ok=True)
    tmp = os.path.join(root, tag, f"rng_rank{dist.rank()}.pt.tmp")
    torch.save(_rng_state(), tmp)
    os.replace(tmp, tmp[:-4])
    # Collective: every rank writes its own partition; rank 0 writes `latest` last.
    engine.save_checkpoint(root, tag=tag, client_state={"step": step})
    if dist.is_rank0() and keep > 0:
        tags = sorted((t for t in os.listdir(root) if t.startswith("step_")), key=lambda t: int(t.split("_")[1]))
        for old in tags[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return os.path.join(root, tag)


def load(engine, output_dir):
    """Restore engine, optimizer, scheduler and RNG from the latest checkpoint; returns its step or None."""
    root = checkpoint_root(output_dir)
    tag = latest_tag(root)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(root, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    rng_file = os.path.join(root, tag, f"rng_rank{dist.rank()}.pt")
    if os.path.exists(rng_file):
        # Written by us with plain tensors, ints and tuples: no pickled code is needed to read it.
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state["step"]
