"""Test sets -> `EvalExample`s. Layouts and their sources: docs/eval_formats.md; metrics: bpo/eval/metrics.py.

Every loader reads local files only (bpo never downloads) and returns `(examples, bad)`: the usable examples in a
deterministic order and a `BadExample` (source, id, reason) for each unusable entry, as `bpo.data.records` does.
Files are opened by the reader every job shares (bpo.data.formats: JSON, JSONL, either gzipped, parquet with inline
images, hub dataset folders by split), and an image a file names is held to training's rule: it must stay under the
image root unless data.allow_outside_image_root (bpo.data.records.image_name_problem).

    examples, bad = load_test_set("spa_vl", path, image_root=..., split="test/harm", image_cache=...)

- `mmsafe_po` (`load_mmsafe_po`): the training record format, read by `bpo.data.records.load_records`.
- `mm_safetybench` (`load_mm_safetybench`): processed_questions/<scenario>.json + an image folder
  <scenario>/<SD|SD_TYPO|TYPO>/<question id>.jpg, found under the checkout or eval.image_root.
- `spa_vl` (`load_spa_vl_harm`): the `test` config's `harm` split (question, image, class1, class2, class3).
- `figstep` (bpo/eval/figstep.py) and `vlguard` (bpo/eval/vlguard.py).
"""

import base64
import json
import os

from bpo.config import DataConfig
from bpo.data.conversation import Turn
from bpo.data.formats import extract_image
from bpo.data.records import image_path, load_records, read_raw_records
from bpo.eval import figstep, vlguard
from bpo.eval.examples import BadExample, EvalExample, check_image, image_under_root

FORMATS = ("mmsafe_po", "mm_safetybench", "spa_vl", "figstep", "vlguard")


def load_test_set(fmt, path, image_root="", split="", image_cache="", check_images=True, allow_outside_root=False,
                  max_image_pixels=DataConfig.max_image_pixels):
    """The examples of test set `path` in format `fmt` (one of FORMATS): eval.format, eval.test_file, eval.split;
    image_root is eval.image_root, else data.image_root (MM-SafetyBench searches its own checkout without one)."""
    if fmt == "mmsafe_po":
        return load_mmsafe_po(path, image_root, check_images, allow_outside_root, max_image_pixels, split,
                              image_cache)
    if fmt == "mm_safetybench":
        return load_mm_safetybench(path, image_dir=image_root or None, check_images=check_images)
    if fmt == "spa_vl":
        return load_spa_vl_harm(path, image_root, image_cache, split or "", check_images, allow_outside_root)
    if fmt == "figstep":
        return figstep.load_figstep(path, image_dir=image_root or None, check_images=check_images)
    if fmt == "vlguard":
        return vlguard.load_vlguard(path, image_root, check_images, allow_outside_root)
    raise ValueError(f"unknown eval.format {fmt!r}; known: {list(FORMATS)}")


# ---------------------------------------------------------------------------------------------------------------
# MMSafe-PO


def load_mmsafe_po(path, image_root=None, check_images=True, allow_outside_root=False,
                   max_image_pixels=DataConfig.max_image_pixels, split="", image_cache=""):
    """The MMSafe-PO test split (training record format: JSON array, JSONL, the hub's parquet) with its
    chosen/rejected pairs; the image rules are load_records' (data.allow_outside_image_root,
    data.max_image_pixels)."""
    records, bad = load_records(path, image_root, check_images, allow_outside_root=allow_outside_root,
                                max_image_pixels=max_image_pixels, split=split, image_cache=image_cache)
    examples = []
    for r in records:
        meta = dict(r.meta, source=r.source)
        image = image_path(r, image_root) if r.image else None
        examples.append(EvalExample(r.id, list(r.turns), image, meta, r.chosen, r.rejected))
    return examples, [BadExample(b.source, b.id, b.reason) for b in bad]


# ---------------------------------------------------------------------------------------------------------------
# MM-SafetyBench

# Which question field is asked with which image (data/processed_questions/<scenario>.json). "TEXT" is the paper's
# text-only baseline: the original question, no image.
MMSB_QUESTION_FIELD = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question",
                       "TEXT": "Question"}
MMSB_IMAGE_TYPES = ("SD", "SD_TYPO", "TYPO")  # default: the three image attacks
# Folders that may hold <scenario>/<image type>/<id>.jpg, searched in order under the checkout (or under
# eval.image_root when set): the README says to unzip under data/imgs, and the zip's own top folder is
# "MM-SafetyBench(imgs)", so both nestings are found.
_MMSB_ZIP = "MM-SafetyBench(imgs)"
MMSB_IMAGE_DIRS = ("", "imgs", os.path.join("data", "imgs"), _MMSB_ZIP, os.path.join("imgs", _MMSB_ZIP),
                   os.path.join("data", "imgs", _MMSB_ZIP), os.path.join("data", _MMSB_ZIP))
_MMSB_EXTS = (".jpg", ".jpeg", ".png")


