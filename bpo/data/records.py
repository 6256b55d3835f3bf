"""MMSafe-PO preference records: read a JSON array or a JSONL file, validate every record, report the bad ones.

Two published variants are read alike: one with `id` and `question`, one with `prompt` and no `id` (those get a
stable id: the first 16 hex digits of sha256 over the raw conversation, image, chosen and rejected strings). The
conversation is parsed by `bpo.data.conversation`; responses lose their `ASSISTANT: ` prefix. Every other field
(`type`, `entity`, `entity_type`, `replacement`, `text_prompt`, `mid_prompt`, unknown keys) is kept in `meta`, with
`meta["conversation_key"]` naming the original `question`/`prompt` key.

The file is opened by `bpo.data.formats` (every job reads data through it): `.json`/`.jsonl`, the same gzipped
(`.json.gz`/`.jsonl.gz`), `.parquet` as `datasets` writes it (inline HF Image bytes extracted once to
`<image_cache>/images/<sha256[:16]><ext>`), or a hub-style dataset folder with a `split` (`SPLIT` or `CONFIG/SPLIT`).
JSON text is decided by content: a file whose first non-blank character is `[` is a JSON array, anything else is
JSONL. A record without an `id` whose image came inline is hashed with the image bytes' sha256 in place of the name,
so its id does not depend on where the image was extracted.

Image names are joined to `image_root` (with no root: the current directory), the same rule `bpo.data.encode` uses,
so what is checked here is what training opens. A name that is absolute or climbs out of the root (`../x`) is a bad
record unless `allow_outside_root` (data.allow_outside_image_root): a data file must not make a job read files
elsewhere; an inline image (bytes inside the data file, `formats.InlineImage`) names no file and is exempt. The rule
holds for the resolved path (os.path.realpath): a symbolic link inside the root that leads out of it is refused the
same way (issue 23: a link planted in a shared image tree reads any file). An image of more than `max_image_pixels`
(data.max_image_pixels) is a bad record, refused from its header before it is decoded.
"""

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field

from bpo.config import DataConfig
from bpo.data.conversation import ConversationError, Turn, parse_conversation
from bpo.data.formats import DataFileError, InlineImage, open_data

CONVERSATION_KEYS = ("question", "prompt")
RESPONSE_KEYS = ("chosen", "rejected", "blind")
_RESPONSE_PREFIX = "ASSISTANT:"
_END_OF_TURN = "</s>"
_OWN_KEYS = {"id", "image", *CONVERSATION_KEYS, *RESPONSE_KEYS}


class RecordError(ValueError):
    """Some records are unusable; the message lists each one."""


@dataclass
class Record:
    id: str
    turns: list  # list[Turn], ending with the user turn to answer
    image: str | None  # name under the image root, as in the file; None for a text-only record
    chosen: str  # responses without the "ASSISTANT: " prefix, stripped
    rejected: str
    blind: str | None = None  # y_b, the answer to the prompt without its image; None until generated
    meta: dict = field(default_factory=dict)  # every other field, plus "conversation_key": "question" | "prompt"
    source: str = ""  # "data/train.jsonl:17" (line) or "data/test.json[3]" (array index)


@dataclass(frozen=True)
class BadRecord:
    source: str
    id: str | None  # None when the entry is not a JSON object
    reason: str

    def __str__(self):
        return f"{self.source} (id {self.id if self.id is not None else '?'}): {self.reason}"


class _Bad(Exception):
    pass


def image_path(record, image_root):
    return os.path.join(image_root or "", record.image)


