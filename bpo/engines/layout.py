"""Give a checkpoint the weight names vLLM reads: re-insert the vision tower's `vision_model.` module level.

    python -m bpo.engines.layout --check MODEL_DIR        exit 0: vLLM reads it as it is; 3: it needs a copy
    python -m bpo.engines.layout MODEL_DIR OUT_DIR        write that copy (weights byte-identical, names changed)

Published LLaVA checkpoints (llava-hf/*, LLaVA-NeXT, ...) name the vision tower's weights
`vision_tower.vision_model.embeddings...`. Recent transformers releases drop that level inside CLIPVisionModel and
SiglipVisionModel (their conversion mapping removes the prefix on load) and save without it, and so does a
`bpo.export` of a model trained with them: `vision_tower.embeddings...`. transformers reads both spellings; vLLM
(0.32) reads only the published one and stops with "There is no module or parameter named
'vision_tower.embeddings'". The copy rewrites only each safetensors header (the names), copying the tensor bytes
unchanged, so it costs one sequential read and write of the weights and no tensor is ever loaded.
"""

import argparse
import json
import os
import shutil
import struct
import sys

from bpo.runtime.atomic import publish_dir

# Vision towers whose published checkpoints keep the inner `vision_model.` module.
WRAPPED_VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")
TOWER = "vision_tower."
INNER = "vision_model."


class LayoutError(RuntimeError):
    pass


def _vision_type(model_dir):
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise LayoutError(f"{path}: cannot read the model config ({e})") from None
    return (config.get("vision_config") or {}).get("model_type", "")


def served_name(name):
    """`[model.]vision_tower.X` -> `[model.]vision_tower.vision_model.X`; every other name unchanged."""
    head, sep, tail = name.partition(TOWER)
    if not sep or head not in ("", "model.") or tail.startswith(INNER):
        return name
    return f"{head}{TOWER}{INNER}{tail}"


def _weight_files(model_dir):
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise LayoutError(f"{model_dir}: no .safetensors weights (vLLM and this copy need safetensors)")
    return files


def _read_header(path):
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def needs_copy(model_dir):
    """True when the weights carry vision-tower names that vLLM cannot map (see the module docstring)."""
    if _vision_type(model_dir) not in WRAPPED_VISION_TOWERS:
        return False
    for fname in _weight_files(model_dir):
        header, _ = _read_header(os.path.join(model_dir, fname))
        if any(served_name(k) != k for k in header if k != "__metadata__"):
            return True
    return False


def _rewrite(src, dst):
    """One safetensors file with renamed tensors; the data section is copied byte for byte."""
    header, data_start = _read_header(src)
    renamed = {("__metadata__" if k == "__metadata__" else served_name(k)): v for k, v in header.items()}
    blob = json.dumps(renamed, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format pads the header with spaces so the data stays 8-byte aligned
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(struct.pack("<Q", len(blob)))
        g.write(blob)
        f.seek(data_start)
        shutil.copyfileobj(f, g, 64 << 20)


def write_served_copy(model_dir, out_dir):
    """Copy model_dir to out_dir with vLLM's weight names, atomically (a temp directory renamed into place)."""
    model_dir, out_dir = os.path.abspath(model_dir), os.path.abspath(out_dir)
    files = _weight_files(model_dir)
    with publish_dir(out_dir) as tmp:
        for name in os.listdir(model_dir):
            src, dst = os.path.join(model_dir, name), os.path.join(tmp, name)
            if name in files:
                _rewrite(src, dst)
            elif name == "model.safetensors.index.json":
                with open(src) as f:
                    index = json.load(f)
                index["weight_map"] = {served_name(k): v for k, v in index["weight_map"].items()}
                with open(dst, "w") as f:
                    json.dump(index, f, indent=1, sort_keys=True)
            elif os.path.isfile(src):
                shutil.copy2(src, dst)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("out_dir", nargs="?")
    parser.add_argument("--check", action="store_true", help="only say whether a copy is needed (exit 3 if so)")
    args = parser.parse_args(argv)
    try:
        need = needs_copy(args.model_dir)
        if args.check:
            print(f"{args.model_dir}: {'needs a vLLM-named copy' if need else 'vLLM reads it as it is'}")
            return 3 if need else 0
        if not args.out_dir:
            parser.error("give OUT_DIR, or --check")
        write_served_copy(args.model_dir, args.out_dir)
    except LayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir} ({'vision-tower names re-prefixed' if need else 'names already vLLM-readable'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
