"""Stage 2, an image of the entity: looked up in a local image bank, or generated with diffusers.

    images = build_images(cfg.build, image_dir)
    found = images.lookup(entity)   # Found(name, source, path); raises Drop("no_image", ...)
    images.store(found)             # once the record passed the other stages: the file is then image_dir/name

Every image a record uses is written to build.image_dir (the output's image root) under a name made from its
bytes (`<sha256[:16]><suffix>`), by a temp file renamed into place: the output is self-contained, two entities with
the same picture share one file, and a rerun finds the file already there. A bank image is copied only for a record
that passed every other stage, so the directory holds no picture of a dropped one. `source` says where it came from.

Image bank (build.image.bank), either
- a directory: every image file under it (.jpg .jpeg .png .gif .webp .bmp) is named by its file name without the
  suffix, "_" read as a space ("Barack_Obama.jpg" is "Barack Obama"); of two files with the same name the first in
  path order counts; or
- an index file: a JSON object `{"name": "path", ...}`, or JSONL / a JSON array of `{"name": ..., "image": ...}`
  (several names may point at one image: aliases). Relative paths are read from the index file's directory.

Matching: names are compared normalised (accents removed, case folded, punctuation and "_" read as spaces, a leading
"the" dropped). An exact normalised match wins; otherwise the closest name by difflib's ratio among the names that
share a word beginning (first three letters) with the entity, if its ratio is at least build.image.min_similarity;
ties go to the name first in sorted order. A miss drops the record as `no_image`, naming the closest name seen.

diffusers (build.image.backend=diffusers): a local text-to-image pipeline directory (safetensors weights only, no
remote code, never downloaded; diffusers and torch are imported only for this backend) draws
build.image.diffusers_prompt with a seed derived from build.image.seed and the entity, so the same entity gets the
same image. One image is drawn at a time.
"""

import difflib
import hashlib
import json
import os
import re
import shutil
import threading
import unicodedata
from dataclasses import dataclass

from bpo.build_data.report import Drop
from bpo.config import ConfigError
from bpo.runtime.digest import digest_of, file_digest

@dataclass(frozen=True)
class Found:
    name: str  # the file's name in image_dir (content_name)
    source: dict  # where it came from: the record's `image_source`
    path: str  # the file to copy there


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")
PREFIX = 3  # letters of a word that index a name for fuzzy matching


def normalize_name(name):
    text = unicodedata.normalize("NFKD", name)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    text = re.sub(r"[\W_]+", " ", text).strip()
    return re.sub(r"^the ", "", text)


def content_name(path):
    """The name an image gets in image_dir: the first 16 hex digits of sha256 of its bytes, and its suffix."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return digest + (os.path.splitext(path)[1].lower() or ".img")


def store_image(path, image_dir):
    """Copy `path` into image_dir under its content name (atomically, once); returns that name."""
    name = content_name(path)
    dest = os.path.join(image_dir, name)
    if not os.path.exists(dest):
        tmp = f"{dest}.tmp.{os.getpid()}.{threading.get_ident()}"
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
    return name


def _index_entries(path):
    """[(name, image path as written, where)] from an index file; ConfigError naming the line for a bad entry."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read image bank index {path}: {e}") from None
    stripped = text.lstrip()
    if stripped.startswith("{") and "\n{" not in stripped.rstrip():
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"image bank index {path} is not valid JSON: {e}") from None
        if all(isinstance(v, str) for v in obj.values()) and not {"name", "image"} <= set(obj):
            return [(k, v, f"{path} key {k!r}") for k, v in obj.items()]
        items = [(f"{path}:1", obj)]
    elif stripped.startswith("["):
        try:
            items = [(f"{path}[{i}]", o) for i, o in enumerate(json.loads(text))]
        except ValueError as e:
            raise ConfigError(f"image bank index {path} is not valid JSON: {e}") from None
    else:
        items = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    items.append((f"{path}:{lineno}", json.loads(line)))
                except ValueError as e:
                    raise ConfigError(f"image bank index {path}:{lineno} is not valid JSON: {e}") from None
    entries = []
    for where, obj in items:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(obj.get("image"), str):
            raise ConfigError(f"image bank index entry {where} must be {{\"name\": string, \"image\": path}}; "
                              f"got {str(obj)[:120]}")
        entries.append((obj["name"], obj["image"], where))
    return entries


