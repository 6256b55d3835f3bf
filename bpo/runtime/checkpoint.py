"""Training checkpoints that survive a kill at any moment and are read without trusting their pickles.

Layout: OUTPUT_DIR/checkpoints/step_N/ holds DeepSpeed's ZeRO-3 files (zero_pp_rank_R_mp_rank_00_model_states.pt and
zero_pp_rank_R_mp_rank_00_optim_states.pt for every rank R) and our rng_rank{R}.pt, since DeepSpeed keeps no RNG
state; OUTPUT_DIR/checkpoints/latest names the newest complete step_N.

Saving (`save`, on every rank): each file is written under a temporary name, flushed to disk and renamed into place,
so a file under its real name is always whole. DeepSpeed 0.19 writes `latest` on rank 0 before its final barrier,
which can name a tag another rank is still writing, or never finishes; so DeepSpeed gets save_latest=False, the ranks
then report to each other (one all-gather), and only when every rank wrote every file does rank 0 rename a new
`latest` into place and prune old tags. A failed write (a full disk) stops the run naming the directory and its free
space, and `latest` still names the previous checkpoint.

Resuming (`plan_resume`, decided by rank 0; `load`, on every rank). What is trusted:
- nothing pickled: every .pt is read weights-only (bpo.runtime.safe_load), DeepSpeed's own loads included. A file holding
  anything but tensors, containers, numbers and DeepSpeed's few plain classes stops the resume, naming the file.
- a tag only when it is complete: every rank's files present and readable, and its recorded step equal to its name.
  The newest complete tag is used, whatever `latest` says (a kill can leave `latest` empty or behind); every tag
  passed over is named with the reason.
- from the files: model weights, optimizer and scheduler state, the step, each rank's RNG state. The DeepSpeed
  config stored in them is ignored: this run's config applies.
A checkpoint saved on another number of ranks is read through DeepSpeed's universal format (bpo.runtime.reshard). Before any
of this, train.py checks that the start is the same run (bpo.run_record) and that no other job holds it
(bpo.runtime.run_lock). A tag holding PIN_FILE (the last finite checkpoint of a run that diverged) is never pruned.
"""

import os
import random
import re
import shutil
from dataclasses import dataclass

import torch

from bpo.runtime import dist
from bpo.runtime.faults import maybe_crash
from bpo.runtime.safe_load import UnsafeCheckpoint, safe_load, weights_only_loads
from bpo.runtime.reshard import UNIVERSAL

TAG_RE = re.compile(r"step_(\d+)")
MODEL_FILE = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
RNG_FILE = "rng_rank{}.pt"
PIN_FILE = "pinned"  # in a tag directory: never pruned (the last finite checkpoint of a run that diverged)
GiB = 2**30


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(output_dir):
    return os.path.join(output_dir, "checkpoints")


def latest_tag(root):
    """The tag `latest` names, or None when it is absent, empty or unreadable (a kill while an older DeepSpeed wrote
    it leaves it empty)."""
    try:
        with open(os.path.join(root, "latest"), encoding="utf-8") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def tag_step(tag):
    return int(TAG_RE.fullmatch(tag).group(1))


