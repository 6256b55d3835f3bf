"""Turn a ZeRO-3 training checkpoint into a Hugging Face model directory of safetensors shards, streaming.

    python -m bpo.export RUN_DIR/checkpoints OUT_DIR [--tag step_120] [--dtype bf16|fp32] [--max-shard-size 5GB]
                         [--base-model DIR] [--force] [--merge]

The stock converter (zero_to_fp32) builds the whole fp32 state dict in memory, over a terabyte for a 70B model. Here
every rank's partition file is memory-mapped, each parameter is assembled from its rank slices only when it is
written, and one output shard is held at a time: peak memory is about one shard plus the page cache the kernel is
free to drop, whatever the model size (see BENCHMARKS.md).

ZeRO-3 layout read here (DeepSpeed 0.14-0.19): rank r's optimizer file holds `fp32_flat_groups`, one flat fp32
tensor per parameter group; inside it the trainable parameters follow the order of `param_shapes` (model-states
file), each taking ceil(numel / world) elements (the last rank's slice zero-padded). Frozen parameters are not in the
optimizer: each rank's model-states file keeps its slice in `frozen_param_fragments`.

Output: config (dtype updated), generation config, tokenizer/processor files and chat template copied from the base
model, `model-0000k-of-0000N.safetensors` and `model.safetensors.index.json` (its metadata marks it as written here),
all written to OUT_DIR's sibling `.NAME.export-tmp`, which is renamed to OUT_DIR only when complete. A killed export
leaves that directory; the next export to the same OUT_DIR removes it first. The base model (--base-model, else
model.path from the run's config.yaml, which training saves as an absolute path) is checked before any shard is
written.

--force replaces OUT_DIR only when it holds a previous export (its `.bpo_export` mark, or the marked index file)
and neither the checkpoint nor the base model lies inside it; any other non-empty directory is refused, force or not.
It is replaced by renames (bpo.runtime.atomic.publish_dir): the old one aside, the new one in, then the old one deleted.

A LoRA run's checkpoint (model.finetune=lora|qlora) becomes a PEFT adapter directory (`PeftModel.from_pretrained(
base, OUT_DIR)`), or with --merge the same layout as above with each adapter folded into its layer: see
bpo/export/lora.py.
"""

import argparse
import json
import os
import re

import torch

from bpo.export import lora as export_lora
from bpo.export.hf_dir import INDEX_FILE, MARKER, MARKER_FILE, ExportError, hf_name, write_model_dir
from bpo.runtime.checkpoint import latest_tag
from bpo.runtime.dtypes import DTYPES, torch_dtype
from bpo.runtime.safe_load import safe_load


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise ExportError(f"--max-shard-size {text!r}: use a number with KB, MB or GB, e.g. 5GB")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def _safe_load(path):
    """A checkpoint file read without executing pickled code (bpo.runtime.safe_load: weights-only, DeepSpeed's few plain
    state classes allowed), memory-mapped. DeepSpeed writes these files with torch.save, so a format without pickle
    is not available; this is the closest to it."""
    if not os.path.isfile(path):
        raise ExportError(f"checkpoint file missing: {path}")
    try:
        return safe_load(path, mmap=True)
    except Exception as e:
        raise ExportError(f"cannot read {path} (truncated or not a DeepSpeed checkpoint?): "
                          f"{type(e).__name__}: {str(e)[:300]}") from None


def resolve_tag_dir(ckpt_dir, tag=None):
    if tag is None and os.path.isfile(os.path.join(ckpt_dir, "latest")):
        tag = latest_tag(ckpt_dir)
    path = os.path.join(ckpt_dir, tag) if tag else ckpt_dir
    if not os.path.isdir(path):
        raise ExportError(f"no checkpoint directory {path}; pass the run's checkpoints/ directory and --tag")
    return path