class ImageBank:
    name = "bank"

    def __init__(self, path, min_similarity, image_dir):
        self.path, self.min_similarity, self.image_dir = path, min_similarity, image_dir
        if os.path.isdir(path):
            files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
                           if f.lower().endswith(IMAGE_SUFFIXES))
            entries = [(os.path.splitext(os.path.basename(f))[0], f, f) for f in files]
            root = path
            self.digest = digest_of([[f, os.path.getsize(os.path.join(path, f))] for f in files])
        elif os.path.isfile(path):
            entries = _index_entries(path)
            root = os.path.dirname(os.path.abspath(path))
            self.digest = file_digest(path)
        else:
            raise ConfigError(f"build.image.bank {path!r} is neither a directory nor an index file")
        self.names = {}  # normalised name -> (name, image path as written, absolute path)
        for name, image, _ in entries:
            key = normalize_name(name)
            if key and key not in self.names:
                self.names[key] = (name, image, os.path.join(root, image))
        if not self.names:
            raise ConfigError(f"image bank {path} names no image (a directory needs {', '.join(IMAGE_SUFFIXES)} "
                              f"files; an index, entries)")
        self.by_prefix = {}
        for key in sorted(self.names):
            for word in set(key.split()):
                self.by_prefix.setdefault(word[:PREFIX], []).append(key)

    def settings(self):
        return {"backend": "bank", "bank": os.path.abspath(self.path), "digest": self.digest,
                "min_similarity": self.min_similarity}

    def describe(self):
        return (f"image: bank {self.path} ({len(self.names)} names), fuzzy matching at similarity >= "
                f"{self.min_similarity}")

    def match(self, entity):
        """(normalised bank name, similarity) of the best match, or (closest name or None, its similarity)."""
        query = normalize_name(entity)
        if query in self.names:
            return query, 1.0
        candidates = sorted({k for w in query.split() for k in self.by_prefix.get(w[:PREFIX], ())})
        best, score = None, 0.0
        for key in candidates:
            ratio = difflib.SequenceMatcher(None, query, key).ratio()
            if ratio > score:
                best, score = key, ratio
        return best, score

    def lookup(self, entity):
        key, score = self.match(entity)
        if key is None or score < self.min_similarity:
            closest = f"closest: {self.names[key][0]!r} at similarity {score:.2f}" if key else "no name shares a word"
            raise Drop("no_image", f"no image of {entity!r} in the bank ({closest}; build.image.min_similarity is "
                                   f"{self.min_similarity})")
        name, image, where = self.names[key]
        try:
            stored = content_name(where)
        except OSError as e:
            raise Drop("no_image", f"the bank's image for {name!r} cannot be read: {where}: {e.strerror}") from None
        return Found(stored, {"bank": name, "file": image, "similarity": round(score, 4)}, where)

    def store(self, found):
        try:
            store_image(found.path, self.image_dir)
        except OSError as e:
            raise Drop("no_image", f"the bank's image {found.path} cannot be copied: {e.strerror}") from None


class DiffusersImages:
    name = "diffusers"

    def __init__(self, image_cfg, image_dir):
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise ConfigError("build.image.backend=diffusers needs diffusers, which is not installed: pip install "
                              "diffusers") from None
        if not os.path.isdir(image_cfg.diffusers_model):
            raise ConfigError(f"build.image.diffusers_model {image_cfg.diffusers_model!r} is not a local pipeline "
                              f"directory (bpo never downloads)")
        self.cfg, self.image_dir = image_cfg, image_dir
        self._pipe, self._lock = None, threading.Lock()

    def settings(self):
        c = self.cfg
        return {"backend": "diffusers", "model": os.path.abspath(c.diffusers_model), "prompt": c.diffusers_prompt,
                "steps": c.diffusers_steps, "seed": c.seed}

    def describe(self):
        return (f"image: diffusers pipeline {self.cfg.diffusers_model}, prompt {self.cfg.diffusers_prompt!r}, "
                f"{self.cfg.diffusers_steps} steps")

    def _pipeline(self):
        import diffusers
        import torch

        if self._pipe is None:
            # safetensors only and no custom pipeline code: nothing in the directory runs as code or unpickles.
            pipe = diffusers.AutoPipelineForText2Image.from_pretrained(
                self.cfg.diffusers_model, use_safetensors=True, local_files_only=True)
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self._pipe = pipe.to(self.device)
        return self._pipe

    def seed_for(self, entity):
        return int(hashlib.sha256(f"{self.cfg.seed}|{entity}".encode("utf-8")).hexdigest()[:8], 16)

    def lookup(self, entity):
        import torch

        prompt = self.cfg.diffusers_prompt.replace("{entity}", entity)
        seed = self.seed_for(entity)
        with self._lock:  # one pipeline, one image at a time
            pipe = self._pipeline()
            generator = torch.Generator(self.device).manual_seed(seed)
            image = pipe(prompt, num_inference_steps=self.cfg.diffusers_steps, generator=generator).images[0]
            tmp = os.path.join(self.image_dir, f".generated.{os.getpid()}.{threading.get_ident()}.png")
            image.save(tmp, format="PNG")
        try:
            name = store_image(tmp, self.image_dir)
        finally:
            os.unlink(tmp)
        source = {"generated": os.path.abspath(self.cfg.diffusers_model), "prompt": prompt, "seed": seed}
        return Found(name, source, os.path.join(self.image_dir, name))

    def store(self, found):
        pass  # drawn straight into image_dir


def build_images(b, image_dir):
    if b.image.backend == "bank":
        return ImageBank(b.image.bank, b.image.min_similarity, image_dir)
    return DiffusersImages(b.image, image_dir)
