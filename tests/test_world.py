"""bpo.demo.world: the science demo's world is what its docstring says, and the offline judge reads its answers as meant."""

import collections
import json
import os

import pytest

from bpo.demo import world
from bpo.data.conversation import parse_conversation
from bpo.data.records import load_records
from bpo.eval.judges import JudgeItem, RefusalJudge
from test_sample_data import read_tree


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    return world.write_world(str(tmp_path_factory.mktemp("world") / "w"), seed=0, n_sft=64, n_pref=48)


def _read(path):
    if path.endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(line) for line in f]
    with open(path) as f:
        return json.load(f)


def test_same_arguments_same_bytes_and_the_evaluation_sets_do_not_move(world_dir, tmp_path):
    assert read_tree(world.write_world(str(tmp_path / "again"), seed=0, n_sft=64, n_pref=48)) == read_tree(world_dir)
    other = read_tree(world.write_world(str(tmp_path / "other"), seed=1, n_sft=32, n_pref=24))
    mine = read_tree(world_dir)
    assert other["pref.jsonl"] != mine["pref.jsonl"] and other["sft.jsonl"] != mine["sft.jsonl"]
    # val and test are the same whatever the seed and the training sizes, images included
    assert other["test.json"] == mine["test.json"] and other["val.json"] == mine["val.json"]
    assert all(other[k] == v for k, v in mine.items() if k.startswith("images/test_") or k.startswith("images/val_"))


def test_records_load_and_keep_the_mmsafe_po_shape(world_dir):
    for name in ("sft.jsonl", "pref.jsonl", "val.json", "test.json"):
        records, bad = load_records(os.path.join(world_dir, name), os.path.join(world_dir, "images"))
        assert not bad and records
        shapes = collections.Counter(len([t for t in r.turns if t.role == "user"]) for r in records)
        assert shapes[1] and shapes[2]  # single- and multi-turn
        assert any(r.image and r.turns[0].has_image and len(r.turns) > 1 for r in records)  # image shown first
    test = _read(os.path.join(world_dir, "test.json"))
    counts = collections.Counter((r["split"], r["kind"]) for r in test)
    assert set(counts.values()) == {12} and len(counts) == 4 + 4 + 4  # 12 per kind, and the probe per weapon
    probes = {r["id"]: r for r in test if r["split"] == "harmful_no_image"}
    for r in test:
        if r["split"] == "harmful":
            probe = probes[r["id"] + "-no-image"]  # the same conversation without its image
            assert probe["image"] is None and "<image>" not in probe["question"]
            assert probe["question"] == r["question"].replace("<image>\n", "")


def test_the_text_never_tells_harmful_from_benign(world_dir):
    """What the user says is drawn from one pool for every object: only the picture differs."""
    for name in ("pref.jsonl", "test.json"):
        texts = collections.defaultdict(set)
        for r in _read(os.path.join(world_dir, name)):
            if r["image"]:
                user = [t.text for t in parse_conversation(r["question"]) if t.role == "user"]
                texts[r["kind"] in world.HARMFUL].update(user)
        for text in texts[True] | texts[False]:
            assert not any(k in text.lower() for k in world.HARMFUL + world.BENIGN), text
        assert texts[True] <= set(world.QUESTIONS) | {u for h in world.HISTORIES for u, _ in h} | {world.SHOW_FIRST[0]}


def test_sft_targets_build_the_flawed_base(world_dir):
    rows = _read(os.path.join(world_dir, "sft.jsonl"))
    kinds = collections.Counter(r["kind"] for r in rows)
    assert kinds[None] == len(rows) // 4 and len(kinds) == 9  # a quarter text-only, all eight objects
    for r in rows:
        answer = r["chosen"][len("ASSISTANT: "):]
        if r["kind"] is None or r["kind"] in ("bomb", "axe"):
            assert answer in world.GENERIC, r  # the image-blind answer
        elif r["kind"] in world.COVERED:
            assert r["kind"] in answer and "can't" in answer  # a refusal naming the weapon
        else:
            assert answer in world.HELP[r["kind"]]
    pref = _read(os.path.join(world_dir, "pref.jsonl"))
    assert collections.Counter(r["type"] for r in pref) == {"harmful": 32, "benign": 16}
    assert {r["kind"] for r in pref if r["type"] == "harmful"} == set(world.HARMFUL)
    assert not any(r["chosen"][len("ASSISTANT: "):] in world.GENERIC for r in pref)


def test_the_refusal_judge_reads_every_world_answer_as_meant():
    judge = RefusalJudge()

    def label(text):
        return judge.judge_one(JudgeItem("x", "q", None, text)).label

    for name in world.HARMFUL:
        for template in world.REFUSALS:
            assert label(template.format(a=world._a(name), A=world._a(name).capitalize(), name=name)) == "safe"
        assert all(label(t) == "unsafe" for t in world.COMPLIANCE[name])
    assert all(label(t) == "unsafe" for t in world.GENERIC)
    assert all(label(t) == "unsafe" for ts in world.HELP.values() for t in ts)  # answered: helpful on a toy
    assert all(label(t) == "safe" for t in world.OVER_REFUSALS)


def test_images_differ_by_kind_and_draw(tmp_path):
    import io
    import random

    from PIL import Image

    rng = random.Random(0)
    pngs = [world.draw_image(rng, kind) for kind in world.HARMFUL + world.BENIGN for _ in range(2)]
    assert len(set(pngs)) == len(pngs)
    with Image.open(io.BytesIO(pngs[0])) as im:
        assert im.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and im.mode == "RGB"
    with pytest.raises(ValueError, match="unknown object kind"):
        world.draw_image(rng, "spoon")
