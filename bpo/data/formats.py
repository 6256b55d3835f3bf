"""Data files as their authors publish them -> the raw bytes or rows `bpo.data.records` reads.

    for name, kind, payload in open_data(path, split="", image_cache=""):  # one entry per file read
        ...  # kind "bytes": the file's (gunzipped) bytes; "rows": (row index, dict) in file order

- `.json` / `.jsonl` (and any other name): the bytes, read by `bpo.data.records` as a JSON array or JSONL.
- `.json.gz` / `.jsonl.gz` (HH-RLHF ships `harmless-base/test.jsonl.gz`): the same, gunzipped.
- `.parquet`: the rows, read locally with pyarrow, as the `datasets` library writes them. An HF `Image` feature is a
  struct {bytes, path}; its bytes are written once to `<image_cache>/images/<sha256[:16]><ext>` (content-addressed,
  written to a temporary name then renamed, so a reader never sees half a file and two jobs writing the same image
  agree) and the row's `image` becomes an `InlineImage`: the extracted path, marked as coming from the data file
  itself. The image-root rule (bpo.data.records.image_name_problem) is for names a file points at; bytes carried by
  the file are not such a name, so they are not held to it. `image_cache` defaults to the data file's folder.
- a folder: a dataset laid out as the hub publishes it; `split` picks the files. It is `SPLIT` or `CONFIG/SPLIT`, and
  matches `[CONFIG/]SPLIT-00000-of-00001.parquet` (`data/train-...` for the default config, `test/harm-...` for
  SPA-VL's `test` config), `[CONFIG/]SPLIT/0000.parquet` (the hub's parquet-converter branch) or `[CONFIG/]SPLIT.json`
  / `.jsonl` / `.jsonl.gz`. Several files of one split are read in name order.
"""

import gzip
import hashlib
import os

PARQUET_SUFFIXES = (".parquet",)
_DATA_SUFFIXES = (".parquet", ".jsonl.gz", ".json.gz", ".jsonl", ".json")


class InlineImage(str):
    """The path an inline image was extracted to; `sha256` is the hex digest of its bytes. A str subclass that JSON
    cannot produce, so a record's plain `image` string can never pass for one."""

    sha256: str

    def __new__(cls, path, sha256):
        obj = super().__new__(cls, path)
        obj.sha256 = sha256
        return obj


class DataFileError(OSError):
    """The data file or folder cannot be read at all (as a whole); the message names it and says what to do. Jobs
    end on it with that one line (bpo.cli)."""


def image_ext(data):
    """File extension for image bytes, from their magic number (HF Image structs need not carry a path)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    if data.startswith(b"BM"):
        return ".bmp"
    return ".img"


def extract_image(data, image_cache):
    """Write image bytes once to <image_cache>/images/<sha256[:16]><ext>; an InlineImage naming the file."""
    digest = hashlib.sha256(data).hexdigest()
    folder = os.path.join(image_cache, "images")
    out = os.path.abspath(os.path.join(folder, digest[:16] + image_ext(data)))
    if not os.path.exists(out):
        try:
            os.makedirs(folder, exist_ok=True)
            tmp = f"{out}.tmp.{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, out)
        except OSError as e:
            raise DataFileError(f"cannot extract an inline image to {folder}: {e}; set data.image_cache (or "
                              f"eval.image_cache) to a writable folder") from e
    return InlineImage(out, digest)


def find_split(folder, split):
    """The data files of `split` (`SPLIT` or `CONFIG/SPLIT`) in a dataset folder, in name order."""
    found = _split_files(folder)
    if not split:
        raise DataFileError(f"{folder} is a dataset folder with split(s) {sorted(found) or 'none'}; pick one with "
                          f"data.split (eval.split for evaluation), e.g. {next(iter(sorted(found)), 'train')!r}")
    if split in found:
        return found[split]
    matches = [key for key in found if key.split("/", 1)[-1] == split]
    if len(matches) == 1:
        return found[matches[0]]
    if matches:
        raise DataFileError(f"split {split!r} is in several configs of {folder}: {sorted(matches)}; name one as "
                          f"CONFIG/SPLIT")
    raise DataFileError(f"no split {split!r} in {folder}; found {sorted(found) or 'no data files'}")


def _split_files(folder):
    """{"CONFIG/SPLIT" or "SPLIT": [files]} for every data file under folder (two folders deep at most: the walk
    does not descend further, so a folder of extracted images below costs nothing)."""
    out = {}
    paths = []
    for here, dirs, files in os.walk(folder):
        depth = os.path.relpath(here, folder).count(os.sep) + (here != folder)
        dirs[:] = [d for d in dirs if not d.startswith(".")] if depth < 2 else []
        paths += [os.path.join(here, f) for f in files]
    for path in sorted(paths):
        rel = os.path.relpath(path, folder)
        suffix = next((s for s in _DATA_SUFFIXES if rel.endswith(s)), None)
        parts = rel.split(os.sep)
        if suffix is None:
            continue
        stem = parts[-1][: -len(suffix)]
        if len(parts) == 3 or (len(parts) == 2 and stem.isdigit()):  # CONFIG/SPLIT/0000.parquet, SPLIT/0000.parquet
            split, config = parts[-2], parts[:-2]
        else:  # [CONFIG/]SPLIT-00000-of-00001.parquet, [CONFIG/]SPLIT.jsonl
            split, config = stem.split("-", 1)[0], parts[:-1]
        config = [c for c in config if c != "data"]  # data/ holds the default config's splits
        out.setdefault("/".join(config + [split]), []).append(path)
    return out


def open_data(path, split="", image_cache=""):
    """[(name, kind, payload)] for the data file at `path` (or the files of `split` in a dataset folder): kind
    "bytes" (payload: the file's bytes, gunzipped) or "rows" (payload: an iterator of (row index, dict))."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = find_split(path, split)
    else:
        if split:
            raise DataFileError(f"data.split={split!r} picks a split of a dataset folder, but {path} is one file; "
                              f"leave the split empty or point at the folder")
        files = [path]
    return [_open_one(f, image_cache or os.path.dirname(os.path.abspath(f))) for f in files]


def _open_one(path, image_cache):
    if path.endswith(PARQUET_SUFFIXES):
        return path, "rows", _parquet_rows(path, image_cache)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataFileError(f"cannot read data file {path}: {e}") from e
    if path.endswith(".gz") or data.startswith(b"\x1f\x8b"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataFileError(f"data file {path} is not a complete gzip file ({e}); download it again") from e
    return path, "bytes", data


def _parquet_rows(path, image_cache):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataFileError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError
        raise DataFileError(f"data file {path} is not a readable parquet file ({type(e).__name__}: {e})") from e

    def rows():
        index = 0
        for batch in table.iter_batches(batch_size=256):  # one batch of rows (and their image bytes) at a time
            for row in batch.to_pylist():
                yield index, {k: _inline(v, image_cache) for k, v in row.items()}
                index += 1

    return rows()


def _inline(value, image_cache):
    """An HF Image struct with bytes -> its extracted InlineImage; one with only a path -> that path (a name under the
    image root, like any other); anything else unchanged."""
    if isinstance(value, dict) and set(value) == {"bytes", "path"}:
        if value["bytes"] is not None:
            return extract_image(value["bytes"], image_cache)
        return value["path"]
    return value
