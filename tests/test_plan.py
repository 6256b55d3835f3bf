"""bpo.plan (catalog, estimate, report, docs): parameter counts against real transformers models, and memory rows small enough to check by hand."""

import json
import os
from dataclasses import replace

import pytest

from bpo.plan import catalog, report
from bpo.plan import estimate as plan
from bpo.plan.catalog import ModelDims
from bpo.plan.estimate import GiB, Setup, estimate, total_bytes
from jobs import REPO

# A model with round numbers: H = 100, 2 layers, 4 heads of 25 (2 kv heads: kv_dim 50), I = 300, V = 1000.
#   layer = q 100*100 + k,v 2*100*50 + o 100*100 + MLP 3*100*300 + norms 2*100 = 120,200
#   LLM   = embed 100,000 + 2 layers 240,400 + final norm 100 + head 100,000 = 440,500
DIMS = ModelDims(name="round", vocab=1000, hidden=100, layers=2, heads=4, kv_heads=2, head_dim=25, intermediate=300,
                 vision_params=10_000, projector_params=500)


def rows_of(dims, setup):
    rows, host = estimate(dims, setup)
    return {key: value for key, _, value, _ in rows}, host


def test_parameter_counts_by_hand():
    assert DIMS.layer_params == 120_200
    assert DIMS.llm_params == 440_500
    assert DIMS.total_params == 451_000
    assert plan.trainable_params(DIMS, Setup()) == 441_000  # vision tower frozen
    assert plan.trainable_params(DIMS, Setup(train_vision_tower=True)) == 451_000
    tied = ModelDims(**{**DIMS.__dict__, "tied_embeddings": True, "qkv_bias": True})
    assert tied.llm_params == 440_500 - 100_000 + 2 * (100 + 2 * 50)  # no head; q, k, v biases in both layers


def test_memory_rows_by_hand():
    # N = 2 x 5 = 10 ranks; rows layout: S = 2 x 3 = 6 sequences of T = 10 tokens.
    setup = Setup(nodes=2, gpus_per_node=5, seq_len=10, micro_batch=2, chunk_size=16, scoring="rows")
    rows, host = rows_of(DIMS, setup)
    assert rows["params"] == 2 * 451_000 / 10
    assert rows["grads"] == 2 * 441_000 / 10
    assert rows["optim"] == 12 * 441_000 / 10
    assert rows["gather"] == 2 * 2 * 120_200  # a layer (120,200) is larger than the embedding (100,000)
    assert rows["step"] == (2 + 4) * 441_000 / 10  # the partition (44,100) is smaller than a sub-group (1e8)
    assert rows["ckpt"] == 2 * 2 * 6 * 10 * 100  # 2 B x L x S x T x H
    assert rows["layer"] == 2 * 6 * 10 * (18 * 100 + 4 * 50 + 8 * 300)
    # S T V x (2 + 4 + 4), and the bf16 (V, H) gradient of the lm_head weight
    assert rows["head:naive"] == 6 * 10 * 1000 * 10 + 2 * 1000 * 100
    # one chunk of 16 tokens, and the fp32 (V, H) gradient accumulator plus its bf16 copy
    assert rows["head:fused"] == 16 * 1000 * 10 + (4 + 2) * 1000 * 100
    assert rows["ref:cached"] == 0
    assert rows["ref:live"] == rows["params"]
    assert rows["allowance"] == 4 * GiB
    assert host == 0
    chosen = sum(v for k, v in rows.items() if k not in ("head:naive", "ref:live"))
    assert total_bytes(DIMS, setup) == chosen
    live_naive = Setup(**{**setup.__dict__, "head": "naive", "reference": "live"})
    assert total_bytes(DIMS, live_naive) == chosen - rows["head:fused"] + rows["head:naive"] + rows["ref:live"]


def test_shared_layout_counts_each_prompt_once():
    """Shared: one sequence per example of T + 2 R tokens (prompt once, three responses after it), and the head
    scores the 3 R response positions only; rows: three rows of T."""
    shared = Setup(seq_len=1000, micro_batch=2, response_len=100, chunk_size=10_000)
    rows = Setup(**{**shared.__dict__, "scoring": "rows"})
    assert shared.tokens == 2 * (1000 + 2 * 100) and rows.tokens == 2 * 3 * 1000
    a, _ = rows_of(DIMS, shared)
    b, _ = rows_of(DIMS, rows)
    assert a["ckpt"] == 2 * 2 * 2400 * 100 and b["ckpt"] == 2 * 2 * 6000 * 100  # 2 B x L x tokens x H
    assert a["head:naive"] - 2 * 1000 * 100 == 2 * 3 * 100 * 1000 * 10  # 600 scored positions x V x 10 B
    assert b["head:naive"] - 2 * 1000 * 100 == 6000 * 1000 * 10
    assert Setup(seq_len=50, response_len=100).tokens == 50 + 2 * 50  # a response is never longer than T


