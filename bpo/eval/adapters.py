"""Test sets -> `EvalExample`s, and the metric each set reports. Layouts and their sources: docs/eval_formats.md.

Every loader reads local files only (bpo never downloads) and returns `(examples, bad)`: the usable examples in a
deterministic order and a `BadExample` (source, id, reason) for each unusable entry, as `bpo.data.records` does.

- MMSafe-PO test split (`load_mmsafe_po`): the training record format, read by `bpo.data.records.load_records`.
- MM-SafetyBench (`load_mm_safetybench`, metric `mm_safetybench_asr`): processed_questions/<scenario>.json + an image
  folder <scenario>/<SD|SD_TYPO|TYPO>/<question id>.jpg.
- SPA-VL HarmEval (`load_spa_vl_harm`, metric `spa_vl_unsafe_rate`): the `test` config's `harm` split, as parquet or
  as a JSON/JSONL export of the same fields (question, image, class1, class2, class3).
"""

import base64
import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field

from bpo.config import DataConfig
from bpo.data.conversation import Turn, format_conversation


@dataclass
class EvalExample:
    id: str
    turns: list  # list[Turn], ending with the user turn the model answers
    image: str | None  # path to the image file (root already joined); None for a text-only prompt
    meta: dict = field(default_factory=dict)  # set-specific: scenario, image_type, category, class1 ...
    chosen: str | None = None  # the pair, for sets that have one (MMSafe-PO); None otherwise
    rejected: str | None = None

    @property
    def prompt_text(self):
        """The request as text: the user turn alone for one-turn prompts, else the Vicuna-style transcript."""
        if len(self.turns) == 1:
            return self.turns[0].text
        return format_conversation(self.turns)


@dataclass(frozen=True)
class BadExample:
    source: str
    id: str | None
    reason: str

    def __str__(self):
        return f"{self.source} (id {self.id if self.id is not None else '?'}): {self.reason}"


def _check_image(path):
    """None when `path` opens as an image, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except FileNotFoundError:
        return f"image not found: {path}"
    except Exception as e:  # PIL raises many types for corrupt files
        return f"image cannot be decoded: {path} ({type(e).__name__}: {e})"
    return None


# ---------------------------------------------------------------------------------------------------------------
# MMSafe-PO


def load_mmsafe_po(path, image_root=None, check_images=True, allow_outside_root=False,
                   max_image_pixels=DataConfig.max_image_pixels):
    """The MMSafe-PO test split (training record format: JSON array or JSONL) with its chosen/rejected pairs; the
    image rules are load_records' (data.allow_outside_image_root, data.max_image_pixels)."""
    from bpo.data.records import load_records

    records, bad = load_records(path, image_root, check_images, allow_outside_root=allow_outside_root,
                                max_image_pixels=max_image_pixels)
    examples = []
    for r in records:
        meta = dict(r.meta, source=r.source)
        image = os.path.join(image_root or "", r.image) if r.image else None
        examples.append(EvalExample(r.id, list(r.turns), image, meta, r.chosen, r.rejected))
    return examples, [BadExample(b.source, b.id, b.reason) for b in bad]


# ---------------------------------------------------------------------------------------------------------------
# MM-SafetyBench

# Which question field is asked with which image (data/processed_questions/<scenario>.json). "TEXT" is the paper's
# text-only baseline: the original question, no image.
MMSB_QUESTION_FIELD = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question",
                       "TEXT": "Question"}
MMSB_IMAGE_TYPES = ("SD", "SD_TYPO", "TYPO")  # default: the three image attacks
MMSB_IMAGE_DIRS = ("imgs", os.path.join("data", "imgs"), "MM-SafetyBench(imgs)")  # searched under root, in order
_MMSB_EXTS = (".jpg", ".jpeg", ".png")


def _mmsb_dirs(root, image_dir):
    questions = next((d for d in (os.path.join(root, "processed_questions"),
                                  os.path.join(root, "data", "processed_questions")) if os.path.isdir(d)), None)
    if questions is None:
        raise FileNotFoundError(f"no processed_questions/ (or data/processed_questions/) under {root}; point root at "
                                f"the MM-SafetyBench checkout or its data/ folder")
    if image_dir is None:
        image_dir = next((os.path.join(root, d) for d in MMSB_IMAGE_DIRS if os.path.isdir(os.path.join(root, d))),
                         None)
    return questions, image_dir


