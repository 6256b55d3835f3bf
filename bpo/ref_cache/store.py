"""The offline reference log-prob cache: format, fingerprint, and the reader training uses.

A cache directory holds safetensors shards and `manifest.json`:
    manifest.json          {"format", "complete", "fingerprint": {...}, "num_shards", "num_examples", ...}
    shard_00000.safetensors  tensors chosen/rejected/blind (n,) float32 sequence log-probs (blind NaN where absent),
                             optional per-token tensors; metadata "shard" = JSON {"ids": the n example ids,
                             "fingerprint": digest of the manifest's fingerprint} (a shard vouches for itself;
                             one key, because safetensors writes several in no fixed order)

The fingerprint lists everything the numbers depend on: the model files, tokenizer, chat template and image
processor, max_length, truncation and reduction, the data file's bytes, the bytes of every image it names, and the
code and library versions between a record and its score (bpo.ref_cache.fingerprint.code_fingerprint). Training recomputes it
from its own config and refuses a cache that differs, naming each difference, so a cache can never silently score a
different model, template, truncation, dataset or picture. A directory is usable only once the manifest says
`complete`; any file that cannot be read is a CacheError naming it and the command that repairs it.
"""

import json
import os

import torch

from bpo.runtime import dist
from bpo.runtime.atomic import write_text
from bpo.ref_cache.fingerprint import code_fingerprint, data_digest, images_fingerprint, model_fingerprint
from bpo.runtime.digest import digest_of, tokenizer_digest

FORMAT_VERSION = 2
SHARD_FORMAT = "shard_{:05d}.safetensors"
KINDS = ("chosen", "rejected", "blind")
# Human-readable rule, part of the fingerprint: change it whenever encode.py truncates differently.
TRUNCATION_RULE = ("prompt kept whole; responses tokenized within the whole conversation, ending with the "
                   "end-of-turn marker (else EOS); each cut at its end to prompt+response <= max_length")


class CacheError(RuntimeError):
    pass


def fingerprint(cfg, processor, data_file, model_path=None, image_root=None):
    """Everything the cached numbers depend on, as a flat dict of comparable values. Collective: rank 0 hashes (the
    weights of a 72B model are 145 GB, read once rather than once per rank) and every rank gets its answer."""
    image_root = cfg.data.image_root if image_root is None else image_root
    return dist.on_rank0(lambda: _fingerprint(cfg, processor, data_file, model_path, image_root))


def _fingerprint(cfg, processor, data_file, model_path, image_root):
    model_path = model_path or cfg.train.ref_model_path or cfg.model.path
    # evaluate.py checks a cache against the test file, read with its own split; every other job reads data.train_file
    split = cfg.eval.split if data_file == cfg.eval.test_file and data_file != cfg.data.train_file else cfg.data.split
    image_processor = getattr(processor, "image_processor", None)
    fp = {
        "format": FORMAT_VERSION,
        "model_files": digest_of(model_fingerprint(model_path)),
        "dtype": cfg.model.dtype,
        "chat_template": digest_of(processor.chat_template or ""),
        "tokenizer": tokenizer_digest(processor.tokenizer),
        "image_processor": digest_of(image_processor.to_dict() if image_processor is not None else {}),
        "max_length": cfg.data.max_length,
        "truncation": TRUNCATION_RULE,
        "reduction": cfg.loss.reduction,
        "data_file": data_digest(data_file, split),
        "images": images_fingerprint(data_file, image_root, cfg.data.allow_outside_image_root, split,
                                     cfg.data.image_cache),
        **code_fingerprint(),
    }
    if cfg.data.chat_template_kwargs:  # only when set, so caches built before the key existed still match
        fp["chat_template_kwargs"] = cfg.data.chat_template_kwargs
    if cfg.model.finetune == "qlora":
        # A QLoRA run's reference is its 4-bit base, whose log-probs differ from those of the model.dtype weights.
        # LoRA's own settings (rank, alpha, targets) are not here: with adapters off they do not enter the numbers,
        # so one cache serves every adapter configuration trained on the same base.
        from bpo.model.lora import QUANTIZATION

        fp["base_quantization"] = QUANTIZATION
    return fp


def repair_hint(cache_dir):
    return (f"rerun `deepspeed bpo/ref_logprobs.py --config CONFIG cache.output_dir={cache_dir}` with the config that "
            f"built it: it checks every shard and redoes the damaged ones")


def describe_mismatch(cached, current):
    """'max_length 512 in cache vs 1024 in config'-style lines for every differing key."""
    lines = []
    for key in sorted(set(cached) | set(current)):
        a, b = cached.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            lines.append(f"{key} {a} in cache vs {b} in config")
    return lines


def read_manifest(cache_dir):
    path = os.path.join(cache_dir, "manifest.json")
    if not os.path.isfile(path):
        raise CacheError(f"{cache_dir} is not a reference cache (no manifest.json); build it with "
                         f"`deepspeed bpo/ref_logprobs.py --config ...`")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if (not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint"), dict)
                or not isinstance(manifest.get("num_shards"), int)):
            raise ValueError("not a cache manifest")
    except (OSError, ValueError) as e:
        raise CacheError(f"cannot read {path} (truncated?): {type(e).__name__}: {e}; {repair_hint(cache_dir)}") from None
    return manifest