def test_fused_chunk_never_exceeds_the_tokens():
    rows, _ = rows_of(DIMS, Setup(seq_len=4, micro_batch=1, chunk_size=1024, scoring="rows"))
    assert rows["head:fused"] - 6 * 1000 * 100 == rows["head:naive"] - 2 * 1000 * 100 == 3 * 4 * 1000 * 10


def test_fused_head_counts_its_weight_gradient_at_72b():
    """The fused head's backward holds an fp32 (V, H) accumulator and its bf16 copy: ~7 GiB at V = 152064,
    H = 8192, which the 70B template's plan left out (50.6 GiB shown, ~57.5 GiB needed)."""
    dims = catalog.load_dims("llava-next-72b")
    setup = Setup(nodes=8, gpus_per_node=8, seq_len=4096, scoring="rows", chunk_size=1024)
    rows, _ = rows_of(dims, setup)
    assert rows["head:fused"] == 1024 * 152064 * 10 + 6 * 152064 * 8192
    assert rows["step"] == (2 + 4) * 10**8  # a partition of 1.1B trained parameters steps in sub-groups of 1e8
    with open(os.path.join(REPO, "ds_configs", "zero3.json")) as f:  # the plan prices the config users run
        assert plan.SUB_GROUP_SIZE == json.load(f)["zero_optimization"]["sub_group_size"]
    assert 58.0 < total_bytes(dims, setup) / GiB < 59.0


def test_offload_moves_state_to_host_memory():
    setup = Setup(nodes=1, gpus_per_node=4, offload="optimizer")
    rows, host = rows_of(DIMS, setup)
    assert rows["optim"] == rows["grads"] == 0 and rows["params"] == 2 * 451_000 / 4
    assert host == 4 * 16 * 441_000 / 4  # per node: 4 ranks x (fp32 master, m, v, fp32 grad) of their partition
    rows, host = rows_of(DIMS, Setup(nodes=1, gpus_per_node=4, offload="param"))
    assert rows["params"] == 0 and "gather" in rows and "step" not in rows  # the CPU steps the optimizer
    assert host == 16 * 441_000 + 2 * 451_000
    with pytest.raises(ValueError, match="ZeRO-3"):
        estimate(DIMS, Setup(zero=2, offload="param"))


def test_lower_zero_stages_keep_whole_copies():
    rows, _ = rows_of(DIMS, Setup(nodes=1, gpus_per_node=4, zero=2))
    assert rows["params"] == 2 * 451_000 and rows["grads"] == 2 * 441_000 / 4 and "gather" not in rows
    rows, _ = rows_of(DIMS, Setup(nodes=1, gpus_per_node=4, zero=1))
    assert rows["grads"] == 2 * 441_000 and rows["optim"] == 12 * 441_000 / 4


def test_without_checkpointing_every_layer_keeps_activations():
    rows, _ = rows_of(DIMS, Setup(seq_len=10, micro_batch=1, grad_ckpt=False, scoring="rows"))
    assert "ckpt" not in rows and rows["acts"] == 2 * 3 * 10 * (18 * 100 + 4 * 50 + 8 * 300 + 2 * 100)


def test_checkpoint_bytes():
    assert plan.checkpoint_bytes(DIMS) == 12 * 441_000 + 2 * 10_000


@pytest.mark.parametrize("name, total, llm", [
    ("llava-1.5-7b", 7_063_427_072, 6_738_939_904),  # llava-hf/llava-1.5-7b-hf's published parameter count
    ("llava-next-72b", 72_666_949_632, 72_287_920_128),
    ("qwen2-vl-72b", 73_405_560_320, 72_706_203_648),
])
def test_builtin_models(name, total, llm):
    dims = catalog.load_dims(name)
    assert (dims.total_params, dims.llm_params) == (total, llm)


