"""LoRA on ZeRO-3 (bpo.model.lora): adapters by part on bpo's tiny LLaVA and on replicas of real families (Qwen2-VL, whose
connector is `model.visual.merger`; Idefics3, whose language model is `model.text_model`), the reference with
adapters off against a separate frozen copy, export as a PEFT adapter directory and merged, and QLoRA's refusal on
CPU. Every model-level expectation is computed here with plain transformers / PEFT, not read off bpo."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from jobs import REPO, add_blind, free_port, read_metrics, run_job, write_config

from families.conftest import replica  # noqa: F401  (the session fixture building family replicas)

# Where each model's parts live, written out by hand for the models used here.
LANGUAGE = {"tiny": "model.language_model.", "qwen2_vl": "model.language_model.", "idefics3": "model.text_model.",
            "gemma3": "model.language_model."}
CONNECTOR = {"tiny": "model.multi_modal_projector.", "qwen2_vl": "model.visual.merger.",
             "idefics3": "model.connector.", "gemma3": "model.multi_modal_projector."}


def _plain(model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()


def _linears(model, prefix):
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix))


@pytest.fixture(scope="module")
def models(tiny_model_dir, replica):  # noqa: F811
    return {"tiny": str(tiny_model_dir), "qwen2_vl": replica("qwen2_vl"), "idefics3": replica("idefics3"),
            "gemma3": replica("gemma3")}


# ---------------------------------------------------------------------------------------------------------------
# In-process: which layers get adapters, names, adapters off


@pytest.mark.parametrize("name", ["tiny", "qwen2_vl", "idefics3", "gemma3"])
def test_adapters_go_on_the_linear_layers_of_the_trained_parts(name, models):
    from bpo.config import LoraConfig, ModelConfig
    from bpo.model.lora import add_adapters, is_adapter_param
    from bpo.model.parts import part_of

    model = _plain(models[name])
    expected_lm = _linears(model, LANGUAGE[name])
    expected_connector = _linears(model, CONNECTOR[name])
    _, parts = add_adapters(model, ModelConfig(path=models[name], finetune="lora"), LoraConfig(r=4, alpha=8))
    from peft.tuners.lora import LoraLayer

    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    assert adapted == sorted(expected_lm + expected_connector)  # never lm_head, nor the image encoder
    if name == "gemma3":  # its projector is a bare weight matrix and a norm: nothing to adapt, and it says so
        assert expected_connector == [] and parts["connector"][0] is False
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(is_adapter_param(n) for n in trained)
    for n in trained:  # PEFT's names still tell the part: an adapter belongs to the part of the layer it adapts
        layer = n.split(".lora_")[0]
        assert part_of(n) == ("connector" if layer in expected_connector else "language_model"), n
    assert parts["language_model"][1] == sum(p.numel() for n, p in model.named_parameters()
                                             if n in trained and part_of(n) == "language_model")


def test_adapters_off_is_the_base_model(models):
    """With random adapters the model differs from its base; with them off it is the base, bit for bit."""
    from bpo.config import LoraConfig, ModelConfig
    from bpo.model.lora import add_adapters, adapters_disabled

    model = _plain(models["qwen2_vl"])
    add_adapters(model, ModelConfig(path=models["qwen2_vl"], finetune="lora"), LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            p.data.normal_(0, 0.5)
    ids = torch.randint(5, 400, (2, 11))
    base = _plain(models["qwen2_vl"])(input_ids=ids).logits
    with torch.no_grad(), adapters_disabled(model):
        off = model(input_ids=ids).logits
    with torch.no_grad():
        on = model(input_ids=ids).logits
    assert torch.equal(off, base)
    assert (on - base).abs().max() > 1e-2
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # switched back on


def test_qlora_keeps_everything_but_the_language_model_unquantized():
    from transformers.quantizers.quantizers_utils import should_convert_module

    from bpo.model.lora import unquantized_patterns

    patterns = unquantized_patterns()
    for name in ("model.language_model.layers.0.self_attn.q_proj", "model.text_model.layers.11.mlp.down_proj"):
        assert should_convert_module(name, patterns), name
    for name in ("lm_head", "model.visual.merger.mlp.0", "model.visual.blocks.0.attn.qkv",
                 "model.multi_modal_projector.linear_1", "model.connector.modality_projection.proj",
                 "model.vision_tower.encoder.layers.0.mlp.fc1", "model.language_modelx.proj"):
        assert not should_convert_module(name, patterns), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_qlora_is_refused_on_cpu_before_anything_loads(tmp_path):
    from bpo import cli, train

    with pytest.raises(SystemExit, match="model.finetune=qlora needs a CUDA GPU"):
        cli.run(train.main, ["model.path=/nonexistent", "data.train_file=/nonexistent.jsonl", "model.finetune=qlora"])


def test_reference_cache_fingerprint_is_the_base_and_its_quantization(models, sample_data_dir):
    """A cache of the base's log-probs serves every LoRA run on that base (adapters off = the base, whatever the rank);
    QLoRA's reference is the 4-bit base, so its cache must differ."""
    from bpo.config import load_config
    from bpo.data.chat import load_chat
    from bpo.model.lora import QUANTIZATION
    from bpo.ref_cache.store import describe_mismatch, fingerprint

    processor = load_chat(models["tiny"]).processor
    data = os.path.join(sample_data_dir, "train.jsonl")
    fp = {mode: fingerprint(load_config(None, [f"model.path={models['tiny']}", f"model.finetune={mode}", "lora.r=8"]),
                            processor, data) for mode in ("full", "lora", "qlora")}
    assert fp["lora"] == fp["full"]
    assert describe_mismatch(fp["full"], fp["qlora"]) == [f"base_quantization <absent> in cache vs {QUANTIZATION} "
                                                          f"in config"]