def write_manifest(cache_dir, manifest):
    write_text(os.path.join(cache_dir, "manifest.json"), json.dumps(manifest, indent=1, sort_keys=True))


def write_shard(path, ids, values, fingerprint_digest=""):
    """values: {kind: (n,) float32 tensor}. Atomic."""
    from safetensors.torch import save_file

    tensors = {k: v.float().contiguous() for k, v in values.items()}
    tmp = f"{path}.tmp.{os.getpid()}"
    about = json.dumps({"ids": list(ids), "fingerprint": fingerprint_digest}, sort_keys=True)
    save_file(tensors, tmp, metadata={"shard": about})
    os.replace(tmp, path)


def _read(path):
    """(ids, {kind: (n,) tensor}, metadata), every tensor read in full; raises what safetensors raises."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = json.loads((f.metadata() or {})["shard"])
        ids = metadata["ids"]
        values = {k: f.get_tensor(k) for k in KINDS if k in f.keys()}
        for k in f.keys():  # any other tensor too (older caches kept per-token log-probs): a torn file fails here
            f.get_tensor(k)
    if not isinstance(ids, list) or set(values) != set(KINDS) or any(len(v) != len(ids) for v in values.values()):
        raise ValueError(f"holds {len(ids) if isinstance(ids, list) else '?'} ids and columns "
                         f"{ {k: len(v) for k, v in values.items()} }")
    return ids, values, metadata


def read_shard(path, cache_dir=None):
    """(ids, {kind: (n,) tensor}); a shard that cannot be read is a CacheError naming it."""
    try:
        ids, values, _ = _read(path)
    except Exception as e:  # safetensors raises its own error type, OSError, or a JSON error for bad metadata
        hint = repair_hint(cache_dir or os.path.dirname(path))
        raise CacheError(f"cannot read reference cache shard {path} (truncated?): {type(e).__name__}: "
                         f"{str(e)[:200]}; {hint}") from None
    return ids, values


def shard_problem(path, ids, fingerprint_digest):
    """None when the shard at `path` is readable, holds exactly `ids` and was made for this fingerprint; else why not."""
    if not os.path.exists(path):
        return "missing"
    try:
        got, _, metadata = _read(path)
    except Exception as e:
        return f"unreadable ({type(e).__name__}: {str(e)[:200]})"
    if got != list(ids):
        return "holds other example ids"
    if metadata.get("fingerprint") != fingerprint_digest:
        return "made with other settings"
    return None


class CachedReference:
    """Reference log-probs from a complete cache; same call signature as `reference.LiveReference`."""
    def __init__(self, cache_dir, cfg, processor=None, data_file=None, image_root=None):
        manifest = read_manifest(cache_dir)
        if not manifest.get("complete"):
            raise CacheError(f"reference cache {cache_dir} is incomplete ({manifest.get('shards_done', '?')} of "
                             f"{manifest.get('num_shards', '?')} shards); rerun bpo/ref_logprobs.py to finish it")
        if processor is not None:  # collective (fingerprint hashes on rank 0): every rank builds a CachedReference
            current = fingerprint(cfg, processor, data_file or cfg.data.train_file, image_root=image_root)
            diff = describe_mismatch(manifest["fingerprint"], current)
            if diff:
                raise CacheError(f"reference cache {cache_dir} does not match this run:\n  " + "\n  ".join(diff)
                                 + "\nRebuild it with bpo/ref_logprobs.py for this config.")
        self.table = {}  # (id, kind) -> float
        for i in range(manifest["num_shards"]):
            ids, values = read_shard(os.path.join(cache_dir, SHARD_FORMAT.format(i)), cache_dir)
            for kind, column in values.items():
                for rid, v in zip(ids, column.tolist()):
                    if v == v:  # NaN marks a missing blind response
                        self.table[(rid, kind)] = v
        self.cache_dir = cache_dir

    def check_ids(self, records, kinds):
        missing = [(r.id, k) for r in records for k in kinds
                   if (k != "blind" or r.blind) and (r.id, k) not in self.table]
        if missing:
            rid, kind = missing[0]
            raise CacheError(f"reference cache {self.cache_dir} has no {kind} log-prob for example id {rid!r}"
                             f" ({len(missing)} missing in all); rebuild the cache for this dataset")

    def __call__(self, batch, inputs):
        kinds = batch["kind"].tolist()
        rows = batch["example_index"].tolist()
        values = []
        for kind, row in zip(kinds, rows):
            key = (batch["ids"][row], KINDS[kind])
            if key not in self.table:
                raise CacheError(f"reference cache {self.cache_dir} has no {key[1]} log-prob for example id "
                                 f"{key[0]!r}")
            values.append(self.table[key])
        return torch.tensor(values, dtype=torch.float32, device=inputs["input_ids"].device)  # (R,)