def image_name_problem(name, image_root=None):
    """Why an `image` name may not be read without data.allow_outside_image_root, or None.

    With image_root, the path is also resolved (os.path.realpath: symlinks, in the name or in the tree) and must
    stay under the resolved root: `link.png -> /etc/...` inside the root is refused like `../x`."""
    if os.path.isabs(name):
        return (f"image path {name!r} is absolute; names are read relative to the image root (set "
                f"data.allow_outside_image_root=true to allow it)")
    parts = os.path.normpath(name).split(os.sep)
    if parts[0] == "..":
        return (f"image path {name!r} climbs out of the image root (set data.allow_outside_image_root=true to "
                f"allow it)")
    if image_root is not None:
        root = os.path.realpath(image_root or ".")
        where = os.path.realpath(os.path.join(root, name))
        if os.path.commonpath([root, where]) != root:
            return (f"image path {name!r} resolves through a symlink to {where}, outside the image root {root} "
                    f"(set data.allow_outside_image_root=true to allow it)")
    return None


def enforce_max_image_pixels(max_pixels):
    """Make every later Image.open in this process refuse more than max_pixels, before decoding: PIL's own limit
    (89M pixels, and only a warning below twice that) turned into an error at ours. For a job's process; records
    loaded with check_images=true are refused with a clearer message earlier still."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def stable_id(conversation, image, chosen, rejected):
    """Content-derived id for records published without one: the same record always gets the same id."""
    blob = json.dumps([conversation, image, chosen, rejected], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def read_raw_records(path, split="", image_cache=""):
    """[(source, parsed JSON value)] for every entry in file order; None for a JSONL line that is not valid JSON."""
    return [(source, obj) for source, obj, _ in _read_entries(path, split, image_cache)]


def load_records(path, image_root=None, check_images=True, progress=False, allow_outside_root=False,
                 max_image_pixels=DataConfig.max_image_pixels, split="", image_cache=""):
    """Read every record of a JSON or JSONL file. Returns (good records, bad records), both in file order.

    Raises DataFileError when the file cannot be read or parsed as a whole (a broken JSONL line is a bad record)."""
    records, bad = [], []
    first_source = {}  # id -> source of its first good occurrence
    image_verdicts = {}  # image path -> None (fine) or the reason; records often share an image
    for source, obj, error in _progress(_read_entries(path, split, image_cache), progress):
        if error:
            bad.append(BadRecord(source, None, error))
            continue
        rid = _record_id(obj)
        try:
            record = _build_record(obj, rid, source)
            if rid in first_source:
                raise _Bad(f"duplicate id (first at {first_source[rid]})")
            _check_record_image(record, image_root, check_images, allow_outside_root, max_image_pixels,
                                image_verdicts)
        except _Bad as e:
            bad.append(BadRecord(source, rid, str(e)))
            continue
        first_source[rid] = source
        records.append(record)
    return records, bad


def record_problem(obj, image_root=None, check_images=True, allow_outside_root=False,
                   max_image_pixels=DataConfig.max_image_pixels):
    """Why `load_records` would reject this one record (a JSON object), or None when it would take it; for code
    that writes records (bpo.build_data) and must not write one the jobs refuse. Duplicate ids are the writer's."""
    try:
        record = _build_record(obj, _record_id(obj), "")
        _check_record_image(record, image_root, check_images, allow_outside_root, max_image_pixels, {})
    except _Bad as e:
        return str(e)
    return None


def _check_record_image(record, image_root, check_images, allow_outside_root, max_image_pixels, image_verdicts):
    """_Bad with the reason when the record's image name or file is refused; image_verdicts caches the file checks
    by path (records share images)."""
    inline = isinstance(record.image, InlineImage)
    if record.image is not None and not inline and not allow_outside_root:
        problem = image_name_problem(record.image, image_root or "")
        if problem:
            raise _Bad(problem)
    if check_images and record.image is not None:
        where = image_path(record, image_root)
        if where not in image_verdicts:
            image_verdicts[where] = _check_image(where, max_image_pixels)
        if image_verdicts[where]:
            raise _Bad(image_verdicts[where])