def test_lora_config_is_validated():
    from bpo.config import ConfigError, load_config

    for override, msg in [("model.finetune=adapter", "model.finetune must be one of"),
                          ("lora.r=0", "lora.r must be positive"), ("lora.dropout=1.0", "lora.dropout must be in"),
                          ("lora.export=both", "lora.export must be one of")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="all three are false"):
        load_config(None, ["model.finetune=lora", "model.train_projector=false", "model.train_language_model=false"])


# ---------------------------------------------------------------------------------------------------------------
# 2-rank ZeRO-3 jobs


def test_reference_by_adapters_off_equals_a_separate_frozen_copy(models, sample_data_dir, tmp_path):
    data = add_blind(os.path.join(sample_data_dir, "train.jsonl"), tmp_path / "train_blind.jsonl")
    out = tmp_path / "probe"
    script = os.path.join(REPO, "tests", "scripts", "lora_reference_probe.py")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=REPO)
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    names = ["tiny", "qwen2_vl", "idefics3"]
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), script, str(out), data,
                           os.path.join(sample_data_dir, "images"), *(models[n] for n in names)],
                          env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        report = json.load(open(f"{out}.rank{rank}.json"))
        for name in names:
            got = report[models[name]]
            off, copy, on = (torch.tensor(got[k], dtype=torch.float64) for k in ("off", "copy", "on"))
            assert len(off) == 12  # 2 micro-batches x 2 examples x (chosen, rejected, blind)
            torch.testing.assert_close(off, copy, rtol=0, atol=1e-6)
            assert (on - copy).abs().min() > 1e-3, name  # the adapters do change every row: the test can fail


