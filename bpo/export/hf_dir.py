"""A Hugging Face model directory written the crash-safe way: safetensors shards planned by size, the index marked as
ours, the base model's config and tokenizer files beside them, all in a temporary directory renamed into place when
complete. Full-weight exports (bpo.export.job) and LoRA ones (bpo.export.lora) both write through here."""

import contextlib
import json
import os
import shutil

import torch

from bpo.runtime.atomic import publish_dir
from bpo.runtime.dtypes import torch_dtype
from bpo.runtime.faults import maybe_crash

# The training wrapper (bpo.model.scorer.SequenceScorer) holds the HF model as `.model`; its parameter names carry this
# prefix, which export removes so the directory loads with the model class's own names.
WRAPPER_PREFIX = "model."
BASE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "processor_config.json", "preprocessor_config.json", "chat_template.jinja",
              "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
              "video_preprocessor_config.json")
INDEX_FILE = "model.safetensors.index.json"
MARKER = "bpo_export"  # key in the index's metadata: the directory was written by this module
MARKER_FILE = ".bpo_export"  # the same mark on every directory atomic_dir publishes (adapter and merged-PEFT exports too)


class ExportError(RuntimeError):
    pass


def hf_name(name):
    return name[len(WRAPPER_PREFIX):] if name.startswith(WRAPPER_PREFIX) else name


def write_model_dir(tensors, out_dir, target, limit, base_model, dtype, tag_dir, progress=True):
    """tensors: {name in the HF model: (shape, function returning the tensor)}, each called only when its shard is
    written. Shards of at most `limit` bytes, index (marked as this module's, naming the checkpoint tag_dir), base
    model files; written in a temporary directory renamed to out_dir when complete (`atomic_dir`)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    # Plan shards by size first, so the file names can carry the total count.
    shards, current, size = [], [], 0
    for name, (shape, _) in tensors.items():
        nbytes = torch.Size(shape).numel() * target.itemsize
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)

    with atomic_dir(out_dir) as tmp:
        weight_map, total = {}, 0
        bar = tqdm(total=len(tensors), unit="tensor", desc="export", disable=not progress)
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            written = {}
            for name in shard:
                written[name] = tensors[name][1]().to(target).contiguous()
                weight_map[name] = fname
                total += written[name].numel() * target.itemsize
                bar.update(1)
            save_file(written, os.path.join(tmp, fname), metadata={"format": "pt"})
            del written  # one shard in memory at a time
            maybe_crash("export_shards", i + 1)
        bar.close()
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total, MARKER: {"checkpoint": os.path.abspath(tag_dir)}},
                       "weight_map": weight_map}, f, indent=1, sort_keys=True)
        copy_base_files(base_model, tmp, dtype)
    return out_dir


@contextlib.contextmanager
def atomic_dir(out_dir):
    """OUT_DIR's sibling `.NAME.export-tmp`, emptied, that replaces out_dir when the block succeeds and is removed if
    it raises. A name of its own, so what a killed export leaves (up to a whole model) is found and removed by the
    next export to the same place."""
    out = os.path.abspath(out_dir)
    with publish_dir(out, tmp=os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.export-tmp")) as tmp:
        yield tmp
        with open(os.path.join(tmp, MARKER_FILE), "w") as f:
            json.dump({"written_by": "bpo.export"}, f)


def copy_base_files(base_model, out, dtype):
    for name in BASE_FILES:
        src = os.path.join(base_model, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(out, name))
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    config["dtype"] = str(torch_dtype(dtype)).removeprefix("torch.")  # transformers' name: bfloat16, float16, float32
    config.pop("torch_dtype", None)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
