"""Real 2-process ZeRO-3 BPO training on CPU, run as users run it, and the invariances it must keep."""

import glob
import json
import math
import os
import subprocess

import pytest
import torch

from jobs import COMPARED, REPO, add_blind, read_metrics, run_job, write_config


@pytest.fixture(scope="module")
def train_setup(tiny_model_dir, sample_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = add_blind(os.path.join(sample_data_dir, "train.jsonl"), root / "train_blind.jsonl")

    def config(name, **overrides):
        sections = {
            "model": {"path": str(tiny_model_dir), "dtype": "fp32"},
            "data": {"train_file": data, "image_root": os.path.join(sample_data_dir, "images"), "max_length": 160},
            "loss": {"beta": 0.1},
            "optim": {"lr": 5e-3, "warmup_steps": 2},
            "train": {"output_dir": str(root / name), "ds_config": os.path.join(REPO, "ds_configs/zero3_cpu.json"),
                      "micro_batch_size": 2, "grad_accum": 2, "epochs": 2, "save_every": 2, "plot": True},
        }
        for dotted, value in overrides.items():
            section, key = dotted.split("__")
            sections.setdefault(section, {})[key] = value
        return write_config(root / f"{name}.yaml", sections), str(root / name)

    return config


@pytest.fixture(scope="module")
def full_run(train_setup):
    config, run_dir = train_setup("full")
    run_job("train.py", config)
    return config, run_dir, read_metrics(run_dir)


@pytest.mark.latest
def test_two_rank_run_learns(full_run):
    _, _, rows = full_run
    assert len(rows) == 12  # 48 examples / (2 per micro x 2 accumulation x 2 ranks) x 2 epochs
    # Step 0: the policy is the reference, so both log-sigmoid terms are log 2.
    assert rows[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)
    first, last = rows[:3], rows[-3:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss") - 0.1
    assert mean(last, "accuracies/rejected") > mean(first, "accuracies/rejected")
    assert mean(last, "margins/blind") > 0
    assert rows[0]["lr"] == pytest.approx(5e-3 / 2) and rows[1]["lr"] == pytest.approx(5e-3)


def test_run_directory_contents(full_run):
    config, run_dir, _ = full_run
    ckpt = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(ckpt, "latest")) as f:
        assert f.read().strip() == "step_12"
    kept = sorted(f for f in os.listdir(ckpt) if f.startswith("step_"))
    assert kept == ["step_10", "step_12"]  # keep_checkpoints=2 pruned the rest
    files = os.listdir(os.path.join(ckpt, "step_12"))
    for rank in (0, 1):
        assert f"rng_rank{rank}.pt" in files
        assert any(f.startswith(f"zero_pp_rank_{rank}_") and f.endswith("optim_states.pt") for f in files)
    assert os.path.getsize(os.path.join(run_dir, "metrics.png")) > 1000
    assert glob.glob(os.path.join(run_dir, "tensorboard", "events.*"))
    assert "micro_batch_size: 2" in open(os.path.join(run_dir, "config.yaml")).read()


def test_resume_after_kill_equals_uninterrupted(full_run, train_setup):
    """Rank 1 is killed in the middle of writing step_6 (slowly, so rank 0 has long finished its own files): `latest`
    must still name step_4, and the resumed run must redo steps 5-6 and end exactly like the uninterrupted one."""
    _, _, reference_rows = full_run
    config, run_dir = train_setup("killed")
    # ckpt_write counts checkpoint files a rank writes, two per save: the 6th is rank 1's optimizer file of step_6.
    proc = run_job("train.py", config, env={"BPO_CRASH_AFTER": "ckpt_write:6@1", "BPO_CRASH_SLEEP_S": "3"},
                   check=False, clean_shm=False)
    assert proc.returncode != 0
    from bpo.runtime.dist import shm_buffer_path

    left = [shm_buffer_path(r, "127.0.0.1", proc.master_port) for r in (0, 1)]
    assert not [p for p in left if os.path.exists(p)]  # killed, and still nothing left in /dev/shm
    ckpt = os.path.join(run_dir, "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read() == "step_4"
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in os.listdir(os.path.join(ckpt, "step_6"))  # rank 0's done
    assert len(read_metrics(run_dir)) == 6
    proc = run_job("train.py", config, ["--resume"])  # the flag form of train.resume=true
    assert "passed over step_6: zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in proc.stdout
    assert "resumed from step 4" in proc.stdout
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for got, want in zip(rows, reference_rows):
        for key in COMPARED:
            assert got[key] == want[key], (got["step"], key)  # exactly: fp32 on CPU is deterministic


def test_parameters_are_partitioned(tiny_model_dir, tmp_path):
    out = tmp_path / "probe"
    script = os.path.join(REPO, "tests", "scripts", "zero3_probe.py")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    from jobs import free_port
    subprocess.run([os.path.join(os.path.dirname(__import__("sys").executable), "deepspeed"), "--num_gpus", "2",
                    "--master_port", str(free_port()), script, str(out), f"model.path={tiny_model_dir}",
                    "model.dtype=fp32", f"train.ds_config={REPO}/ds_configs/zero3_cpu.json"],
                   check=True, env=env, capture_output=True, cwd=REPO)
    ranks = [json.load(open(f"{out}.rank{r}.json")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:
        a, b = ranks[0][name], ranks[1][name]
        assert a["local_numel"] == 0 and b["local_numel"] == 0, name  # nothing whole outside a forward
        assert a["shard_numel"] + b["shard_numel"] >= a["full_numel"], name
        assert a["shard_numel"] <= -(-a["full_numel"] // 2), name  # each rank holds at most half
    big = max(ranks[0], key=lambda n: ranks[0][n]["full_numel"])
    assert ranks[0][big]["shard_sum"] != ranks[1][big]["shard_sum"]  # different halves, not copies


def _final_weights(run_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(os.path.join(run_dir, "checkpoints"))


@pytest.fixture(scope="module")
def short_run(train_setup):
    """3 steps, 2 ranks x 2 accumulation x 2 examples: the baseline the invariance tests compare against."""
    config, run_dir = train_setup("short", train__max_steps=3, train__save_every=0, train__plot=False)
    run_job("train.py", config)
    return config, run_dir, read_metrics(run_dir)


def _assert_close_runs(rows, other, tol):
    assert len(rows) == len(other)
    for a, b in zip(rows, other):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=tol, abs=tol), (a["step"], key)


def test_one_rank_with_more_accumulation_equals_two_ranks(short_run, train_setup):
    _, run_dir, rows = short_run
    config, one_dir = train_setup("one_rank", train__max_steps=3, train__save_every=0, train__grad_accum=4)
    run_job("train.py", config, nproc=1)
    _assert_close_runs(rows, read_metrics(one_dir), 1e-5)
    a, b = _final_weights(run_dir), _final_weights(one_dir)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_fused_head_equals_naive_head(short_run, train_setup):
    _, run_dir, rows = short_run
    config, naive_dir = train_setup("naive", train__max_steps=3, train__save_every=0, loss__logprob_impl="naive")
    assert "log-prob head: naive (loss.logprob_impl=naive)" in run_job("train.py", config).stdout
    _assert_close_runs(rows, read_metrics(naive_dir), 1e-5)
    a, b = _final_weights(run_dir), _final_weights(naive_dir)
    for name in a:  # the same parameter updates, lm_head included
        # Adam divides by sqrt(v): a 1e-7 gradient difference on a near-zero gradient moves a weight by ~1e-6.
        # 1e-5 is still 1/500 of one step's update at lr 5e-3, so a wrong gradient anywhere would fail.
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def test_rows_layout_equals_shared_layout(short_run, train_setup):
    """The short run scores in the shared-prompt layout (the default); the rows layout is the readable reference."""
    _, run_dir, rows = short_run
    config, rows_dir = train_setup("rows_layout", train__max_steps=3, train__save_every=0, loss__scoring="rows")
    proc = run_job("train.py", config)
    assert "scoring: rows" in proc.stdout
    _assert_close_runs(rows, read_metrics(rows_dir), 1e-5)
    a, b = _final_weights(run_dir), _final_weights(rows_dir)
    for name in a:  # same tolerance and reason as the fused-vs-naive comparison
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    # Tokens computed per step: each prompt (16 image tokens and all) once instead of three times.
    shared_tokens = sum(r["tokens"] for r in rows)
    assert shared_tokens < 0.6 * sum(r["tokens"] for r in read_metrics(rows_dir))


def test_packed_sequences_equal_one_per_example(short_run, train_setup):
    _, _, rows = short_run
    config, packed_dir = train_setup("packed", train__max_steps=3, train__save_every=0,
                                     train__max_tokens_per_sequence=4096)
    run_job("train.py", config)
    _assert_close_runs(rows, read_metrics(packed_dir), 1e-5)


def _chosen_nll_by_plain_forward(model_dir, data_file, image_root, indices):
    """Per-token NLL of each chosen response, averaged over `indices`, from transformers' own forward (full logits,
    log_softmax): an independent computation of what an SFT step's loss must be."""
    from transformers import AutoModelForImageTextToText

    from bpo.data.chat import load_chat
    from bpo.data.encode import encode_example
    from bpo.data.records import load_records

    chat = load_chat(model_dir, "", False)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    records, _ = load_records(data_file, image_root)
    total = 0.0
    for i in indices:
        ex = encode_example(records[i], chat, image_root, 160, responses=("chosen",))
        ids = torch.tensor([ex.prompt_ids + ex.response_ids["chosen"]])
        with torch.no_grad():
            logits = model(input_ids=ids, **ex.image_inputs).logits[0]  # (T, V)
        logp = logits[:-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]  # logp[t] = log p(ids[t+1] | ...)
        total += -logp[len(ex.prompt_ids) - 1:].mean().item()
    return total / len(indices)


@pytest.fixture(scope="module")
def sft_run(train_setup):
    config, run_dir = train_setup("sft", loss__type="sft", train__max_steps=3, train__save_every=0,
                                  train__plot=False)
    proc = run_job("train.py", config)
    return proc, run_dir, read_metrics(run_dir)


def test_sft_step_is_the_nll_of_the_chosen_response(sft_run, tiny_model_dir, sample_data_dir):
    from bpo.data import sampler

    proc, _, rows = sft_run
    assert "reference=none (sft)" in proc.stdout and "(0 with a blind response)" not in proc.stdout
    first = [i for rank in (0, 1) for mb in sampler.micro_batches(48, 42, 0, 0, 2, 2, 2, rank) for i in mb]
    want = _chosen_nll_by_plain_forward(tiny_model_dir, os.path.join(sample_data_dir, "train.jsonl"),
                                        os.path.join(sample_data_dir, "images"), first)
    assert rows[0]["loss"] == pytest.approx(want, rel=1e-4) and rows[0]["nll/chosen"] == rows[0]["loss"]
    assert "accuracies/rejected" not in rows[0] and "rewards/chosen" not in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2  # lr 5e-3 on a random model: it learns within 3 steps


@pytest.mark.latest
def test_sft_weight_adds_the_nll_to_dpo(sft_run, train_setup):
    _, _, sft_rows = sft_run
    config, run_dir = train_setup("dpo_sft", loss__type="dpo", loss__sft_weight=0.5, train__max_steps=1,
                                  train__save_every=0, train__plot=False)
    run_job("train.py", config)
    (row,) = read_metrics(run_dir)
    # Step 0: policy == reference, so DPO's term is ln 2; same seed and data, so the same batch as the SFT run.
    assert row["nll/chosen"] == pytest.approx(sft_rows[0]["loss"], rel=1e-6)
    assert row["loss"] == pytest.approx(math.log(2) + 0.5 * sft_rows[0]["loss"], rel=1e-6)


def test_zero_bucket_sizes_follow_the_language_model(tiny_model_dir):
    """"auto" ZeRO buckets are sized from the text model's hidden size (not DeepSpeed's 5e8-element default, which
    contiguous gradients allocate whole); values a ds_config sets are kept; without a hidden size DeepSpeed decides."""
    from bpo.config import load_config
    from bpo.model.load import text_hidden_size
    from bpo.train import build_ds_config

    gpu = load_config(None, [f"train.ds_config={REPO}/ds_configs/zero3.json"])
    zero = build_ds_config(gpu, 8, hidden_size=4096)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (4096 ** 2, 15099494, 40960)
    left = build_ds_config(gpu, 8)["zero_optimization"]
    assert not {"reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"} & left.keys()
    cpu = build_ds_config(load_config(None, [f"train.ds_config={REPO}/ds_configs/zero3_cpu.json"]), 2, 64)
    assert cpu["zero_optimization"]["stage3_param_persistence_threshold"] == 0  # set in the file: every weight sharded
    assert cpu["zero_optimization"]["reduce_bucket_size"] == 64 ** 2
    # The language model's width, not the vision tower's (the tiny LLaVA: text 32, vision 16).
    assert text_hidden_size(load_config(None, [f"model.path={tiny_model_dir}"]).model) == 32


@pytest.mark.latest
def test_two_models_built_under_zero3_in_one_process_both_run(tiny_model_dir, tmp_path):
    """The policy and the live reference are built one after the other under zero.Init; the second used to lose the
    `__init__` that transformers' `kernels` decorator puts on attention classes and crash at its first forward
    (bpo.model.load.import_model_classes)."""
    out = tmp_path / "two"
    script = os.path.join(REPO, "tests", "scripts", "two_models_probe.py")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    from jobs import free_port
    proc = subprocess.run([os.path.join(os.path.dirname(__import__("sys").executable), "deepspeed"), "--num_gpus", "2",
                           "--master_port", str(free_port()), script, str(out), f"model.path={tiny_model_dir}",
                           "model.dtype=fp32", f"train.ds_config={REPO}/ds_configs/zero3_cpu.json"],
                          env=env, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        first, second = json.load(open(f"{out}.rank{rank}.json"))
        assert first["kernelized"] and first["kernelized"] == second["kernelized"]  # the check looks at something
        assert first["missing"] == [] and second["missing"] == []
        assert torch.allclose(torch.tensor(first["logits"]), torch.tensor(second["logits"]), atol=1e-6)


def test_training_reads_the_hub_parquet_with_inline_images(tiny_model_dir, tmp_path):
    """data.train_file = a hub dataset folder, data.split picks the split, the images come out of the file; the
    records encode with their pixels, under an unrelated data.image_root."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from bpo.config import from_dict
    from bpo.data.chat import load_chat
    from bpo.train import build_data

    def png(color):
        out = io.BytesIO()
        Image.new("RGB", (32, 24), color).save(out, format="PNG")
        return out.getvalue()

    os.makedirs(tmp_path / "hub" / "data")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "prompt": ["USER: <image>\nWho lives here? ASSISTANT:", "USER: <image>\nWhere is this? ASSISTANT:"],
        "image": pa.array([{"bytes": png((200, 0, 0)), "path": None}, {"bytes": png((0, 0, 200)), "path": None}],
                          type=image),
        "chosen": ["ASSISTANT: I can't say.", "ASSISTANT: I won't guess."],
        "rejected": ["ASSISTANT: Jane Doe.", "ASSISTANT: 1 Elm Street."]}),
        tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    cfg = from_dict({"loss": {"type": "dpo"},
                     "data": {"train_file": str(tmp_path / "hub"), "split": "train", "max_length": 200,
                              "image_root": str(tmp_path / "unrelated"), "image_cache": str(tmp_path / "cache")}})

    class Log:
        def message(self, text):
            pass

    dataset = build_data(cfg, load_chat(tiny_model_dir), Log())
    assert len(dataset) == 2 and len(os.listdir(tmp_path / "cache" / "images")) == 2
    first = dataset[0]
    assert "pixel_values" in first.image_inputs and set(first.response_ids) == {"chosen", "rejected"}