@pytest.fixture(scope="module")
def lora_runs(models, sample_data_dir, tmp_path_factory):
    """Two LoRA trainings on 2 ranks: bpo's tiny LLaVA (adapter export at the end) and the Qwen2-VL replica
    (gradient checkpointing, merged export at the end). The tiny run's export is slowed past a short collective
    timeout (SLOW_EXPORT): rank 1 must wait it out polling, not in a barrier."""
    root = tmp_path_factory.mktemp("lora")
    data = add_blind(os.path.join(sample_data_dir, "train.jsonl"), root / "train_blind.jsonl")
    runs = {}
    for name, steps, export in (("tiny", 4, "adapter"), ("qwen2_vl", 2, "merged")):
        config = write_config(root / f"{name}.yaml", {
            # Qwen2-VL with gradient checkpointing: non-reentrant recomputation through a frozen base
            "model": {"path": models[name], "dtype": "fp32", "finetune": "lora",
                      "gradient_checkpointing": name == "qwen2_vl"},
            "lora": {"r": 4, "alpha": 8, "export": export},
            "data": {"train_file": data, "image_root": os.path.join(sample_data_dir, "images"), "max_length": 256},
            "optim": {"lr": 2e-2, "warmup_steps": 0},
            "train": {"output_dir": str(root / name), "ds_config": os.path.join(REPO, "ds_configs/zero3_cpu.json"),
                      "micro_batch_size": 2, "max_steps": steps, "export_16bit": True, "plot": False,
                      "tensorboard": False},
        })
        proc = run_job("train.py", config, env=SLOW_EXPORT if name == "tiny" else None)
        runs[name] = (root / name, read_metrics(root / name), proc.stdout)
    return runs


# Rank 0's export sleeps 30 s first (bpo.runtime.faults.maybe_slow); collectives time out after 20 s, which a barrier behind
# the export would hit (a gloo barrier fails "Timed out waiting"), while every other collective of the run is quick.
SLOW_EXPORT = {"BPO_SLOW": "export:30", "BPO_DIST_TIMEOUT_S": "20"}


def test_a_slow_export_outlasts_the_collective_timeout(lora_runs):
    """Issue 22: the run whose export took longer than BPO_DIST_TIMEOUT_S ended with exit 0 (run_job checks), the
    export whole, and the polling markers gone."""
    run_dir, _, stdout = lora_runs["tiny"]
    assert "done: 4 steps" in stdout
    assert os.path.isfile(run_dir / "hf_model" / "adapter_model.safetensors")
    assert not [f for f in os.listdir(run_dir) if f.startswith("export.")]