def step_tags(root):
    """The step_N directories under root, newest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if TAG_RE.fullmatch(t) and os.path.isdir(os.path.join(root, t))]
    return sorted(tags, key=tag_step, reverse=True)


def _short(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if str(error) else type(error).__name__


def check_tag(tag_dir):
    """(number of ranks it was saved on, None) when the tag is complete, else (None, why not).

    Complete: for every rank the model-states, optimizer and RNG files exist and load (weights-only, memory-mapped,
    so only their pickled part is read) and the step the files record is the one in the tag's name. Raises
    UnsafeCheckpoint for a file with pickled code in it."""
    first = MODEL_FILE.format(0)
    try:
        states = safe_load(os.path.join(tag_dir, first), mmap=True)
        world, step = int(states["dp_world_size"]), states.get("step")
    except UnsafeCheckpoint:
        raise
    except FileNotFoundError:
        return None, f"{first} is missing"
    except Exception as e:  # torch reports a torn zip as RuntimeError, a foreign file as anything
        return None, f"{first} is unreadable ({_short(e)})"
    if step != tag_step(os.path.basename(tag_dir)):
        return None, f"{first} records step {step!r}, not the step in the directory name"
    for r in range(world):
        for name in (MODEL_FILE.format(r), OPTIM_FILE.format(r), RNG_FILE.format(r)):
            path = os.path.join(tag_dir, name)
            if not os.path.isfile(path):
                return None, f"{name} is missing (rank {r} of {world} did not finish writing)"
            if name != first:
                try:
                    safe_load(path, mmap=True)
                except UnsafeCheckpoint:
                    raise
                except Exception as e:
                    return None, f"{name} is unreadable ({_short(e)})"
    return world, None


@dataclass(frozen=True)
class ResumePoint:
    root: str  # OUTPUT_DIR/checkpoints
    tag: str  # step_N
    step: int
    world: int  # ranks the checkpoint was saved on

    @property
    def path(self):
        return os.path.join(self.root, self.tag)


def find_resume_point(root):
    """(the newest complete checkpoint or None, notes naming each tag passed over and why).

    Raises CheckpointError when no tag is complete although `latest` names one of them: a checkpoint that was
    complete has been damaged since, and starting over would overwrite the run. Tags that never completed and no
    `latest` (the first save was killed) leave nothing worth keeping: None, and the caller starts at step 0."""
    tags = step_tags(root)
    notes = []
    for tag in tags:
        try:
            world, why = check_tag(os.path.join(root, tag))
        except UnsafeCheckpoint as e:
            raise CheckpointError(f"refusing to resume from {os.path.join(root, tag)}: {e}. Nothing in a checkpoint "
                                  f"directory may carry code; if you did not put it there, treat the run directory "
                                  f"as compromised. To resume from an older tag, delete this one.") from None
        if why is None:
            return ResumePoint(root, tag, tag_step(tag), world), notes
        notes.append(f"passed over {tag}: {why}")
    latest = latest_tag(root)
    if latest in tags:
        raise CheckpointError(f"no complete checkpoint in {root}, although `latest` names {latest}:\n  "
                              + "\n  ".join(notes) + "\nRestore the missing files, or delete the tags to start over.")
    return None, notes


def plan_resume(output_dir, resume):
    """Collective: where this run starts, decided on rank 0 and printed there. A ResumePoint, or None for step 0.

    train.resume=false into a directory that already holds checkpoints is refused: a fresh start would prune them
    and drop metrics.jsonl rows."""
    root = checkpoint_root(output_dir)

    def decide():
        tags = step_tags(root)
        if not resume:
            if tags:
                raise CheckpointError(
                    f"{root} already holds checkpoints ({', '.join(sorted(tags, key=tag_step))}); continue that run "
                    f"with --resume (train.resume=true), or start a new one in another train.output_dir")
            return None, ["starting from step 0 (train.resume=false)"]
        point, notes = find_resume_point(root)
        if point is None:
            what = "incomplete checkpoints only" if tags else "no checkpoint"
            return None, notes + [f"resume: {what} in {root}; starting from step 0"]
        return point, notes + [f"resuming from step {point.step} ({point.path}, saved on {point.world} rank(s))"]

    point, notes = dist.on_rank0(decide)
    for line in notes:
        dist.print0(line)
    return point


def _rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def load(engine, point, universal=None):
    """Restore model, optimizer, scheduler and RNG from `point`; returns its step.

    universal: (load_dir, tag) of the converted copy when the checkpoint was saved on another number of ranks (the
    engine must then be built with checkpoint.load_universal, see bpo.runtime.reshard)."""
    _writer(engine)
    load_dir, tag = universal or (point.root, point.tag)
    mmap_under = os.path.join(load_dir, tag, "zero") if universal else None
    with weights_only_loads(mmap_under=mmap_under):
        # An explicit tag: DeepSpeed never reads a `latest` file.
        path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {point.path}")
    if client_state.get("step") != point.step:
        raise CheckpointError(f"{point.path} records step {client_state.get('step')!r}")
    if point.world == dist.world_size():
        _set_rng_state(safe_load(os.path.join(point.path, RNG_FILE.format(dist.rank()))))
    else:
        # Nothing in the loop draws from these generators (sampling is seeded by step), so this changes no number.
        dist.print0(f"RNG states were saved for {point.world} rank(s), this run has {dist.world_size()}: every rank "
                    f"keeps its generators as train.seed set them")
    return point.step


def _free_space(path):
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


def write_error(path, error):
    """What went wrong writing `path`, with the free space of its filesystem (a full disk is the usual cause; torch
    reports it as "file write failed" without the errno)."""
    free = _free_space(os.path.dirname(path))
    room = f"{free / GiB:.2f} GiB free" if free is not None else "free space unknown"
    return f"cannot write {path}: {_short(error)} ({room} on the filesystem of {os.path.dirname(path)})"


def write_atomic(path, write):
    """write(tmp_path) then fsync and rename to path: under its real name a file is always complete."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _write_text_atomic(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)  # the rename itself must survive a crash too
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writer(engine):
    """The engine's checkpoint engine, replaced on first use by the atomic one (see _atomic_engine_class)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if getattr(current, "bpo_atomic", False):
        return current
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(f"bpo writes checkpoints through DeepSpeed's torch checkpoint engine; the DeepSpeed "
                              f"config selects {type(current).__name__}. Remove its checkpoint engine settings.")
    engine.checkpoint_engine = _atomic_engine_class()(current.zipfile_serialization)
    return engine.checkpoint_engine


def _atomic_engine_class():
    # Built on first use: subclassing at import time would import deepspeed with every `import bpo.runtime.checkpoint`.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class AtomicCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine with atomic writes and weights-only loads. A failed write is recorded,
        not raised, so this rank still joins DeepSpeed's barriers and `save` can report every rank's failure."""

        bpo_atomic = True

        def __init__(self, zipfile_serialization):
            super().__init__(None)
            self.zipfile_serialization = zipfile_serialization
            self.errors = []
            self.writes = 0

        def save(self, state_dict, path):
            self.writes += 1
            maybe_crash("ckpt_write", self.writes)
            if self.errors:
                return  # this tag is lost already; do not fill the disk further
            try:
                write_atomic(path, lambda tmp: torch.save(state_dict, tmp,
                                                          _use_new_zipfile_serialization=self.zipfile_serialization))
            except (OSError, RuntimeError) as e:
                self.errors.append(write_error(path, e))

        def load(self, path, map_location=None):
            return safe_load(path, map_location=map_location)

    return AtomicCheckpointEngine


