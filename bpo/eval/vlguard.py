"""VLGuard's test set (Zong et al., "Safety Fine-Tuning at (Almost) No Cost: A Baseline for Vision Large Language
Models", ICML 2024; https://github.com/ys-zong/VLGuard, data/test.json) -> EvalExamples.

    examples, bad = load_vlguard("VLGuard/data/test.json", image_root="VLGuard/test")

test.json is a JSON array; each entry names an image (`bad_ads/<uuid>.png`, under the folder the test images unzip
to: eval.image_root) and lists instruction/response pairs in `instr-resp`. A safe image carries one
`safe_instruction` and one `unsafe_instruction`; an unsafe image (`harmful_category`, `harmful_subcategory`) one
`instruction`. The three subsets the paper reports:

    safe_safe     safe image, benign instruction: to be answered (helpfulness; a refusal is over-refusal)
    safe_unsafe   safe image, harmful instruction: to be refused
    unsafe        unsafe image, its instruction: to be refused

An example's id is "<entry id>/<subset>", its meta holds `subset`, `benign` (true for safe_safe), `category`
(harmful_category, or "safe"), `subcategory` and `reference` (the published response).
"""

from bpo.data.conversation import Turn
from bpo.data.records import read_raw_records
from bpo.eval.examples import BadExample, EvalExample, image_under_root

SUBSETS = {"safe_instruction": "safe_safe", "unsafe_instruction": "safe_unsafe", "instruction": "unsafe"}


def _pairs(entry):
    """[(subset, instruction, reference response)] of one entry; ValueError when instr-resp is malformed."""
    pairs = entry.get("instr-resp")
    if not isinstance(pairs, list) or not pairs:
        raise ValueError("no 'instr-resp' list")
    out = []
    for k, pair in enumerate(pairs):
        keys = [key for key in SUBSETS if isinstance(pair, dict) and key in pair]
        if len(keys) != 1 or not isinstance(pair[keys[0]], str) or not pair[keys[0]].strip():
            raise ValueError(f"instr-resp[{k}] must hold one of {list(SUBSETS)} as a non-empty string")
        subset = SUBSETS[keys[0]]
        if (subset == "unsafe") == bool(entry.get("safe")):
            raise ValueError(f"instr-resp[{k}] has {keys[0]!r} but the entry's 'safe' is {entry.get('safe')!r}")
        out.append((subset, pair[keys[0]].strip(), pair.get("response")))
    return out


def load_vlguard(path, image_root="", check_images=True, allow_outside_root=False, subsets=tuple(SUBSETS.values())):
    """Examples in file order (entry by entry, pairs in their order), of the subsets asked for. The file is read by
    the shared reader (a JSON array as published; JSONL or gzipped alike); DataFileError when it cannot be read."""
    examples, bad, seen = [], [], set()
    for source, entry in read_raw_records(path):
        eid = entry.get("id") if isinstance(entry, dict) else None
        try:
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
            if not isinstance(eid, str) or not eid:
                raise ValueError("no string 'id'")
            if eid in seen:
                raise ValueError("duplicate id")
            pairs = _pairs(entry)
        except ValueError as e:
            bad.append(BadExample(source, eid, str(e)))
            continue
        seen.add(eid)
        wanted = [p for p in pairs if p[0] in subsets]
        if not wanted:
            continue
        image, problem = image_under_root(entry.get("image"), image_root, allow_outside_root, check=check_images)
        for subset, instruction, reference in wanted:
            ex_id = f"{eid}/{subset}"
            if problem:
                bad.append(BadExample(source, ex_id, problem))
                continue
            meta = {"subset": subset, "benign": subset == "safe_safe",
                    "category": entry.get("harmful_category", "safe"),
                    "subcategory": entry.get("harmful_subcategory"), "reference": reference}
            examples.append(EvalExample(ex_id, [Turn("user", instruction, True)], image, meta))
    return examples, bad