def test_counts_match_instantiated_llava(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForImageTextToText

    dims = catalog.load_dims(tiny_model_dir)
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    named = dict(model.named_parameters())
    assert dims.total_params == sum(p.numel() for p in named.values())
    assert dims.vision_params == sum(p.numel() for n, p in named.items() if "vision_tower" in n)
    assert dims.projector_params == sum(p.numel() for n, p in named.items() if "multi_modal_projector" in n)


def test_counts_match_instantiated_qwen2_vl_from_a_top_level_config(tmp_path):
    """Qwen2-VL's config.json keeps the decoder fields at the top level; a file path works as well as a directory."""
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    raw = {"model_type": "qwen2_vl", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": False,
           "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "num_heads": 4,
                             "in_chans": 3, "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    dims = catalog.load_dims(str(path))
    model = Qwen2VLForConditionalGeneration(AutoConfig.for_model(**raw))
    named = dict(model.named_parameters())
    assert dims.total_params == sum(p.numel() for p in named.values())
    assert dims.projector_params == sum(p.numel() for n, p in named.items() if "merger" in n)
    assert dims.qkv_bias and dims.kv_heads == 2


def test_cli_prints_a_table_and_exits_1_when_it_does_not_fit(capsys):
    assert report.main(["--model", "llava-1.5-7b", "--nodes", "1", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "optimizer (fp32 master + Adam m, v)" in out and "fits in 80 GiB" in out
    assert report.main(["--model", "llava-next-72b", "--nodes", "1", "--gpus-per-node", "8", "--markdown"]) == 1
    out = capsys.readouterr().out
    assert "| component | GiB per GPU | formula (bytes) |" in out and "DOES NOT FIT" in out


def test_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit, match="no such config.json"):
        catalog.load_dims("/nonexistent/model")


def test_lora_and_8bit_rows_by_hand():
    # LoRA r=4 on each decoder layer's q (100->100), k, v (100->50), o (100->100), gate, up (100->300), down (300->100)
    pt = 4 * 2 * ((100 + 100) + 2 * (100 + 50) + (100 + 100) + 2 * (100 + 300) + (300 + 100))
    assert pt == 15_200
    setup = Setup(nodes=1, gpus_per_node=4, finetune="lora", lora_r=4, optim="adamw_8bit", reference="adapters_off")
    assert plan.trainable_params(DIMS, setup) == pt
    rows, _ = rows_of(DIMS, setup)
    assert rows["params"] == 2 * (451_000 + pt) / 4  # the frozen base and the adapters, bf16
    assert rows["grads"] == 2 * pt / 4
    assert rows["optim"] == (4 + 1 + 1 + 2 * 4 / 256) * pt / 4  # fp32 master, uint8 m and v, an fp32 scale per 256
    assert rows["ref:adapters_off"] == 0 and rows["ref:live"] == 2 * 451_000 / 4
    assert total_bytes(DIMS, setup) == sum(v for k, v in rows.items() if k not in ("head:naive", "ref:live",
                                                                                    "ref:cached"))
    assert plan.checkpoint_bytes(DIMS, setup) == 6.03125 * pt + 2 * 451_000  # DeepSpeed keeps the frozen base
    assert plan.checkpoint_bytes(DIMS, replace(setup, optim="adamw")) == 12 * pt + 2 * 451_000
    assert plan.load_bytes(DIMS, setup) == 0  # built partitioned

    full8 = Setup(nodes=1, gpus_per_node=4, optim="paged_adamw_8bit")
    assert rows_of(DIMS, full8)[0]["optim"] == 6.03125 * 441_000 / 4


def test_qlora_rows_by_hand():
    pq = 2 * (100 * 100 + 2 * 100 * 50 + 100 * 100 + 3 * 100 * 300)  # the decoder's Linear weights, in NF4
    pt = 15_200
    setup = Setup(nodes=1, gpus_per_node=4, finetune="qlora", lora_r=4)
    rows, _ = rows_of(DIMS, setup)
    weights = (0.5 + 1 / 64) * pq + 2 * (451_000 - pq) + 2 * pt
    assert rows["params"] == weights / 4
    assert rows["ref:live"] == (weights - 2 * pt) / 4  # a frozen copy, quantized the same way, no adapters
    layer_linear = pq // 2
    assert rows["gather"] == 2 * max((0.5 + 1 / 64) * layer_linear + 2 * (120_200 - layer_linear), 2 * 100_000)
    assert plan.load_bytes(DIMS, setup) == weights + 4 * GiB  # the whole NF4 model on each GPU while it loads
    text, fits = report.report(DIMS, setup)
    assert "loading: the whole NF4 model sits on every GPU" in text and fits


def test_bad_combinations_are_refused():
    with pytest.raises(ValueError, match="adapters_off needs --finetune lora"):
        estimate(DIMS, Setup(reference="adapters_off"))
    with pytest.raises(ValueError, match="8-bit keeps its states on the GPU"):
        estimate(DIMS, Setup(optim="adamw_8bit", offload="optimizer"))


@pytest.mark.parametrize("family", ["tiny", "qwen2_vl"])
def test_lora_count_matches_peft_on_instantiated_models(family, tiny_model_dir, tmp_path):
    """plan's r x (in + out) per adapted Linear against the adapters PEFT actually adds (bpo.model.lora) to the model."""
    from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2VLForConditionalGeneration

    from bpo.config import LoraConfig, ModelConfig
    from bpo.model.lora import add_adapters

    if family == "tiny":
        dims = catalog.load_dims(tiny_model_dir)
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    else:
        raw = {"model_type": "qwen2_vl", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": False,
               "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "num_heads": 4,
                                 "in_chans": 3, "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}}
        (tmp_path / "config.json").write_text(json.dumps(raw))
        dims = catalog.load_dims(str(tmp_path))
        model = Qwen2VLForConditionalGeneration(AutoConfig.for_model(**raw))
    _, parts = add_adapters(model, ModelConfig(finetune="lora"), LoraConfig(r=4, alpha=8))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapters == parts["language_model"][1] + parts["connector"][1]
    assert plan.trainable_params(dims, Setup(finetune="lora", lora_r=4)) == adapters
    assert parts["connector"][1] > 0  # the projector (Qwen2-VL: the merger) is counted on both sides


def test_cli_takes_the_memory_levers(capsys):
    assert report.main(["--model", "llava-1.5-7b", "--optim", "adamw_8bit", "--finetune", "qlora", "--lora-r", "8",
                      "--reference", "adapters_off"]) == 0
    out = capsys.readouterr().out
    assert "optimizer (fp32 master + 8-bit Adam m, v)" in out and "LoRA parameters (r=8" in out
    assert "reference: the policy with adapters off" in out and "parameters (NF4 decoder Linear, bf16 rest)" in out


def test_setup_from_config_reads_what_the_config_decides():
    from bpo.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", "bpo_70b.yaml"), ["train.ref_cache=C"])
    setup = plan.setup_from_config(cfg, nodes=8)
    assert (setup.seq_len, setup.micro_batch, setup.responses, setup.head, setup.reference, setup.grad_ckpt,
            setup.scoring, setup.chunk_size, setup.zero, setup.offload, setup.ranks) == (
        4096, 1, 3, "fused", "cached", True, "shared", cfg.loss.logprob_chunk_size, 3, "none", 64)
    lora = load_config(None, ["model.finetune=lora", "loss.logprob_impl=naive", "loss.type=dpo",
                              f"train.ds_config={REPO}/ds_configs/zero3_offload.json"])
    setup = plan.setup_from_config(lora)
    assert (setup.finetune, setup.reference, setup.head, setup.responses, setup.offload) == (
        "lora", "adapters_off", "naive", 2, "param")
    with pytest.raises(SystemExit):  # a flag the config decides is refused, not silently ignored
        report.parse_args(["--config", os.path.join(REPO, "configs", "bpo_7b.yaml"), "--seq-len", "5"])


def test_docs_quote_what_plan_computes_from_the_configs():
    """configs/bpo_7b.yaml and bpo_70b.yaml (their `# plan says:` line) and the plan tables of README.md and docs/*.md
    (docs/slurm.md holds them) are what bpo.plan computes from those configs now: a change to a config, a default or
    the plan fails here until `python -m bpo.plan.docs` rewrites them."""
    from bpo.plan import docs as plan_docs

    docs = plan_docs.documents()
    assert set(docs) == {"configs/bpo_7b.yaml", "configs/bpo_70b.yaml", "docs/slurm.md"}
    assert "README.md" in plan_docs.markdown_files() and "docs/slurm.md" in plan_docs.markdown_files()
    for path, (now, generated) in docs.items():
        assert now == generated, f"{path}: memory figures drifted from bpo.plan; run python -m bpo.plan.docs"
    assert docs["docs/slurm.md"][0].count("<!-- plan: configs/") == 2
    # The check can fail: a stale figure is rewritten, and the figure follows the config it is computed from.
    text = docs["configs/bpo_7b.yaml"][0]
    line = next(x for x in text.split("\n") if x.startswith(plan_docs.SAYS_LINE))
    assert plan_docs.config_text("configs/bpo_7b.yaml", text.replace(line, "# plan says: 25 GiB")) == text
    args = "--model llava-1.5-7b --nodes 1 --gpus-per-node 8 train.ref_cache=CACHE"
    assert plan_docs.summary("configs/bpo_7b.yaml", args) in line
    assert plan_docs.summary("configs/bpo_7b.yaml", args + " data.max_length=4096") not in line