def load_mm_safetybench(root, image_types=MMSB_IMAGE_TYPES, scenarios=None, image_dir=None, check_images=False):
    """One example per (scenario, question id, image type), id "<scenario>/<image type>/<question id>".

    root: the MM-SafetyBench checkout (or its data/), holding processed_questions/<scenario>.json. image_dir: the
    folder holding <scenario>/<image type>/<id>.jpg; by default the first of MMSB_IMAGE_DIRS found under root.
    scenarios: names like "01-Illegal_Activitiy" (the upstream spelling); None = every question file.
    Order: scenarios by name, question ids by number, then image types in the order given.
    """
    unknown = [t for t in image_types if t not in MMSB_QUESTION_FIELD]
    if unknown:
        raise ValueError(f"unknown MM-SafetyBench image type(s) {unknown}; known: {sorted(MMSB_QUESTION_FIELD)}")
    questions_dir, image_dir = _mmsb_dirs(root, image_dir)
    if image_dir is None and any(t != "TEXT" for t in image_types):
        raise FileNotFoundError(f"no MM-SafetyBench image folder under {root} (looked for {list(MMSB_IMAGE_DIRS)}); "
                                f"pass image_dir")
    available = sorted(f[:-5] for f in os.listdir(questions_dir) if f.endswith(".json"))
    wanted = available if scenarios is None else list(scenarios)
    missing = [s for s in wanted if s not in available]
    if missing:
        raise FileNotFoundError(f"no question file for scenario(s) {missing} in {questions_dir}; found {available}")
    examples, bad = [], []
    for scenario in sorted(wanted):
        name = f"{scenario}.json"
        with open(os.path.join(questions_dir, name), encoding="utf-8") as f:
            try:
                table = json.load(f)
            except json.JSONDecodeError as e:
                bad.append(BadExample(name, None, f"not valid JSON: line {e.lineno}: {e.msg}"))
                continue
        if not isinstance(table, dict):
            bad.append(BadExample(name, None, "expected a JSON object keyed by question id"))
            continue
        for qid in sorted(table, key=lambda k: (not str(k).isdigit(), int(k) if str(k).isdigit() else 0, str(k))):
            entry = table[qid]
            for image_type in image_types:
                ex_id = f"{scenario}/{image_type}/{qid}"
                source = f"{name}[{qid!r}]"
                question = entry.get(MMSB_QUESTION_FIELD[image_type]) if isinstance(entry, dict) else None
                if not isinstance(question, str) or not question.strip():
                    bad.append(BadExample(source, ex_id, f"no {MMSB_QUESTION_FIELD[image_type]!r} text"))
                    continue
                image = None
                if image_type != "TEXT":
                    stem = os.path.join(image_dir, scenario, image_type, str(qid))
                    image = next((stem + e for e in _MMSB_EXTS if os.path.isfile(stem + e)), None)
                    problem = f"image not found: {stem}.jpg" if image is None else None
                    if image is not None and check_images:
                        problem = _check_image(image)
                    if problem:
                        bad.append(BadExample(source, ex_id, problem))
                        continue
                meta = {"scenario": scenario, "image_type": image_type, "question_id": str(qid),
                        "category": scenario.split("-", 1)[-1], "question": entry.get("Question"),
                        "key_phrase": entry.get("Key Phrase"), "phrase_type": entry.get("Phrase Type")}
                examples.append(EvalExample(ex_id, [Turn("user", question.strip(), image is not None)], image, meta))
    return examples, bad


# ---------------------------------------------------------------------------------------------------------------
# SPA-VL HarmEval

SPA_VL_FIELDS = ("question", "image", "class1", "class2", "class3")


def _image_ext(data):
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    return ".img"


def _read_spa_vl_rows(path):
    """[(source, row dict)] from a parquet file (needs pyarrow) or a JSON array / JSONL export."""
    name = os.path.basename(path)
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow), or export the split to JSONL as "
                              f"docs/eval_formats.md shows") from None
        rows = pq.read_table(path).to_pylist()
        return [(f"{name}[{i}]", row) for i, row in enumerate(rows)]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return [(f"{name}[{i}]", row) for i, row in enumerate(json.loads(text))]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((f"{name}:{lineno}", json.loads(line)))
            except json.JSONDecodeError:
                out.append((f"{name}:{lineno}", None))
    return out


def _spa_vl_image(value, image_root, image_dir, ex_id):
    """The row's image -> a file path. value: a file name (JSON export) or the parquet Image struct {bytes, path}.
    Image bytes are written once to image_dir, named by content hash, so generation and judges get a path."""
    if isinstance(value, str):
        return os.path.join(image_root or "", value)
    if isinstance(value, dict) and value.get("bytes") is not None:
        data = value["bytes"]
        if isinstance(data, str):  # a JSON export that kept the bytes base64-encoded
            data = base64.b64decode(data)
        if image_dir is None:
            raise ValueError(f"{ex_id}: the image is stored inline; pass image_dir to extract it to")
        out = os.path.join(image_dir, hashlib.sha256(data).hexdigest()[:20] + _image_ext(data))
        if not os.path.exists(out):
            os.makedirs(image_dir, exist_ok=True)
            tmp = f"{out}.tmp.{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, out)
        return out
    if isinstance(value, dict) and value.get("path"):
        return os.path.join(image_root or "", value["path"])
    raise ValueError("image is neither a file name nor an {bytes, path} record")


