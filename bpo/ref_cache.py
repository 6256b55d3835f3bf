"""The offline reference log-prob cache: format, fingerprint, and the reader training uses.

A cache directory holds safetensors shards and `manifest.json`:

    manifest.json          {"format", "complete", "fingerprint": {...}, "num_shards", "num_examples", ...}
    shard_00000.safetensors  tensors chosen/rejected/blind (n,) float32 sequence log-probs (blind NaN where absent),
                             optional per-token tensors; metadata "ids" = JSON list of the n example ids

The fingerprint lists everything the numbers depend on. Training recomputes it from its own config and refuses a
cache that differs, naming each difference, so a cache can never silently score a different model, template,
truncation or dataset. A directory is usable only once the manifest says `complete`.
"""

import json
import os

import torch

FORMAT_VERSION = 1
SHARD_FORMAT = "shard_{:05d}.safetensors"
KINDS = ("chosen", "rejected", "blind")
# Human-readable rule, part of the fingerprint: change it whenever encode.py truncates differently.
TRUNCATION_RULE = ("prompt kept whole; responses tokenized within the whole conversation, ending with the "
                   "end-of-turn marker (else EOS); each cut at its end to prompt+response <= max_length")


class CacheError(RuntimeError):
    pass


def fingerprint(cfg, processor, data_file, model_path=None):
    """Everything the cached numbers depend on, as a flat dict of comparable values."""
    from bpo.fingerprint import digest_of, file_digest, model_fingerprint, tokenizer_digest

    model_path = model_path or cfg.train.ref_model_path or cfg.model.path
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
        "data_file": file_digest(data_file),
    }
    if cfg.model.finetune == "qlora":
        # A QLoRA run's reference is its 4-bit base, whose log-probs differ from those of the model.dtype weights.
        # LoRA's own settings (rank, alpha, targets) are not here: with adapters off they do not enter the numbers,
        # so one cache serves every adapter configuration trained on the same base.
        from bpo.lora import QUANTIZATION

        fp["base_quantization"] = QUANTIZATION
    return fp


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
    with open(path) as f:
        return json.load(f)


def write_manifest(cache_dir, manifest):
    path = os.path.join(cache_dir, "manifest.json")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def write_shard(path, ids, values, per_token=None):
    """values: {kind: (n,) float32 tensor}; per_token: optional {kind: list of 1-D tensors}. Atomic."""
    from safetensors.torch import save_file

    tensors = {k: v.float().contiguous() for k, v in values.items()}
    for kind, rows in (per_token or {}).items():
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        tensors[f"tokens/{kind}"] = torch.cat(rows).float() if rows else torch.zeros(0)
        tensors[f"tokens/{kind}/lengths"] = lengths
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file(tensors, tmp, metadata={"ids": json.dumps(list(ids))})
    os.replace(tmp, path)


def read_shard(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        ids = json.loads(f.metadata()["ids"])
        values = {k: f.get_tensor(k) for k in KINDS if k in f.keys()}
    return ids, values


class CachedReference:
    """Reference log-probs from a complete cache; same call signature as `reference.LiveReference`."""

    def __init__(self, cache_dir, cfg, processor=None, data_file=None):
        manifest = read_manifest(cache_dir)
        if not manifest.get("complete"):
            raise CacheError(f"reference cache {cache_dir} is incomplete ({manifest.get('shards_done', '?')} of "
                             f"{manifest.get('num_shards', '?')} shards); rerun bpo/ref_logprobs.py to finish it")
        if processor is not None:
            current = fingerprint(cfg, processor, data_file or cfg.data.train_file)
            diff = describe_mismatch(manifest["fingerprint"], current)
            if diff:
                raise CacheError(f"reference cache {cache_dir} does not match this run:\n  " + "\n  ".join(diff)
                                 + "\nRebuild it with bpo/ref_logprobs.py for this config.")
        self.table = {}  # (id, kind) -> float
        for i in range(manifest["num_shards"]):
            ids, values = read_shard(os.path.join(cache_dir, SHARD_FORMAT.format(i)))
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