@pytest.mark.parametrize("name", ["tiny", "qwen2_vl"])
def test_lora_training_moves_only_the_adapters(name, lora_runs, models):
    from bpo.export.job import PartitionedCheckpoint, hf_name
    from bpo.model.lora import base_name

    run_dir, rows, stdout = lora_runs[name]
    assert "reference=policy with adapters off" in stdout
    # Step 0: lora_B starts at zero, so the policy is its base, the reference: both log-sigmoid terms are log 2.
    assert rows[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"] and all(r["grad_norm"] > 0 for r in rows)

    base = _plain(models[name])
    ckpt = PartitionedCheckpoint(os.path.join(run_dir, "checkpoints", f"step_{len(rows)}"))
    trained = {hf_name(n) for n in ckpt.trainable}
    expected = {f"{layer}.lora_{ab}.default.weight" for layer in
                _linears(base, LANGUAGE[name]) + _linears(base, CONNECTOR[name]) for ab in "AB"}
    assert trained == expected  # the optimizer held adapters and nothing else
    base_params = dict(base.named_parameters())
    for n in ckpt.frozen:  # every base weight as it was loaded, bit for bit
        assert torch.equal(ckpt.tensor(n), base_params[base_name(hf_name(n))].data), n
    moved = [n for n in ckpt.trainable if ".lora_B." in n and ckpt.tensor(n).abs().max() > 0]
    assert len(moved) == len(expected) // 2  # every adapter trained (B starts at zero)


def _logits(model, processor_inputs):
    with torch.no_grad():
        return model(**processor_inputs).logits


def _image_inputs(model_dir, sample_data_dir):
    """A real prompt with its image, through the model's own processor."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    image = Image.open(os.path.join(sample_data_dir, "images", sorted(os.listdir(
        os.path.join(sample_data_dir, "images")))[0])).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


def test_adapter_export_loads_with_peft_and_merged_export_equals_it(lora_runs, models, sample_data_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from bpo.export.job import export

    run_dir, _, _ = lora_runs["tiny"]
    adapter_dir = run_dir / "hf_model"  # written by train.export_16bit with lora.export=adapter
    # The adapter and its config, and bpo.export's mark (a later --force may replace only a marked export).
    assert sorted(os.listdir(adapter_dir)) == [".bpo_export", "adapter_config.json", "adapter_model.safetensors"]
    from bpo.config import ModelConfig
    from bpo.model.load import load_model

    with pytest.raises(FileNotFoundError, match="is a LoRA adapter directory.*--merge"):  # e.g. eval.model_path
        load_model(ModelConfig(dtype="fp32"), path=str(adapter_dir))
    peft_model = PeftModel.from_pretrained(_plain(models["tiny"]), str(adapter_dir)).eval()
    merged_dir = export(str(run_dir / "checkpoints"), str(tmp_path / "merged"), dtype="fp32", merge=True,
                        progress=False)
    merged = _plain(merged_dir)
    inputs = _image_inputs(models["tiny"], sample_data_dir)
    base_logits = _logits(_plain(models["tiny"]), inputs)
    assert (_logits(peft_model, inputs) - base_logits).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(_logits(merged, inputs), _logits(peft_model, inputs), rtol=1e-5, atol=1e-5)

    # Each merged weight is W + (alpha / r) B A, by hand from the adapter file; the rest is the base.
    adapters = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    base = dict(_plain(models["tiny"]).named_parameters())
    for name, p in merged.named_parameters():
        module = name[:-len(".weight")]
        a = adapters.get(f"base_model.model.{module}.lora_A.weight")
        if a is None:
            assert torch.equal(p.data, base[name].data), name
        else:
            b = adapters[f"base_model.model.{module}.lora_B.weight"]
            torch.testing.assert_close(p.data, base[name].data + (8 / 4) * b @ a, rtol=1e-6, atol=1e-6)


def test_merge_through_peft_equals_the_streaming_merge(lora_runs, models, tmp_path):
    """QLoRA's merge (adapters folded into the base checkpoint with transformers + PEFT) agrees with the streaming
    merge of a LoRA checkpoint: the path QLoRA exports take, checked here on CPU."""
    from bpo.export.job import PartitionedCheckpoint
    from bpo.export.lora import merge_into_base

    run_dir, rows, _ = lora_runs["tiny"]
    ckpt = PartitionedCheckpoint(os.path.join(run_dir, "checkpoints", f"step_{len(rows)}"))
    merge_into_base(ckpt, str(run_dir / "checkpoints"), models["tiny"], str(tmp_path / "peft"), "fp32")
    from bpo.export.job import export

    streamed = dict(_plain(export(str(run_dir / "checkpoints"), str(tmp_path / "stream"), dtype="fp32", merge=True,
                                  progress=False)).named_parameters())
    through_peft = dict(_plain(str(tmp_path / "peft")).named_parameters())
    assert set(streamed) == set(through_peft)
    for name, p in through_peft.items():
        torch.testing.assert_close(p.data, streamed[name].data, rtol=1e-6, atol=1e-6)


def test_family_merged_export_at_the_end_of_training(lora_runs, models, sample_data_dir, tmp_path):
    """Qwen2-VL: hf_model (lora.export=merged) loads with from_pretrained and computes what base + adapter does;
    the merger (its connector) moved, its vision blocks did not."""
    from peft import PeftModel

    from bpo.export.job import export

    run_dir, _, _ = lora_runs["qwen2_vl"]
    merged = _plain(str(run_dir / "hf_model"))
    adapter = export(str(run_dir / "checkpoints"), str(tmp_path / "adapter"), dtype="fp32", progress=False)
    peft_model = PeftModel.from_pretrained(_plain(models["qwen2_vl"]), adapter).eval()
    inputs = _image_inputs(models["qwen2_vl"], sample_data_dir)
    torch.testing.assert_close(_logits(merged, inputs), _logits(peft_model, inputs), rtol=1e-5, atol=1e-5)
    base = dict(_plain(models["qwen2_vl"]).named_parameters())
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p.data, base[n].data)}
    assert any(n.startswith("model.visual.merger.") for n in changed)
    assert any(n.startswith("model.language_model.") for n in changed)
    assert not any(n.startswith("model.visual.blocks.") or n == "lm_head.weight" for n in changed)
