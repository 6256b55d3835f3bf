"""The offline reference cache: same numbers as the live reference, resumable, repaired when damaged, and every
refusal."""

import json
import os
import shutil

import pytest
import torch

from jobs import REPO, add_blind, read_metrics, run_job, write_config

COMPARED = ["loss", "rewards/chosen", "rewards/rejected", "rewards/blind", "margins/blind", "accuracies/rejected",
            "grad_norm"]


LONG_ID = "long-prompt"


def with_long_prompt(src, dst):
    """The training file plus one record whose prompt alone exceeds max_length=160 (prompts are never cut)."""
    lines = open(src).read().splitlines()
    row = json.loads(lines[0])
    row.update(id=LONG_ID, question="USER: <image>\n" + "Tell me about the building in the image. " * 40 +
               "ASSISTANT:")
    with open(dst, "w") as f:
        f.write("\n".join(lines + [json.dumps(row)]) + "\n")
    return str(dst)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, sample_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("refcache")
    data = add_blind(os.path.join(sample_data_dir, "train.jsonl"), root / "train_blind.jsonl")
    data = with_long_prompt(data, root / "train_long.jsonl")
    sections = {
        "model": {"path": str(tiny_model_dir), "dtype": "fp32"},
        # skip_bad: the cache job and training must leave out the same record (the one with the long prompt).
        "data": {"train_file": data, "image_root": os.path.join(sample_data_dir, "images"), "max_length": 160,
                 "skip_bad": True},
        "optim": {"lr": 5e-3, "warmup_steps": 1},
        "train": {"output_dir": str(root / "live"), "ds_config": os.path.join(REPO, "ds_configs/zero3_cpu.json"),
                  "micro_batch_size": 2, "grad_accum": 1, "max_steps": 4, "plot": False, "tensorboard": False},
        "cache": {"output_dir": str(root / "cache"), "shard_size": 5, "batch_size": 3},
    }
    config = write_config(root / "cfg.yaml", sections)
    proc = run_job("ref_logprobs.py", config)
    assert f"(id {LONG_ID}): prompt too long" in proc.stdout  # reported, and the job went on
    return root, config, sections


def test_cached_training_equals_live(setup):
    root, config, _ = setup
    run_job("train.py", config)
    run_job("train.py", config, [f"train.ref_cache={root / 'cache'}", f"train.output_dir={root / 'cached'}"])
    live, cached = read_metrics(root / "live"), read_metrics(root / "cached")
    assert len(live) == len(cached) == 4
    for a, b in zip(live, cached):
        for key in COMPARED:
            if key.startswith("accuracies/") and abs(a["margins/rejected"]) < 1e-5:
                # Step 1: policy = reference, margins are 0 live and ~1e-7 cached (the cache job batches, hence
                # pads, differently); "margin > 0" over rounding noise is a coin toss, not a property to test.
                continue
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)


def test_cache_contents(setup):
    from bpo.ref_cache.store import read_manifest, read_shard

    root, _, _ = setup
    manifest = read_manifest(root / "cache")
    assert manifest["complete"] and manifest["num_examples"] == 48 and manifest["num_shards"] == 10  # 49 less 1
    ids, values = read_shard(os.path.join(root / "cache", "shard_00000.safetensors"))
    assert len(ids) == 5 and set(values) == {"chosen", "rejected", "blind"}
    assert torch.isfinite(values["blind"]).all() and (values["chosen"] < 0).all()


def test_kill_and_resume_gives_identical_cache(setup, tmp_path):
    root, config, _ = setup
    out = tmp_path / "cache"
    proc = run_job("ref_logprobs.py", config, [f"cache.output_dir={out}"], env={"BPO_CRASH_AFTER": "ref_shards:2"},
                   check=False)
    assert proc.returncode != 0
    done = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert 2 <= len(done) < 10 and not json.load(open(out / "manifest.json"))["complete"]
    stamps = {f: os.stat(out / f).st_mtime_ns for f in done}
    proc = run_job("ref_logprobs.py", config, [f"cache.output_dir={out}"])
    assert "already done" in proc.stdout
    assert all(os.stat(out / f).st_mtime_ns == t for f, t in stamps.items())  # finished shards not redone
    for name in sorted(os.listdir(root / "cache")):
        if name.endswith(".safetensors"):
            assert open(out / name, "rb").read() == open(root / "cache" / name, "rb").read(), name
    assert json.load(open(out / "manifest.json")) == json.load(open(root / "cache" / "manifest.json"))


