"""Content fingerprints of model directories, data files, the images they name and the scoring code, for caches and
provenance.

File digests are remembered across runs (bpo.runtime.digest.file_digest), so a 70B checkpoint's ~140 GB is read
once. The model directory may be read-only and is never written. In a multi-rank job only rank 0 hashes (callers
wrap these in bpo.runtime.dist.on_rank0).
"""

import importlib
import os

from bpo.data.formats import InlineImage, find_split
from bpo.data.records import image_name_problem, read_raw_records
from bpo.runtime.digest import digest_of, file_digest, load_index, save_index, sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CONFIG_NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "processor_config.json", "preprocessor_config.json", "chat_template.jinja",
                "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "video_preprocessor_config.json")


def model_fingerprint(model_dir):
    """{file name: sha256} for the weights and every tokenizer/processor/config file of a checkpoint directory."""
    index = load_index()
    out = {}
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path) and (name.endswith(WEIGHT_SUFFIXES) or name in CONFIG_NAMES
                                     or name.endswith(".index.json")):
            out[name] = file_digest(path, index)
    save_index(index)
    return out


def data_digest(path, split=""):
    """file_digest of a data file; for a dataset folder (bpo.data.formats), a digest of its split's files by name."""
    if os.path.isdir(path):
        return digest_of({os.path.relpath(f, path): file_digest(f) for f in find_split(path, split)})
    return file_digest(path)


def images_fingerprint(data_file, image_root, allow_outside_root=False, split="", image_cache=""):
    """Short digest of the bytes of every image the data file names, by name: repainting one, or pointing
    image_root at other pictures, changes it; moving the same pictures elsewhere does not. Names the path rule
    refuses (bpo.data.records.image_name_problem) are not read. Images stored inline are in the data file's own
    digest (data_digest) and are left out here."""
    names = sorted({obj["image"] for _, obj in read_raw_records(data_file, split, image_cache)
                    if isinstance(obj, dict) and isinstance(obj.get("image"), str) and obj["image"].strip()
                    and not isinstance(obj["image"], InlineImage)})
    index = load_index()
    out = {}
    for name in names:
        path = os.path.join(image_root or "", name)
        if not allow_outside_root and image_name_problem(name, image_root):
            out[name] = "refused"
        elif os.path.isfile(path):
            out[name] = file_digest(path, index)
        else:
            out[name] = "missing"
    save_index(index)
    return digest_of(out)


# The code between a record and its reference log-prob, and nothing else: reading the file and parsing its rows
# (formats, records, conversation), prompt rendering and tokenisation (chat), image preprocessing calls and truncation
# (encode), batching (dataset, shared), the scorer's forward (model/scorer.py) and its log-prob head, label mask and
# reduction to a sequence log-prob (ops).
# Any edit to these files changes the fingerprint (a comment-only edit costs a rebuild; a changed encoding can never
# slip through). Loading (model/load.py; the dtype and QLoRA's quantization are fingerprinted as settings), part
# naming (model/parts.py) and the loss (loss.py, which only reads the cached numbers) are left out, so editing them
# keeps a cache valid.
SCORING_CODE = ("data/formats.py", "data/records.py", "data/conversation.py", "data/chat.py", "data/encode.py",
                "data/dataset.py", "data/shared.py", "model/scorer.py",
                "ops/logit_transform.py", "ops/logprobs.py", "ops/triton_logprobs.py")
SCORING_LIBRARIES = ("torch", "transformers", "tokenizers", "PIL")


def code_fingerprint():
    """{"code FILE": digest, "version LIB": version} for SCORING_CODE and SCORING_LIBRARIES."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {f"code bpo/{name}": sha256_file(os.path.join(package, name))[:16] for name in SCORING_CODE}
    for lib in SCORING_LIBRARIES:
        out[f"version {lib}"] = getattr(importlib.import_module(lib), "__version__", "?")
    return out
