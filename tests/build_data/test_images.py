"""Stage 2: the image bank (directory and index file), fuzzy names, content-named copies, and the diffusers option's
plumbing (with a stand-in pipeline: the real one needs weights the tests do not have)."""

import hashlib
import json
import os
import sys
import types

import pytest
from PIL import Image

from bpo.build_data.images import DiffusersImages, ImageBank, normalize_name
from bpo.build_data.report import Drop
from bpo.config import BuildImageConfig, ConfigError


def png(path, color):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16] + ".png"


@pytest.fixture
def bank_dir(tmp_path):
    names = {"Barack_Obama.png": (255, 0, 0), "places/Eiffel Tower.png": (0, 255, 0), "Zebra.png": (0, 0, 255)}
    stored = {k: png(str(tmp_path / "bank" / k), c) for k, c in names.items()}
    (tmp_path / "bank" / "notes.txt").write_text("not an image")
    return str(tmp_path / "bank"), stored


def test_normalize_name():
    assert normalize_name("The  Eiffel_Tower!") == "eiffel tower"
    assert normalize_name("Beyoncé Knowles-Carter") == "beyonce knowles carter"


def test_directory_bank_exact_and_fuzzy(bank_dir, tmp_path):
    root, stored = bank_dir
    out = str(tmp_path / "out")
    os.makedirs(out)
    bank = ImageBank(root, 0.85, out)
    assert len(bank.names) == 3  # notes.txt is no image
    found = bank.lookup("barack obama")
    assert found.name == stored["Barack_Obama.png"]
    assert found.source == {"bank": "Barack_Obama", "file": "Barack_Obama.png", "similarity": 1.0}
    assert os.listdir(out) == []  # copied only when the record is written
    bank.store(found)
    with open(os.path.join(out, found.name), "rb") as a, open(os.path.join(root, "Barack_Obama.png"), "rb") as b:
        assert a.read() == b.read()
    # "barak obama" vs "barack obama": 11 matching characters of 23 -> 2 * 11 / 23 = 0.9565
    fuzzy = bank.lookup("Barak Obama")
    assert (fuzzy.name, fuzzy.source) == (stored["Barack_Obama.png"],
                                          {"bank": "Barack_Obama", "file": "Barack_Obama.png", "similarity": 0.9565})
    assert bank.lookup("the Eiffel Tower").name == stored["places/Eiffel Tower.png"]
    # "obamma" vs "barack obama": "obam" + "a" = 5 matching of 18 -> 0.5556, under 0.85
    with pytest.raises(Drop, match="closest: 'Barack_Obama' at similarity 0.56") as e:
        bank.lookup("Obamma")
    assert e.value.code == "no_image"
    with pytest.raises(Drop, match="no name shares a word"):
        bank.lookup("Quetzalcoatl")


def test_index_bank_aliases_relative_paths_and_shared_files(tmp_path):
    name = png(str(tmp_path / "imgs" / "musk.png"), (9, 9, 9))
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"Elon Musk": "imgs/musk.png", "Elon Reeve Musk": "imgs/musk.png",
                                 "Ghost": "imgs/missing.png"}))
    out = str(tmp_path / "out")
    os.makedirs(out)
    bank = ImageBank(str(index), 0.9, out)
    for alias in ("Elon Musk", "elon reeve musk"):
        found = bank.lookup(alias)
        assert found.name == name
        bank.store(found)
    assert os.listdir(out) == [name]  # one file for both names
    with pytest.raises(Drop, match="the bank's image for 'Ghost' cannot be read"):
        bank.lookup("Ghost")

    jsonl = tmp_path / "index.jsonl"
    jsonl.write_text(json.dumps({"name": "Elon Musk", "image": str(tmp_path / "imgs" / "musk.png")}) + "\n"
                     + json.dumps({"name": "broken"}) + "\n")
    with pytest.raises(ConfigError, match=f"entry {jsonl}:2 must be"):
        ImageBank(str(jsonl), 0.9, out)
    with pytest.raises(ConfigError, match="neither a directory nor an index file"):
        ImageBank(str(tmp_path / "nowhere"), 0.9, out)


def test_diffusers_option_loads_safetensors_locally_and_seeds_by_entity(tmp_path, monkeypatch):
    calls = []

    class Pipeline:
        @classmethod
        def from_pretrained(cls, path, **kwargs):
            calls.append(("load", path, kwargs))
            return cls()

        def to(self, device):
            return self

        def __call__(self, prompt, num_inference_steps, generator):
            calls.append(("draw", prompt, num_inference_steps, generator.initial_seed()))
            return types.SimpleNamespace(images=[Image.new("RGB", (4, 4), (len(prompt), 0, 0))])

    monkeypatch.setitem(sys.modules, "diffusers", types.SimpleNamespace(AutoPipelineForText2Image=Pipeline))
    model = tmp_path / "sd"
    model.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    cfg = BuildImageConfig(backend="diffusers", diffusers_model=str(model), diffusers_steps=3, seed=5)
    images = DiffusersImages(cfg, str(out))
    found = images.lookup("Elon Musk")
    seed = int(hashlib.sha256(b"5|Elon Musk").hexdigest()[:8], 16)
    assert found.source == {"generated": str(model), "prompt": "a photo of Elon Musk", "seed": seed}
    assert calls == [("load", str(model), {"use_safetensors": True, "local_files_only": True}),
                     ("draw", "a photo of Elon Musk", 3, seed)]
    assert sorted(os.listdir(out)) == [found.name]  # the temporary drawing is gone
    with open(out / found.name, "rb") as f:
        assert found.name == hashlib.sha256(f.read()).hexdigest()[:16] + ".png"
    with pytest.raises(ConfigError, match="not a local pipeline directory"):
        DiffusersImages(BuildImageConfig(backend="diffusers", diffusers_model=str(tmp_path / "none")), str(out))