def _mmsb_dirs(root, image_dir, scenarios):
    questions = next((d for d in (os.path.join(root, "processed_questions"),
                                  os.path.join(root, "data", "processed_questions")) if os.path.isdir(d)), None)
    if questions is None:
        raise FileNotFoundError(f"no processed_questions/ (or data/processed_questions/) under {root}; point root at "
                                f"the MM-SafetyBench checkout or its data/ folder")
    # The image folder is the first candidate holding a scenario folder: eval.image_root and below it when given
    # (a training image root, which holds none, is passed over), then the checkout and below it.
    bases = ([image_dir] if image_dir else []) + [root]
    candidates = [os.path.join(b, d) for b in bases for d in MMSB_IMAGE_DIRS]
    found = next((c for c in candidates if any(os.path.isdir(os.path.join(c, s)) for s in scenarios)), None)
    return questions, found, candidates


def load_mm_safetybench(root, image_types=MMSB_IMAGE_TYPES, scenarios=None, image_dir=None, check_images=False):
    """One example per (scenario, question id, image type), id "<scenario>/<image type>/<question id>".

    root: the MM-SafetyBench checkout (or its data/), holding processed_questions/<scenario>.json. image_dir: a
    folder holding <scenario>/<image type>/<id>.jpg, or one of MMSB_IMAGE_DIRS above it; searched first, then the
    checkout. scenarios: names like "01-Illegal_Activitiy" (the upstream spelling); None = every question file.
    Order: scenarios by name, question ids by number, then image types in the order given.
    """
    unknown = [t for t in image_types if t not in MMSB_QUESTION_FIELD]
    if unknown:
        raise ValueError(f"unknown MM-SafetyBench image type(s) {unknown}; known: {sorted(MMSB_QUESTION_FIELD)}")
    questions_dir = _mmsb_dirs(root, None, [])[0]
    available = sorted(f[:-5] for f in os.listdir(questions_dir) if f.endswith(".json"))
    wanted = available if scenarios is None else list(scenarios)
    missing = [s for s in wanted if s not in available]
    if missing:
        raise FileNotFoundError(f"no question file for scenario(s) {missing} in {questions_dir}; found {available}")
    _, image_dir, searched = _mmsb_dirs(root, image_dir, wanted)
    if image_dir is None and any(t != "TEXT" for t in image_types):
        raise FileNotFoundError(f"no MM-SafetyBench image folder (one holding <scenario>/SD/<id>.jpg) in {searched}; "
                                f"unzip MM-SafetyBench(imgs).zip under {os.path.join(root, 'data', 'imgs')} or set "
                                f"eval.image_root")
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
                    stems = [os.path.join(scenario, image_type, str(qid)) + e for e in _MMSB_EXTS]
                    name_found = next((s for s in stems if os.path.isfile(os.path.join(image_dir, s))), stems[0])
                    image, problem = image_under_root(name_found, image_dir, check=False)  # a key like "../x"
                    if problem is None and not os.path.isfile(image):
                        problem = f"image not found: {image}"
                    if problem is None and check_images:
                        problem = check_image(image)
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


def _spa_vl_image(value, image_root, image_cache, allow_outside_root, check):
    """The row's image -> (path, problem). value: an InlineImage (parquet bytes, already extracted), a file name
    under image_root (JSON export), or an {bytes, path} record a JSON export kept with the bytes base64-encoded."""
    if isinstance(value, dict) and isinstance(value.get("bytes"), str):
        value = extract_image(base64.b64decode(value["bytes"]), image_cache)
    elif isinstance(value, dict):
        value = value.get("path")
    path, problem = image_under_root(value, image_root, allow_outside_root, check=False)
    if problem is None and check:
        problem = check_image(path)
    return path, problem


def load_spa_vl_harm(path, image_root=None, image_cache="", split="", check_images=True, allow_outside_root=False):
    """SPA-VL's harm evaluation split; id = the row's `id` if the export has one, else "<split>/<row index>".

    path: the hub dataset folder (with split "test/harm" or "harm"), test/harm-00000-of-00001.parquet, or a JSON/JSONL
    export with the same fields, where `image` is a file name under image_root. image_cache: where inline images are
    extracted (default: beside the data). meta: class1, class2, class3 (SPA-VL's harm domain, category and
    subcategory) and split.
    """
    name = split.split("/")[-1] if split else "harm"
    cache = image_cache or (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    examples, bad, seen = [], [], set()
    for index, (source, row) in enumerate(read_raw_records(path, split, image_cache)):
        if not isinstance(row, dict):
            bad.append(BadExample(source, None, "not a JSON object" if row is not None else "not valid JSON"))
            continue
        ex_id = str(row["id"]) if row.get("id") is not None else f"{name}/{index}"
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            bad.append(BadExample(source, ex_id, "no question text"))
            continue
        if ex_id in seen:
            bad.append(BadExample(source, ex_id, "duplicate id"))
            continue
        image = None
        if row.get("image") is not None:
            image, problem = _spa_vl_image(row["image"], image_root, cache, allow_outside_root, check_images)
            if problem:
                bad.append(BadExample(source, ex_id, problem))
                continue
        seen.add(ex_id)
        meta = {"split": name, **{k: row.get(k) for k in ("class1", "class2", "class3")}}
        examples.append(EvalExample(ex_id, [Turn("user", question.strip(), image is not None)], image, meta))
    return examples, bad