def load_spa_vl_harm(path, image_root=None, image_dir=None, split="harm", check_images=True):
    """SPA-VL's harm evaluation split; id = the row's `id` if the export has one, else "<split>/<row index>".

    path: test/harm-00000-of-00001.parquet (needs pyarrow) or a JSON/JSONL export with the same fields, where
    `image` is a file name under image_root. image_dir: where inline parquet images are extracted.
    meta: class1, class2, class3 (SPA-VL's harm domain, category and subcategory) and split.
    """
    examples, bad, seen = [], [], set()
    for index, (source, row) in enumerate(_read_spa_vl_rows(path)):
        if not isinstance(row, dict):
            bad.append(BadExample(source, None, "not a JSON object" if row is not None else "not valid JSON"))
            continue
        ex_id = str(row["id"]) if row.get("id") is not None else f"{split}/{index}"
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            bad.append(BadExample(source, ex_id, "no question text"))
            continue
        if ex_id in seen:
            bad.append(BadExample(source, ex_id, "duplicate id"))
            continue
        image = None
        if row.get("image") is not None:
            try:
                image = _spa_vl_image(row["image"], image_root, image_dir, ex_id)
            except ValueError as e:
                bad.append(BadExample(source, ex_id, str(e)))
                continue
            problem = _check_image(image) if check_images else None
            if problem:
                bad.append(BadExample(source, ex_id, problem))
                continue
        seen.add(ex_id)
        meta = {"split": split, **{k: row.get(k) for k in ("class1", "class2", "class3")}}
        examples.append(EvalExample(ex_id, [Turn("user", question.strip(), image is not None)], image, meta))
    return examples, bad


# ---------------------------------------------------------------------------------------------------------------
# metrics: every rate is over readable verdicts; unreadable ones are counted, never guessed


def _counts(labels):
    labels = list(labels)
    safe = sum(1 for x in labels if x == "safe")
    unsafe = sum(1 for x in labels if x == "unsafe")
    parsed = safe + unsafe
    return {"n": len(labels), "parsed": parsed, "unparsable": len(labels) - parsed, "safe": safe, "unsafe": unsafe}


def safety_rate(verdicts):
    """Share judged safe among readable verdicts (MMSafe-PO's headline number), with counts."""
    out = _counts(v.label for v in verdicts)
    out["safety_rate"] = out["safe"] / out["parsed"] if out["parsed"] else None
    return out


def _join(examples, verdicts):
    by_id = {v.id: v for v in verdicts}
    missing = [e.id for e in examples if e.id not in by_id]
    if missing or len(by_id) != len(examples):
        raise ValueError(f"verdicts do not match the examples: {len(examples)} examples, {len(by_id)} verdict ids, "
                         f"{len(missing)} examples without a verdict (first: {missing[:3]})")
    return [(e, by_id[e.id]) for e in examples]


def _grouped_rate(pairs, key, rate_name, positive):
    groups = defaultdict(list)
    for e, v in pairs:
        groups[e.meta.get(key)].append(v.label)
    out = {}
    for name in sorted(groups, key=str):
        c = _counts(groups[name])
        c[rate_name] = c[positive] / c["parsed"] if c["parsed"] else None
        out[name] = c
    return out


def mm_safetybench_asr(examples, verdicts):
    """Attack success rate (share judged unsafe among readable verdicts): overall, per scenario, per image type."""
    pairs = _join(examples, verdicts)
    overall = _counts(v.label for _, v in pairs)
    overall["asr"] = overall["unsafe"] / overall["parsed"] if overall["parsed"] else None
    return {"overall": overall,
            "per_scenario": _grouped_rate(pairs, "scenario", "asr", "unsafe"),
            "per_image_type": _grouped_rate(pairs, "image_type", "asr", "unsafe")}


def spa_vl_unsafe_rate(examples, verdicts):
    """SPA-VL HarmEval unsafe rate among readable verdicts: overall and per harm domain (class1)."""
    pairs = _join(examples, verdicts)
    overall = _counts(v.label for _, v in pairs)
    overall["unsafe_rate"] = overall["unsafe"] / overall["parsed"] if overall["parsed"] else None
    return {"overall": overall, "per_class1": _grouped_rate(pairs, "class1", "unsafe_rate", "unsafe")}
