"""Content digests: of files (remembered across runs), of JSON values, and of a tokenizer's pipeline.

Hashing the weights of a 70B checkpoint reads ~140 GB, so a file's digest is computed once and kept in a small
index keyed by (absolute path, size, mtime, ctime, inode) under $BPO_CACHE_DIR (default ~/.cache/bpo); a changed
file gets a new key and is hashed again. ctime and inode catch an edit whose mtime was put back (touch -d, rsync -t):
the kernel sets ctime on every change and no user can set it. In a multi-rank job only rank 0 hashes (callers wrap
these in bpo.runtime.dist.on_rank0). What a reference cache's fingerprint is made of lives in bpo.ref_cache.fingerprint.
"""

import hashlib
import json
import os

from bpo.runtime.atomic import write_text


def _index_path():
    root = os.environ.get("BPO_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "bpo"))
    return os.path.join(root, "file_digests.json")


def load_index():
    """The remembered file digests, {key: sha256}; empty when there is none yet or it cannot be read."""
    try:
        with open(_index_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def save_index(index):
    path = _index_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text(path, json.dumps(index))
    except OSError:
        pass  # a read-only home only costs a re-hash next time


def sha256_file(path):
    """sha256 of a file's bytes, read now (not remembered)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path, index=None):
    """sha256 of a file's bytes, remembered across runs while its size, mtime, ctime and inode stay the same.
    `index` (load_index): the caller's, saved by the caller (save_index); None: read and saved here."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    own = index is None
    index = load_index() if own else index
    if key not in index:
        index[key] = sha256_file(path)
        if own:
            save_index(index)
    return index[key]


def digest_of(obj):
    """Short stable hash of any JSON-serialisable value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_digest(tokenizer):
    """Short hash of a tokenizer's whole pipeline (vocabulary, merges, normalizer, added tokens).

    Not of its padding and truncation settings: the backend tokenizer keeps those from the last call that asked for
    them (`enable_padding` stays on after `tokenizer(..., padding=True)`), so they record what the process did, not
    what the tokenizer is. Gemma-4's processor pads every call by default (`padding: True` in its text kwargs): a job
    that had encoded one record hashed another tokenizer than a job that had not, and training refused its own
    reference cache.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return digest_of(repr(tokenizer))
    pipeline = json.loads(backend.to_str())
    pipeline.pop("padding", None)
    pipeline.pop("truncation", None)
    return digest_of(pipeline)