def _cfg(sections, **changes):
    from bpo.config import from_dict

    return from_dict(sections, [f"{k.replace('__', '.')}={v}" for k, v in changes.items()])


@pytest.fixture
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def test_refuses_a_cache_for_other_settings(setup, processor):
    from bpo.ref_cache.store import CacheError, CachedReference

    root, _, sections = setup
    cfg = _cfg(sections, data__max_length=200)
    with pytest.raises(CacheError, match="max_length 160 in cache vs 200 in config"):
        CachedReference(str(root / "cache"), cfg, processor)
    cfg = _cfg(sections, model__dtype="bf16", loss__reduction="mean")
    with pytest.raises(CacheError) as e:
        CachedReference(str(root / "cache"), cfg, processor)
    assert "dtype fp32 in cache vs bf16 in config" in str(e.value) and "reduction sum in cache vs mean" in str(e.value)


def test_refuses_other_data_and_missing_ids(setup, processor, tmp_path):
    from bpo.data.records import load_records
    from bpo.ref_cache.store import CacheError, CachedReference

    root, _, sections = setup
    changed = tmp_path / "other.jsonl"
    lines = open(sections["data"]["train_file"]).read().splitlines()
    row = json.loads(lines[0])
    row["id"] = "brand-new-id"
    changed.write_text("\n".join(lines + [json.dumps(row)]) + "\n")
    cfg = _cfg(sections, data__train_file=str(changed))
    with pytest.raises(CacheError, match="data_file"):
        CachedReference(str(root / "cache"), cfg, processor)
    # Skipping the fingerprint (no processor) still catches the id the cache never saw.
    reference = CachedReference(str(root / "cache"), cfg)
    records, _ = load_records(str(changed), sections["data"]["image_root"])
    records = [r for r in records if r.id != LONG_ID]  # what training scores: the usable ones
    with pytest.raises(CacheError, match="example id 'brand-new-id'"):
        reference.check_ids(records, ("chosen", "rejected", "blind"))


def test_refuses_incomplete_and_missing_cache(setup, tmp_path, processor):
    from bpo.ref_cache.store import CacheError, CachedReference

    root, _, sections = setup
    cfg = _cfg(sections)
    with pytest.raises(CacheError, match="no manifest.json"):
        CachedReference(str(tmp_path), cfg, processor)
    manifest = json.load(open(root / "cache" / "manifest.json"))
    manifest["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="incomplete"):
        CachedReference(str(tmp_path), cfg, processor)


def test_training_refuses_mismatched_cache_before_loading_weights(setup):
    root, config, _ = setup
    proc = run_job("train.py", config, [f"train.ref_cache={root / 'cache'}", "data.max_length=150",
                                        f"train.output_dir={root / 'bad'}"], check=False)
    assert proc.returncode != 0
    assert "max_length 160 in cache vs 150 in config" in proc.stdout + proc.stderr


def test_damaged_shard_and_manifest_are_redone(setup, tmp_path):
    root, config, _ = setup
    out = tmp_path / "cache"
    shutil.copytree(root / "cache", out)
    shard = out / "shard_00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])  # a copy cut short, a disk error
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    stamps = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.endswith(".safetensors")}
    proc = run_job("ref_logprobs.py", config, [f"cache.output_dir={out}"])
    assert f"redoing {shard}: unreadable" in proc.stdout and "9 already done" in proc.stdout
    assert f"cannot read {manifest}" in proc.stdout + proc.stderr
    for name in sorted(stamps):
        assert (out / name).read_bytes() == (root / "cache" / name).read_bytes(), name
        assert (os.stat(out / name).st_mtime_ns == stamps[name]) == (name != shard.name), name  # only it redone
    assert json.load(open(manifest)) == json.load(open(root / "cache" / "manifest.json"))


