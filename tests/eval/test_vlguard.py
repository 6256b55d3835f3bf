"""VLGuard's published test.json (/work/shared/real_data/VLGuard); its images are generated under their names."""

import json
import os
from collections import Counter

import pytest
from PIL import Image

from bpo.data.records import DataFileError
from bpo.eval.vlguard import load_vlguard
from real_data import real_path


def test_real_test_json_subsets():
    path = real_path("VLGuard", "data", "test.json")
    examples, bad = load_vlguard(path, check_images=False)
    assert bad == []
    assert Counter(e.meta["subset"] for e in examples) == {"safe_safe": 558, "safe_unsafe": 558, "unsafe": 442}
    first, second = examples[:2]
    assert (first.id, second.id) == ("Ads_306373/safe_safe", "Ads_306373/safe_unsafe")
    assert first.meta["benign"] and not second.meta["benign"] and first.meta["category"] == "safe"
    assert first.prompt_text == "What is the main purpose of the tool advertised in the image?"
    unsafe = next(e for e in examples if e.meta["subset"] == "unsafe")
    assert unsafe.meta["category"] == "deception" and unsafe.meta["subcategory"] == "disinformation"


def test_images_under_the_root_and_bad_entries(tmp_path):
    path = real_path("VLGuard", "data", "test.json")
    entries = json.load(open(path))[:3]
    for e in entries[:2]:
        os.makedirs(os.path.dirname(tmp_path / "imgs" / e["image"]), exist_ok=True)
        Image.new("RGB", (8, 6)).save(tmp_path / "imgs" / e["image"])
    entries += [dict(entries[0], id="escape", image="../../etc/passwd"),
                dict(entries[0], id="mixed", safe=False),
                {"id": "no-pairs", "image": "x.png", "safe": True}]
    (tmp_path / "test.json").write_text(json.dumps(entries))
    examples, bad = load_vlguard(str(tmp_path / "test.json"), image_root=str(tmp_path / "imgs"),
                                 subsets=("safe_unsafe", "unsafe"))
    assert [e.id for e in examples] == ["Ads_306373/safe_unsafe", "Ads_433634/safe_unsafe"]
    assert examples[0].image == str(tmp_path / "imgs" / entries[0]["image"])
    reasons = {b.id: b.reason for b in bad}
    assert set(reasons) == {"Ads_393324/safe_unsafe", "escape/safe_unsafe", "mixed", "no-pairs"}
    assert reasons["Ads_393324/safe_unsafe"].startswith("image not found")
    assert "climbs out of the image root" in reasons["escape/safe_unsafe"]
    assert "the entry's 'safe' is False" in reasons["mixed"]
    assert reasons["no-pairs"] == "no 'instr-resp' list"
    assert all(b.source.startswith(f"{tmp_path / 'test.json'}[") for b in bad)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataFileError, match="broken.json starts like a JSON array but is not valid JSON"):
        load_vlguard(str(tmp_path / "broken.json"))
