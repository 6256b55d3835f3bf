"""Distributed helpers, kept in one place so the math and the loop never say `if rank == 0`."""

import atexit
import datetime
import os
import time

import torch
import torch.distributed as dist


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size():
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank():
    return int(os.environ.get("LOCAL_RANK", 0))


def is_rank0():
    return rank() == 0


def print0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs, flush=True)


def barrier():
    if is_initialized():
        dist.barrier()


def init_distributed():
    """Join the process group the launcher (deepspeed, torchrun, srun) describes; a lone process needs none."""
    import deepspeed

    if "RANK" not in os.environ:
        # A bare `python bpo/train.py`: describe a world of one so DeepSpeed does not try MPI discovery.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # A rank that dies mid-collective should fail the job in minutes, not hang it for NCCL's default hour.
    timeout = datetime.timedelta(seconds=float(os.environ.get("BPO_DIST_TIMEOUT_S", "1800")))
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    # On CPU every rank has now created its /dev/shm all-reduce buffer and mapped every other rank's; once all have,
    # the names are no longer needed, and removing them here leaves nothing behind however the job ends (a kill,
    # a rank the launcher terminates). The mappings stay valid until each process exits.
    barrier()
    _unlink_shm_buffer()
    # Left to interpreter teardown, the process group's threads can outlive it: torch 2.14 on gloo then aborts
    # ("terminate called without an active exception", SIGABRT) after the job's work is done and written.
    atexit.register(_destroy)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())


def _destroy():
    if is_initialized():
        dist.destroy_process_group()


def _unlink_shm_buffer():
    try:
        os.unlink(shm_buffer_path(rank()))
    except FileNotFoundError:  # a GPU backend, or ranks on several nodes: DeepSpeed made none
        pass


def shm_buffer_path(rank, addr=None, port=None):
    """The /dev/shm all-reduce buffer DeepSpeed's CPU backend maps for a rank (deepspeed/ops/csrc/cpu/comm/shm.cpp
    names it from uid, MASTER_ADDR and MASTER_PORT). DeepSpeed 0.19 never unlinks it: left alone, every CPU job
    would keep 2 x 69 MB of RAM (tmpfs) after it exits. init_distributed unlinks it once every rank has mapped it."""
    addr = addr if addr is not None else os.environ.get("MASTER_ADDR", "")
    port = port if port is not None else os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device():
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def sum_across_ranks(values):
    """Sum a dict of scalar tensors over all ranks in one collective (call once per optimizer step, not per micro)."""
    keys = sorted(values)
    flat = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device()).reshape(()) for k in keys])
    if is_initialized():
        dist.all_reduce(flat)  # gloo and nccl both reduce float64
    flat = flat.cpu()
    return {k: flat[i] for i, k in enumerate(keys)}


def broadcast_object(obj, src=0):
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...]; [obj] without a process group."""
    if not is_initialized():
        return [obj]
    parts = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def on_rank0(fn):
    """fn() on rank 0 only, its result given to every rank. An exception fn raises is raised on every rank, so the
    others never wait in a collective for a rank 0 that has failed."""
    result, error = None, None
    if is_rank0():
        try:
            result = fn()
        except Exception as e:  # handed to every rank below, then raised there
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


POLL_S = 2.0  # how often ranks waiting on rank 0's long work look at the file system


def on_rank0_polled(fn, marker, what):
    """fn() on rank 0 while the other ranks wait by polling the file system, never in a collective. For rank-0 work
    that may take longer than BPO_DIST_TIMEOUT_S (converting a 0.8 TB checkpoint, exporting the model, judging every
    answer): a barrier behind it would time out and kill a healthy job. Rank 0 writes `marker`.done when fn has
    returned, or `marker`.failed with its error, which the other ranks then raise. The markers live in a directory
    every rank sees (the run's own), are cleared first and removed at the end. Returns fn's result on rank 0, None on
    the others. A rank 0 killed outright writes nothing: the launcher (deepspeed, torchrun, srun) ends the others."""
    done, failed = marker + ".done", marker + ".failed"
    if is_rank0():
        for path in (done, failed):
            if os.path.exists(path):
                os.remove(path)
    barrier()  # no rank may see a stale marker from an earlier attempt
    result = None
    if is_rank0():
        try:
            result = fn()
        except BaseException as e:
            with open(failed, "w") as f:
                f.write(f"{type(e).__name__}: {e}")
            raise
        with open(done, "w") as f:
            f.write("done\n")
    else:
        while not os.path.exists(done):
            if os.path.exists(failed):
                with open(failed) as f:
                    raise RuntimeError(f"rank 0 failed {what}: {f.read()}")
            time.sleep(POLL_S)
    barrier()  # every rank has seen the marker: rank 0 may remove it
    if is_rank0():
        os.remove(done)
    return result