def test_reading_a_damaged_cache_names_the_file(setup, processor, tmp_path):
    from bpo.ref_cache.store import CacheError, CachedReference

    root, _, sections = setup
    cfg = _cfg(sections)
    out = tmp_path / "cache"
    shutil.copytree(root / "cache", out)
    shard = out / "shard_00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(CacheError, match=f"cannot read reference cache shard {shard}.*bpo/ref_logprobs.py"):
        CachedReference(str(out), cfg, processor)
    (out / "manifest.json").write_text('{"format": 2, "compl')
    with pytest.raises(CacheError, match=f"cannot read {out / 'manifest.json'}.*cache.output_dir={out}"):
        CachedReference(str(out), cfg, processor)


def test_refuses_a_cache_whose_images_changed(setup, processor, tmp_path):
    from PIL import Image

    from bpo.ref_cache.store import CacheError, CachedReference

    root, _, sections = setup
    images = tmp_path / "images"
    shutil.copytree(sections["data"]["image_root"], images)
    CachedReference(str(root / "cache"), _cfg(sections, data__image_root=images), processor)  # same pictures: fine
    with Image.open(images / "train_0003.png") as im:
        repainted = im.convert("RGB").point(lambda v: 255 - v)
    repainted.save(images / "train_0003.png")
    with pytest.raises(CacheError, match="images .* in cache vs .* in config"):
        CachedReference(str(root / "cache"), _cfg(sections, data__image_root=images), processor)


def test_fingerprint_covers_the_scoring_code(setup, processor):
    import hashlib

    from bpo.ref_cache.store import read_manifest

    root, _, _ = setup
    fp = read_manifest(root / "cache")["fingerprint"]
    for name in ("data/encode.py", "data/dataset.py", "model/scorer.py", "ops/logprobs.py"):
        path = os.path.join(REPO, "bpo", name)
        assert fp[f"code bpo/{name}"] == hashlib.sha256(open(path, "rb").read()).hexdigest()[:16], name
    assert fp["version transformers"] and fp["version tokenizers"]


def test_every_scoring_code_file_exists():
    """A file moved or renamed away from SCORING_CODE would be hashed as missing (code_fingerprint fails) or, worse,
    listed under a stale name while its new home goes unhashed."""
    from bpo.ref_cache.fingerprint import SCORING_CODE

    missing = [name for name in SCORING_CODE if not os.path.isfile(os.path.join(REPO, "bpo", name))]
    assert not missing, missing


def test_scoring_code_is_the_scoring_path_and_not_the_loss():
    """What the cached numbers are computed by lives in hashed files; the loss, which only reads the cached numbers,
    and loading and part naming are not hashed, so editing them keeps a 72B cache valid."""
    import inspect

    from bpo.data.dataset import collate
    from bpo.data.shared import collate_shared
    from bpo.model.scorer import SequenceScorer, TowersForward, base_forward
    from bpo.ops.logprobs import response_mask, sequence_logprobs, sequence_logps
    from bpo.ref_cache.fingerprint import SCORING_CODE

    assert "loss.py" not in SCORING_CODE
    assert not {"model/load.py", "model/parts.py"} & set(SCORING_CODE)
    for fn in (collate, collate_shared, SequenceScorer, TowersForward, base_forward, response_mask, sequence_logprobs,
               sequence_logps):
        where = os.path.relpath(inspect.getsourcefile(fn), os.path.join(REPO, "bpo"))
        assert where in SCORING_CODE, (fn.__name__, where)


def test_an_edit_that_restores_mtime_is_noticed(tmp_path, monkeypatch):
    from bpo.runtime.digest import file_digest

    monkeypatch.setenv("BPO_CACHE_DIR", str(tmp_path / "index"))
    data = tmp_path / "train.jsonl"
    data.write_text('{"id": 1, "chosen": "no"}\n')
    before = file_digest(str(data))
    st = os.stat(data)
    data.write_text('{"id": 1, "chosen": "ok"}\n')  # same size
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back, as `touch -r` or `rsync -t` would
    assert os.stat(data).st_size == st.st_size and os.stat(data).st_mtime_ns == st.st_mtime_ns
    assert file_digest(str(data)) != before
