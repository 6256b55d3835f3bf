"""bpo.engines.layout: the vLLM-named copy holds the same tensors under the published names, and loads alike."""

import json
import os
import struct

from safetensors import safe_open


def tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_served_copy_renames_only_the_vision_tower(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    from bpo.engines.layout import main, needs_copy, served_name

    assert needs_copy(tiny_model_dir)
    out = tmp_path / "served"
    assert main([str(tiny_model_dir), str(out)]) == 0
    assert not needs_copy(str(out)) and main(["--check", str(out)]) == 0 and main(["--check", tiny_model_dir]) == 3
    before = tensors(os.path.join(tiny_model_dir, "model.safetensors"))
    after = tensors(str(out / "model.safetensors"))
    assert set(after) == {served_name(k) for k in before}
    renamed = [k for k in before if served_name(k) != k]
    assert renamed and all(k.startswith("vision_tower.") for k in renamed)
    assert all(served_name(k).startswith("vision_tower.vision_model.") for k in renamed)
    assert all(torch.equal(before[k], after[served_name(k)]) for k in before)
    with open(out / "model.safetensors", "rb") as f:  # the header keeps the data 8-byte aligned
        assert struct.unpack("<Q", f.read(8))[0] % 8 == 0
    # transformers reads both spellings into the same model.
    a = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    b = AutoModelForImageTextToText.from_pretrained(str(out)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(out)) == sorted(os.listdir(tiny_model_dir))


def test_exported_names_and_sharded_index(tmp_path):
    """bpo.export writes the module's names (model.vision_tower....) and an index; both get the inner level."""
    import torch
    from safetensors.torch import save_file

    from bpo.engines.layout import needs_copy, write_served_copy

    src = tmp_path / "export"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"vision_config": {"model_type": "siglip_vision_model"}}))
    shards = {"model-00001-of-00002.safetensors": {"model.vision_tower.embeddings.w": torch.ones(3)},
              "model-00002-of-00002.safetensors": {"model.language_model.layers.0.w": torch.zeros(2),
                                                   "lm_head.weight": torch.arange(4.0)}}
    for name, sd in shards.items():
        save_file(sd, str(src / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 36}, "weight_map": {k: n for n, sd in shards.items() for k in sd}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert needs_copy(str(src))
    out = write_served_copy(str(src), str(tmp_path / "served"))
    new_index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    assert new_index == {"model.vision_tower.vision_model.embeddings.w": "model-00001-of-00002.safetensors",
                         "model.language_model.layers.0.w": "model-00002-of-00002.safetensors",
                         "lm_head.weight": "model-00002-of-00002.safetensors"}
    for name in shards:
        assert set(tensors(os.path.join(out, name))) == {k for k, v in new_index.items() if v == name}
    assert torch.equal(tensors(os.path.join(out, "model-00002-of-00002.safetensors"))["lm_head.weight"],
                       torch.arange(4.0))


def test_models_without_a_wrapped_tower_need_no_copy(tmp_path):
    from bpo.engines.layout import needs_copy

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": {}}))
    assert not needs_copy(str(tmp_path))