def blind_generation(record):
    """(generated token ids or None, tokenizer digest or None, cut?) that bpo/generate_blind.py recorded in
    `blind_meta` for the record's blind response; (None, None, False) for a blind response from elsewhere."""
    meta = record.meta.get("blind_meta")
    if not isinstance(meta, dict) or record.blind is None:
        return None, None, False
    ids = meta.get("token_ids")
    ids = ids if isinstance(ids, list) and all(isinstance(i, int) for i in ids) else None
    return ids, meta.get("tokenizer"), meta.get("finish_reason") == "length"


def drop_cut_blind(records):
    """The records with every blind response that was cut at max_new_tokens removed (the record keeps its pair and
    trains on the DPO term alone), and how many were removed. A cut response never ended, so scoring it with an end
    token would teach an ending the reference model never wrote, and without one it is an unfinished answer."""
    out, dropped = [], 0
    for record in records:
        if blind_generation(record)[2]:
            record = dataclasses.replace(record, blind=None)
            dropped += 1
        out.append(record)
    return out, dropped


def raise_if_bad(bad, path):
    """Raise RecordError listing every bad record, or return when there is none."""
    if not bad:
        return
    lines = [f"{len(bad)} bad record(s) in {os.fspath(path)}:"]
    lines += [f"  {b}" for b in bad]
    lines.append(f"Fix them (`python -m bpo.data.inspect {os.fspath(path)}` lists them), or skip them with "
                 f"--skip-bad / data.skip_bad=true.")
    raise RecordError("\n".join(lines))


def _read_entries(path, split="", image_cache=""):
    """[(source, obj, error)] in file order; error is None or why the entry is not a JSON object."""
    entries = []
    for name, kind, payload in open_data(path, split, image_cache):
        if kind == "rows":
            entries += _checked([(f"{name}[{i}]", row, None) for i, row in payload])
        else:
            entries += _parse_text(name, payload)
    return entries


def _parse_text(path, data):
    """_read_entries for one file's bytes (JSON array or JSONL)."""
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
        data = data[3:]
    if not data.strip():
        raise DataFileError(f"data file {path} holds no records")

    start = data.lstrip()[:1]
    if start == b"[":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise DataFileError(f"data file {path}: line {line} is not UTF-8 (byte {data[e.start]:#04x} at offset "
                                f"{e.start}); save the file as UTF-8") from None
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFileError(f"data file {path} starts like a JSON array but is not valid JSON: {e}") from e
        return _checked([(f"{path}[{i}]", obj, None) for i, obj in enumerate(items)])
    if start == b"{":
        _refuse_single_object(path, data)  # returns when the file is JSONL (or one record) after all
    entries = []
    # Split on newlines only: str.splitlines would also cut a line at U+2028 or \x1c, which JSON strings may hold.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            entries.append((source, None, f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); save the "
                                          f"file as UTF-8"))
            continue
        try:
            entries.append((source, json.loads(line), None))
        except json.JSONDecodeError as e:
            entries.append((source, None, f"invalid JSON: {e}"))
    if all(error for _, _, error in entries):
        raise DataFileError(f"data file {path} is neither a JSON array nor JSONL (no line parses as JSON)")
    return _checked(entries)


def _checked(entries):
    return [
        (source, obj, error or (None if isinstance(obj, dict) else "not a JSON object"))
        for source, obj, error in entries
    ]


