"""Resume a ZeRO-3 checkpoint on another number of ranks, through DeepSpeed's universal checkpoint format.

A ZeRO-3 checkpoint holds, per rank, one flat fp32 partition of the trained parameters and of Adam's two moments:
it loads only on the world size that wrote it. `deepspeed.checkpoint.ds_to_universal` rewrites it as one file per
parameter and state (fp32, exp_avg, exp_avg_sq, full shape), which DeepSpeed 0.19 loads on any number of ranks when
the engine is built with `checkpoint.load_universal`. Frozen parameters are not optimizer state; as in every ZeRO-3
resume they come from model.path. The sampler does not depend on the world size, so a resumed run continues the
same sequence of global batches (keep micro_batch_size x grad_accum x ranks, the global batch, the same).

The conversion runs once per tag, on rank 0, into step_N/universal (built as step_N/universal.tmp and renamed when
done, so a killed conversion is redone), with every torch.load weights-only (bpo.runtime.safe_load). The other ranks wait by
watching the file system rather than in a collective (bpo.runtime.dist.on_rank0_polled): at 70B the conversion reads and
writes about one checkpoint (~0.8 TB) in a single process, longer than the collective timeout. It needs disk for
that second copy, which is pruned with its tag.
"""

import argparse
import os
import shutil
import time

from bpo.runtime import dist
from bpo.runtime.safe_load import weights_only_loads

UNIVERSAL = "universal"


def ds_config_entry():
    """What the DeepSpeed config needs to load a universal checkpoint."""
    return {"load_universal": True}


def convert(tag_dir):
    """Write tag_dir/universal from the ZeRO-3 files in tag_dir (one process). Returns its path."""
    from deepspeed.checkpoint import ds_to_universal

    out = os.path.join(tag_dir, UNIVERSAL)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # One worker each: ds_to_universal's worker processes would not inherit the weights-only torch.load.
    args = argparse.Namespace(input_folder=tag_dir, output_folder=tmp, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=False)
    with weights_only_loads():
        ds_to_universal.main(args)
    # It also writes `latest_universal` next to its output; bpo always names the tag, so that file is dropped.
    try:
        os.remove(os.path.join(tag_dir, "latest_universal"))
    except FileNotFoundError:
        pass
    os.rename(tmp, out)
    return out


def prepare(point):
    """Collective: (load_dir, tag) for engine.load_checkpoint of the universal copy of `point`, converting first
    when there is none (rank 0, the others polling: bpo.runtime.dist.on_rank0_polled)."""
    out = os.path.join(point.path, UNIVERSAL)

    def convert_once():
        if os.path.isdir(out):
            print(f"reshard: using {out}", flush=True)
            return
        print(f"reshard: {point.path} was saved on {point.world} rank(s), this run has {dist.world_size()}; "
              f"converting it to DeepSpeed's universal format in {out}", flush=True)
        t0 = time.time()
        convert(point.path)
        print(f"reshard: converted in {time.time() - t0:.1f}s", flush=True)

    dist.on_rank0_polled(convert_once, out, f"to convert {point.path}")  # markers universal.done / .failed
    return point.path, UNIVERSAL