class PartitionedCheckpoint:
    """Lazy view of one ZeRO-3 checkpoint tag: parameter names, shapes, and full tensors assembled on demand."""

    def __init__(self, tag_dir):
        model_files = sorted(f for f in os.listdir(tag_dir) if re.fullmatch(r"zero_pp_rank_\d+_mp_rank_00_model_states\.pt", f))
        if not model_files:
            raise ExportError(f"{tag_dir} has no zero_pp_rank_*_mp_rank_00_model_states.pt: not a ZeRO-3 checkpoint")
        first = _safe_load(os.path.join(tag_dir, model_files[0]))
        self.world = first["dp_world_size"]
        self.model_states = [first] + [
            _safe_load(os.path.join(tag_dir, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
            for r in range(1, self.world)]
        self.flat_groups = []
        for r in range(self.world):
            optim = _safe_load(os.path.join(tag_dir, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
            self.flat_groups.append(optim["optimizer_state_dict"]["fp32_flat_groups"])
        # name -> (group, offset within the rank's flat group, numel, shape) for trainable parameters.
        self.trainable = {}
        for g, shapes in enumerate(first["param_shapes"]):
            offset = 0
            for name, shape in shapes.items():
                numel = int(torch.Size(shape).numel())
                part = -(-numel // self.world)
                self.trainable[name] = (g, offset, numel, torch.Size(shape))
                offset += part
            for r in range(self.world):
                if self.flat_groups[r][g].numel() < offset:
                    raise ExportError(f"rank {r}'s optimizer partition of group {g} holds "
                                      f"{self.flat_groups[r][g].numel()} values, the parameter list needs {offset}: "
                                      f"the file is truncated or from another run")
        self.frozen = {name: torch.Size(shape) for name, shape in (first.get("frozen_param_shapes") or {}).items()}
        self.shared = dict(first.get("shared_params") or {})  # tied name -> the name that owns the storage

    def names(self):
        return [n for n in list(self.trainable) + list(self.frozen) if n not in self.shared]

    def shape(self, name):
        return self.trainable[name][3] if name in self.trainable else self.frozen[name]

    def tensor(self, name):
        """The full parameter, gathered from every rank's slice (fp32 master weights for trainable ones)."""
        if name in self.trainable:
            g, offset, numel, shape = self.trainable[name]
            part = -(-numel // self.world)
            pieces = [self.flat_groups[r][g].narrow(0, offset, part) for r in range(self.world)]
        else:
            shape, numel = self.frozen[name], int(self.frozen[name].numel())
            pieces = [self.model_states[r]["frozen_param_fragments"][name].reshape(-1) for r in range(self.world)]
        return torch.cat(pieces)[:numel].view(shape)


def export(ckpt_dir, out_dir, tag=None, dtype="bf16", max_shard_size="5GB", base_model=None, force=False,
           progress=True, merge=False):
    """Write the HF directory; returns its path. See the module docstring for the layout and memory bound.

    A LoRA checkpoint (bpo.model.lora) becomes a PEFT adapter directory, or with `merge` full weights with every
    adapter folded into its layer (bpo.export.lora)."""
    tag_dir = resolve_tag_dir(ckpt_dir, tag)
    base_model = base_model or _base_model_from_run(tag_dir)
    _check_base_model(base_model)
    _check_out_dir(out_dir, tag_dir, base_model, force)
    ckpt = PartitionedCheckpoint(tag_dir)
    target = torch_dtype(dtype)
    if export_lora.is_lora(ckpt):
        if not merge:
            return export_lora.write_adapter_dir(ckpt, ckpt_dir, out_dir, target, base_model)
        tensors = export_lora.merged_tensors(ckpt, ckpt_dir, base_model, out_dir, dtype)
        if tensors is None:  # merged through PEFT from the base checkpoint (QLoRA)
            return out_dir
    elif merge:
        raise ExportError(f"--merge folds LoRA adapters into their layers, and {tag_dir} holds no lora_A / lora_B "
                          f"parameters (a full fine-tuning run): export it without --merge")
    else:
        tensors = {hf_name(n): (ckpt.shape(n), lambda n=n: ckpt.tensor(n)) for n in ckpt.names()}
    return write_model_dir(tensors, out_dir, target, parse_size(max_shard_size), base_model, dtype, tag_dir, progress)


def _is_inside(path, directory):
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _is_previous_export(directory):
    if os.path.isfile(os.path.join(directory, MARKER_FILE)):
        return True
    try:
        with open(os.path.join(directory, INDEX_FILE)) as f:
            return MARKER in json.load(f).get("metadata", {})
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out_dir, tag_dir, base_model, force):
    """OUT_DIR may be new, empty, or (with force) a previous export that holds neither input."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir} exists and is not a directory")
    if not os.listdir(out_dir):
        return
    if not force:
        raise ExportError(f"{out_dir} exists and is not empty; pass --force to replace a previous export there")
    for what, path in (("the checkpoint", tag_dir), ("the base model", base_model)):
        if _is_inside(path, out_dir):
            raise ExportError(f"refusing --force: {out_dir} holds {what} ({path}), which replacing it would delete; "
                              f"choose another OUT_DIR")
    if not _is_previous_export(out_dir):
        shown = ", ".join(sorted(os.listdir(out_dir))[:5])
        raise ExportError(f"refusing --force: {out_dir} is not a previous export (no {INDEX_FILE} written by "
                          f"bpo.export) and holds other files ({shown}, ...); choose another OUT_DIR, or empty it "
                          f"yourself")


def _base_model_from_run(tag_dir):
    """model.path from the run's config.yaml (RUN/config.yaml for RUN/checkpoints/step_N): the base model whose
    tokenizer and config we ship. Training saves it absolute; a relative one (an older run) is relative to wherever
    that training ran, which is not known here."""
    import yaml

    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(tag_dir)))
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ExportError(f"cannot find the run's config.yaml at {path}; pass --base-model DIR")
    with open(path) as f:
        model_path = (yaml.safe_load(f) or {}).get("model", {}).get("path", "")
    if not model_path or not os.path.isabs(model_path):
        raise ExportError(f"{path} gives model.path {model_path!r}, not an absolute path (training saved it from "
                          f"another working directory); pass --base-model DIR")
    return model_path


def _check_base_model(base_model):
    if not os.path.isfile(os.path.join(base_model, "config.json")):
        raise ExportError(f"base model directory {base_model} has no config.json; pass --base-model DIR (the model "
                          f"the run started from, for its config and tokenizer)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bpo.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir", help="the run's checkpoints/ directory (or one tag directory inside it)")
    parser.add_argument("out_dir")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step_120 (default: the one named in `latest`)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--base-model", help="directory with the base model's config and tokenizer "
                                             "(default: model.path from the run's config.yaml)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR when it holds a previous export")
    parser.add_argument("--merge", action="store_true",
                        help="LoRA runs: write full weights with the adapters folded in (default: a PEFT adapter "
                             "directory)")
    args = parser.parse_args(argv)
    try:
        path = export(args.ckpt_dir, args.out_dir, args.tag, args.dtype, args.max_shard_size, args.base_model,
                      args.force, merge=args.merge)
    except ExportError as e:
        raise SystemExit(f"export failed: {e}")
    print(f"exported {path}")


if __name__ == "__main__":
    main()