def save(engine, output_dir, step, keep):
    """Collective: write step_N, then (all ranks done) point `latest` at it and keep the `keep` newest (0 = all)."""
    root = checkpoint_root(output_dir)
    tag = f"step_{step}"
    tag_dir = os.path.join(root, tag)
    writer = _writer(engine)
    os.makedirs(tag_dir, exist_ok=True)
    if dist.is_rank0():
        _clear_stale(tag_dir, dist.world_size())
    rng_path = os.path.join(tag_dir, RNG_FILE.format(dist.rank()))
    try:
        write_atomic(rng_path, lambda tmp: torch.save(_rng_state(), tmp))
    except (OSError, RuntimeError) as e:
        writer.errors.append(write_error(rng_path, e))
    try:
        engine.save_checkpoint(root, tag=tag, client_state={"step": step}, save_latest=False)
    except (OSError, RuntimeError) as e:
        # Outside the writes we wrap (DeepSpeed copying its recovery script): this rank cannot join the exchange
        # below; the others fail when this process exits.
        raise CheckpointError(write_error(tag_dir, e)) from None
    errors, writer.errors = writer.errors, []
    failed = [(r, errs) for r, errs in enumerate(dist.all_gather_object(errors)) if errs]
    if failed:
        previous = latest_tag(root)
        lines = [f"rank {r}: {e}" for r, errs in failed for e in errs]
        raise CheckpointError(f"checkpoint {tag_dir} was not saved:\n  " + "\n  ".join(lines) + "\n"
                              + (f"`latest` still names {previous}, which is complete. " if previous else "")
                              + "Free disk space (or lower train.keep_checkpoints) and resume with --resume.")
    if dist.is_rank0():
        _write_text_atomic(os.path.join(root, "latest"), tag)
        _prune(root, keep, step)
    dist.barrier()
    return tag_dir


def _clear_stale(tag_dir, world):
    """A tag written again (after a resume from an older one) must not keep what its earlier writing left: files of
    ranks this run does not have, or a universal copy of the old contents (bpo.runtime.reshard would load it)."""
    for name in os.listdir(tag_dir):
        m = re.fullmatch(r"(?:zero_pp_rank_(\d+)_mp_rank_00_(?:model|optim)_states|rng_rank(\d+))\.pt", name)
        if m and int(m.group(1) or m.group(2)) >= world:
            os.remove(os.path.join(tag_dir, name))
        elif name.startswith(UNIVERSAL):  # universal/, universal.tmp/, universal.failed
            path = os.path.join(tag_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def pin(output_dir, step, why):
    """Keep step_N out of rotation: _prune never deletes it (delete it by hand once it is no longer needed)."""
    _write_text_atomic(os.path.join(checkpoint_root(output_dir), f"step_{step}", PIN_FILE), why + "\n")


def _prune(root, keep, current):
    """Delete tags newer than `current` (left by a run that was killed before finishing them: a complete one would
    have been resumed from) and, with keep > 0, all but the `keep` newest of the rest. Pinned tags stay."""
    tags = [t for t in step_tags(root) if not os.path.exists(os.path.join(root, t, PIN_FILE))]
    newer = [t for t in tags if tag_step(t) > current]
    rest = [t for t in tags if tag_step(t) <= current]
    for tag in newer + (rest[keep:] if keep > 0 else []):
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
