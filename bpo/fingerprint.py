"""Content fingerprints of model directories and data files, for caches and provenance.

Hashing the weights of a 70B checkpoint reads ~140 GB, so a file's digest is computed once and kept in a small
index keyed by (absolute path, size, mtime) under $BPO_CACHE_DIR (default ~/.cache/bpo); a changed file gets a new
key and is hashed again. The model directory itself may be read-only and is never written.
"""

import hashlib
import json
import os

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CONFIG_NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "processor_config.json", "preprocessor_config.json", "chat_template.jinja",
                "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "video_preprocessor_config.json")


def _index_path():
    root = os.environ.get("BPO_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "bpo"))
    return os.path.join(root, "file_digests.json")


def _load_index():
    try:
        with open(_index_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_index(index):
    path = _index_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(index, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-hash next time


def file_digest(path, index=None):
    """sha256 of a file's bytes, remembered across runs while its size and mtime stay the same."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    own = index is None
    index = _load_index() if own else index
    if key not in index:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        index[key] = h.hexdigest()
        if own:
            _save_index(index)
    return index[key]


def model_fingerprint(model_dir):
    """{file name: sha256} for the weights and every tokenizer/processor/config file of a checkpoint directory."""
    index = _load_index()
    out = {}
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path) and (name.endswith(WEIGHT_SUFFIXES) or name in CONFIG_NAMES
                                     or name.endswith(".index.json")):
            out[name] = file_digest(path, index)
    _save_index(index)
    return out


def digest_of(obj):
    """Short stable hash of any JSON-serialisable value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_digest(tokenizer):
    """Short hash of a tokenizer's whole pipeline (vocabulary, merges, normalizer, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return digest_of(backend.to_str() if backend is not None else repr(tokenizer))
