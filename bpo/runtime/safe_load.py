"""Reading DeepSpeed checkpoint files without running code from them.

DeepSpeed writes its checkpoints with `torch.save` (pickle) and reads them back with `torch.load(weights_only=False)`,
so a crafted `*.pt` in a run directory runs whatever its pickle says. Here every load is weights-only: the unpickler
rebuilds tensors, containers and numbers, plus the few plain classes in `allowed_globals()`, and refuses anything
else before it is called.

`safe_load` is for our own reads; `weights_only_loads()` is for DeepSpeed's: while it is active, every `torch.load`
in the process (DeepSpeed's checkpoint engine, its ZeRO-3 universal loader, ds_to_universal) is weights-only too,
whatever `weights_only=` the caller passed.
"""

import contextlib
import os
import pickle
import re

import torch


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file holds pickled objects outside the allow-list: it was not written by DeepSpeed for bpo."""


def allowed_globals():
    """The classes DeepSpeed 0.19 pickles into ZeRO-3 checkpoints, found by running
    `torch.serialization.get_unsafe_globals_in_checkpoint` over real ones (training and universal): ZeroStageEnum
    and LossScaler in each optimizer file; DynamicLossScaler takes LossScaler's place in fp16 runs. weights_only
    restores them field by field; none of them runs code when it is rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def _is_unsafe(error):
    # torch words a refused class as "Unsupported global: GLOBAL module.name" (or "... was not an allowed global").
    text = str(error)
    return isinstance(error, pickle.UnpicklingError) and ("Unsupported global" in text or "allowed global" in text)


def safe_load(path, map_location="cpu", mmap=False):
    """torch.load(path) with weights_only=True and the allow-list. Raises UnsafeCheckpoint for a refused class;
    other errors (a truncated file, a missing one) propagate as torch raises them."""
    return _weights_only(torch.load, path, map_location=map_location, mmap=mmap)


def _weights_only(load, f, **kwargs):
    """`load` (torch.load, the unpatched one) weights-only under the allow-list, a refused class as UnsafeCheckpoint."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return load(f, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        if _is_unsafe(e):
            name = os.fspath(f) if isinstance(f, (str, os.PathLike)) else f
            raise UnsafeCheckpoint(f"{name} holds pickled code or classes a checkpoint never needs "
                                   f"({_refused(e)}); it was not loaded") from None
        raise


def _refused(error):
    m = re.search(r"GLOBAL ([\w.]+)", str(error))
    return f"it names {m.group(1)}" if m else str(error).splitlines()[0]


@contextlib.contextmanager
def weights_only_loads(mmap_under=None):
    """Make every torch.load weights-only (with the allow-list) while the block runs. DeepSpeed 0.19 passes
    weights_only=False in its torch checkpoint engine, in ZeRO-3's universal loader (stage3.py) and throughout
    ds_to_universal.py; this covers all of them without copying their code.

    mmap_under: files below this directory are memory-mapped, so a rank reading one slice of a universal
    checkpoint's full-parameter files pages in only that slice (DeepSpeed reads each whole file on every rank)."""
    original = torch.load

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        if mmap_under is not None and isinstance(f, (str, os.PathLike)):
            mmap = mmap or os.path.abspath(f).startswith(os.path.abspath(mmap_under) + os.sep)
        return _weights_only(original, f, map_location=map_location, mmap=mmap, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