def _refuse_single_object(path, data):
    """A file that is one JSON object holding the records (`{"data": [...]}`) gets an error saying so; a file that
    is not one JSON value (JSONL) or is a single record returns."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return
    if not isinstance(obj, dict) or any(k in obj for k in CONVERSATION_KEYS):
        return
    lists = [(k, len(v)) for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    hint = "".join(f"; its key {k!r} holds a list of {n} objects: write that list alone to the file "
                   f"(e.g. `jq '.{k}' {path}`)" for k, n in lists[:1])
    raise DataFileError(f"data file {path} is one JSON object (keys {sorted(obj)[:8]}), not records: expected a JSON "
                        f"array of records or one record per line (JSONL){hint}")


def _record_id(obj):
    rid = obj.get("id")
    if rid is None:
        conversation = next((obj[k] for k in CONVERSATION_KEYS if k in obj), None)
        image = obj.get("image")
        image = image.sha256 if isinstance(image, InlineImage) else image  # the bytes, wherever they were extracted
        return stable_id(conversation, image, obj.get("chosen"), obj.get("rejected"))
    return str(rid)


def _build_record(obj, rid, source):
    keys = [k for k in CONVERSATION_KEYS if k in obj]
    if not keys:
        raise _Bad("missing field 'question' (or 'prompt')")
    if len(keys) > 1:
        raise _Bad("has both 'question' and 'prompt'; expected one")
    for key in ("image", "chosen", "rejected"):
        if key not in obj:
            raise _Bad(f"missing field '{key}'")
    if isinstance(obj.get("id"), (bool, float, list, dict)):
        raise _Bad("field 'id' must be a string or an integer")
    try:
        turns = parse_conversation(obj[keys[0]])
    except ConversationError as e:
        raise _Bad(f"unparsable conversation in '{keys[0]}': {e}") from None

    image = obj["image"]
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise _Bad("field 'image' must be a non-empty file name (or null for a text-only record)")
    has_marker = any(t.has_image for t in turns)
    if image is None and has_marker:
        raise _Bad("conversation has an <image> marker but 'image' is null")
    if image is not None and not has_marker:
        turns = _attach_image(turns)

    responses = {key: _response(obj, key) for key in RESPONSE_KEYS if key in obj}
    if responses["chosen"] == responses["rejected"]:
        # A pair that cannot teach a preference: its DPO term is ln 2 whatever the policy, its gradient zero.
        raise _Bad("'chosen' and 'rejected' are the same response")
    meta = {k: v for k, v in obj.items() if k not in _OWN_KEYS}
    meta["conversation_key"] = keys[0]
    return Record(
        id=rid, turns=turns, image=image, chosen=responses["chosen"], rejected=responses["rejected"],
        blind=responses.get("blind"), meta=meta, source=source,
    )


def _attach_image(turns):
    """A record naming an image without an <image> marker: the image goes to the last user turn, where MMSafe-PO
    puts it."""
    last_user = max(i for i, t in enumerate(turns) if t.role == "user")
    return [Turn(t.role, t.text, True) if i == last_user else t for i, t in enumerate(turns)]


def _response(obj, key):
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad(f"field '{key}' is {type(value).__name__}, not a string")
    value = value.strip()
    if value.startswith(_RESPONSE_PREFIX):
        value = value[len(_RESPONSE_PREFIX):].lstrip()
    if value.endswith(_END_OF_TURN):
        value = value[: -len(_END_OF_TURN)].rstrip()
    if not value:
        hint = " (regenerate it with bpo/generate_blind.py)" if key == "blind" else ""
        raise _Bad(f"empty {key}{hint}")
    return value


def _check_image(where, max_pixels):
    """None when the image decodes, otherwise the reason. The size is read from the header first, so a huge image is
    refused before it is decoded; verify() checks the structure, load() decodes the pixels (verify alone misses
    truncated JPEGs); verify leaves the file object unusable, hence the second open."""
    from PIL import Image

    if not os.path.isfile(where):
        return f"missing image: {where}"
    too_large = f"image too large: {where} has more than data.max_image_pixels={max_pixels} pixels"
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check (a warning, or an error past twice its limit, which a job may have lowered with
            # enforce_max_image_pixels) would speak before ours: reading the header is safe, so it is off for that.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(where) as im:
                    width, height = im.size
            finally:
                Image.MAX_IMAGE_PIXELS = limit
            if width * height > max_pixels:
                return f"{too_large} ({width}x{height} = {width * height / 1e6:.1f}M)"
            with Image.open(where) as im:
                im.verify()
            with Image.open(where) as im:
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return too_large
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError)
        return f"undecodable image: {where} ({type(e).__name__}: {e})"
    return None


def _progress(items, enabled):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="checking records", unit="rec", disable=None)
