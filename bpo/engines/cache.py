"""Endpoint answers on disk, addressed by a hash of the request: the judge's verdicts, the data builder's answers.

    cache = AnswerCache(directory)
    key = AnswerCache.digest("bpo-build-v1", model, messages, ...)   # sha256 of the JSON of the parts
    entry = cache.get(key)                                           # the stored dict, or None
    cache.put(key, {"content": text, ...})

One file per key, `<dir>/<key[:2]>/<key>.json`, rather than an append-only JSONL: each write is a temp file renamed
into place, which is atomic on POSIX, so concurrent writers (worker threads, or several processes sharing a
directory) need no lock, a killed run leaves no torn line, and a lookup reads one file instead of loading the whole
cache. A file that cannot be read or is not a JSON object is a miss (and is rewritten by the next put).
"""

import hashlib
import json
import os

from bpo.runtime.atomic import write_text


class AnswerCache:
    def __init__(self, directory):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    @staticmethod
    def digest(*parts):
        """sha256 hex of the parts as one JSON list: what the answer depends on, in a fixed order."""
        blob = json.dumps(list(parts), ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key):
        return os.path.join(self.directory, key[:2], key + ".json")

    def get(self, key):
        try:
            with open(self._path(key), encoding="utf-8") as f:
                entry = json.load(f)
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) else None

    def put(self, key, entry):
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text(path, json.dumps(entry, ensure_ascii=False))
