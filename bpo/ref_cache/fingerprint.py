"""Content fingerprints of model directories and data files, for caches and provenance.

Hashing the weights of a 70B checkpoint reads ~140 GB, so a file's digest is computed once and kept in a small
index keyed by (absolute path, size, mtime, ctime, inode) under $BPO_CACHE_DIR (default ~/.cache/bpo); a changed
file gets a new key and is hashed again. ctime and inode catch an edit whose mtime was put back (touch -d, rsync -t):
the kernel sets ctime on every change and no user can set it. The model directory may be read-only and is never
written. In a multi-rank job only rank 0 hashes (callers wrap these in bpo.runtime.dist.on_rank0).
"""

import hashlib
import json
import os

from bpo.runtime.atomic import write_text

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
        write_text(path, json.dumps(index))
    except OSError:
        pass  # a read-only home only costs a re-hash next time


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path, index=None):
    """sha256 of a file's bytes, remembered across runs while its size, mtime, ctime and inode stay the same."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    own = index is None
    index = _load_index() if own else index
    if key not in index:
        index[key] = _sha256_file(path)
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


def data_digest(path, split=""):
    """file_digest of a data file; for a dataset folder (bpo.data.formats), a digest of its split's files by name."""
    if os.path.isdir(path):
        from bpo.data.formats import find_split

        return digest_of({os.path.relpath(f, path): file_digest(f) for f in find_split(path, split)})
    return file_digest(path)


def images_fingerprint(data_file, image_root, allow_outside_root=False, split="", image_cache=""):
    """Short digest of the bytes of every image the data file names, by name: repainting one, or pointing
    image_root at other pictures, changes it; moving the same pictures elsewhere does not. Names the path rule
    refuses (bpo.data.records.image_name_problem) are not read. Images stored inline are in the data file's own
    digest (data_digest) and are left out here."""
    from bpo.data.formats import InlineImage
    from bpo.data.records import image_name_problem, read_raw_records

    names = sorted({obj["image"] for _, obj in read_raw_records(data_file, split, image_cache)
                    if isinstance(obj, dict) and isinstance(obj.get("image"), str) and obj["image"].strip()
                    and not isinstance(obj["image"], InlineImage)})
    index = _load_index()
    out = {}
    for name in names:
        path = os.path.join(image_root or "", name)
        if not allow_outside_root and image_name_problem(name, image_root):
            out[name] = "refused"
        elif os.path.isfile(path):
            out[name] = file_digest(path, index)
        else:
            out[name] = "missing"
    _save_index(index)
    return digest_of(out)


# The code between a record and its reference log-prob: parsing, prompt rendering, tokenisation and image
# preprocessing calls, batching, the scorer and its log-prob head, the reduction. Any edit to these files changes the
# fingerprint (a comment-only edit costs a rebuild; a changed encoding can never slip through).
SCORING_CODE = ("data/records.py", "data/conversation.py", "data/chat.py", "data/encode.py", "data/dataset.py",
                "data/shared.py", "model/load.py",
                "ops/logit_transform.py", "ops/logprobs.py", "ops/triton_logprobs.py", "loss.py")
SCORING_LIBRARIES = ("torch", "transformers", "tokenizers", "PIL")


def code_fingerprint():
    """{"code FILE": digest, "version LIB": version} for SCORING_CODE and SCORING_LIBRARIES."""
    import importlib

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {f"code bpo/{name}": _sha256_file(os.path.join(package, name))[:16] for name in SCORING_CODE}
    for lib in SCORING_LIBRARIES:
        out[f"version {lib}"] = getattr(importlib.import_module(lib), "__version__", "?")
    return out


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
