"""Will a BPO run fit? Per-GPU memory of ZeRO training of a vision-language model, from its config alone.

    python -m bpo.plan --model llava-1.5-7b --nodes 1 --gpus-per-node 8
    python -m bpo.plan --model /models/Qwen2-VL-72B-Instruct --nodes 8 --gpus-per-node 8 --seq-len 4096 [--markdown]
    python -m bpo.plan --config configs/bpo_70b.yaml --model llava-next-72b --nodes 8 train.ref_cache=CACHE
        (every training setting from the config and its overrides; bpo.plan.docs writes the docs' figures this way)

--model is a Hugging Face config.json, a directory holding one (no weights are read), or a built-in name with the
published dimensions: llava-1.5-7b, llava-next-72b, qwen2-vl-72b. Every figure is bytes per GPU unless it says
otherwise; N = nodes x GPUs per node; P = all parameters, Pt = trained ones (LLM + projector; the vision tower is
frozen, as in the paper, unless --train-vision-tower). S T = the tokens one forward computes: with the shared-prompt
layout (--scoring shared, loss.scoring's default) micro_batch x (T + (responses - 1) x R), every prompt once and each
response after it, with T = --seq-len tokens (image tokens included) of prompt and response and R = --response-len;
with --scoring rows micro_batch x responses x T, one row of T per response (chosen, rejected, blind).

  parameters     2 P / N      bf16, partitioned by ZeRO-3 (stages 1-2 keep a full copy: 2 P)
  gradients      2 Pt / N     bf16 (stage 1 keeps them whole: 2 Pt)
  optimizer      12 Pt / N    fp32 master weights + Adam m and v, partitioned at every stage
                 (4 + 2 + 8/256) Pt / N with --optim adamw_8bit / paged_adamw_8bit: m and v in one byte each
                 plus an fp32 scale per block of 256 (bitsandbytes); paged states are the same bytes, which the
                 CUDA driver may move to host memory under pressure instead of failing
  ZeRO-3 gather  2 x 2 x max(largest decoder layer, embedding)   the layer in use plus one prefetched, whole
  optimizer step 6 x min(sub_group_size, Pt / N)   ZeRO-3 steps the optimizer one sub-group at a time, first copying
                 its gradients into one flat bf16 tensor and that into fp32 (sub_group_size: 1e8 elements in
                 ds_configs/zero3.json; DeepSpeed's default, 1e9, makes this 6 Pt / N at 7B on 8 GPUs)
  checkpoints    2 x L x S x T x H         each decoder layer's bf16 input, kept for the backward pass
  one layer      2 x S x T x (18 H + 4 H_kv + 8 I)   the layer recomputed in backward: its activations (bf16 norm
                 outputs, q, attention output, k, v, SwiGLU gate/up/act/product, and the two RMSNorms' fp32 copies of
                 their input, in all S·T·(9H + 2H_kv + 4I) x 2 B), doubled for their gradients while it runs
  log-prob head  naive: K x V x 10 B, K the scored positions (rows: S T; shared: responses only) (bf16 logits 2 + fp32 log-softmax 4 + fp32 gradient 4) + V x H x 2 B (the
                 bf16 gradient autograd forms for the whole lm_head weight)
                 fused: min(chunk, K) x V x 10 B (one chunk of the same, the only one alive) + V x H x 6 B (its
                 backward accumulates the lm_head gradient in an fp32 (V, H) buffer, 4 B, then returns a bf16 copy,
                 2 B; both are alive at the end of the backward)
  reference      live: 2 P / N (a second, frozen ZeRO-3 copy in bf16); cached (train.ref_cache): 0
  allowance      a fixed 4 GiB for the CUDA context, NCCL buffers and allocator fragmentation

--finetune lora|qlora (bpo.model.lora): Pt = r x (in + out) over every Linear of the decoder layers (q, k, v, o, gate,
up, down) and the projector (and the vision tower with --train-vision-tower); the base is frozen and its weights
(plus the adapters, 2 Pt) stay as parameters. qlora stores the decoder's Linear weights (Pq) in NF4, (0.5 + 1/64)
B each, everything else in bf16; the whole NF4 model sits on every GPU while it loads (transformers quantizes
outside zero.Init), which the verdict also checks. `--reference adapters_off` (LoRA's default without a cache)
costs no memory, only one more forward.

--offload optimizer moves optimizer states and the fp32 gradient partition the CPU Adam step reads (16 Pt / N per
rank) to host memory; --offload param also moves the bf16 parameters (2 P / N) there (ZeRO-3 only). Host memory is
reported per node. The frozen vision tower keeps no activations for backward; its forward is transient and small.
Without gradient checkpointing (--no-grad-ckpt) every layer keeps its activations: L x S x T x (9H + 2H_kv + 4I +
H) x 2 B. The estimate is meant to be a little pessimistic; measure before trusting a margin under a few GiB.
"""

import argparse
import json
import os
from dataclasses import dataclass, replace

from bpo.config import LossConfig

GiB = 2**30
ALLOWANCE_BYTES = 4 * GiB
SUB_GROUP_SIZE = 10**8  # ds_configs/zero3.json's sub_group_size
STEP_BYTES_PER_GRADIENT = 2 + 4  # the optimizer step's flat bf16 copy of a sub-group's gradients + its fp32 copy
HEAD_BYTES_PER_LOGIT = 2 + 4 + 4  # bf16 logits + fp32 log-softmax + fp32 gradient
FUSED_WEIGHT_GRAD_BYTES = 4 + 2  # per lm_head weight: the fp32 gradient accumulator + its bf16 copy (bpo.ops)
NAIVE_WEIGHT_GRAD_BYTES = 2  # per lm_head weight: the bf16 gradient of the logits matmul


@dataclass(frozen=True)
class ModelDims:
    """What the estimate needs of a model: the decoder's shape, and the vision side as parameter counts."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    vision_params: int = 0  # the vision tower (frozen by default)
    projector_params: int = 0  # vision -> text connector (trained)
    # nn.Linear layers outside the decoder, as (in, out, how many): what LoRA adapts there
    vision_linears: tuple = ()
    projector_linears: tuple = ()

    @property
    def q_dim(self):
        return self.heads * self.head_dim

    @property
    def kv_dim(self):
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self):
        """One decoder layer: q/k/v/o projections (+ q/k/v bias), SwiGLU MLP, two RMSNorms."""
        h = self.hidden
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        bias = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0
        return attn + bias + 3 * h * self.intermediate + 2 * h

    @property
    def layer_linears(self):
        """(in, out) of one decoder layer's Linear layers: q, k, v, o, gate, up, down."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return ((h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h))

    @property
    def quantizable_params(self):
        """Pq: the decoder layers' Linear weights, which QLoRA stores in 4 bits (biases, norms, embeddings, head and
        the vision side stay in bf16)."""
        return self.layers * sum(a * b for a, b in self.layer_linears)

    @property
    def embedding_params(self):
        return self.vocab * self.hidden

    @property
    def llm_params(self):
        head = 0 if self.tied_embeddings else self.embedding_params
        return self.embedding_params + self.layers * self.layer_params + self.hidden + head

    @property
    def total_params(self):
        return self.llm_params + self.vision_params + self.projector_params


# ---------------------------------------------------------------------------------------------------------------
# Reading a Hugging Face config (through transformers, which fills in the model type's defaults for absent keys)


def _clip_vision_params(vc):
    """CLIP vision transformer: class + patch (Conv2d, no bias) + position embeddings, pre/post LayerNorms, layers
    of attention (q, k, v, o with bias) and a 2-layer MLP, each with two LayerNorms."""
    h, i, c, p = vc.hidden_size, vc.intermediate_size, vc.num_channels, vc.patch_size
    patches = (vc.image_size // p) ** 2
    embeddings = h + c * p * p * h + (patches + 1) * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h
    return embeddings + 2 * 2 * h + vc.num_hidden_layers * layer


def _qwen2_vl_vision_params(vc):
    """(vision tower, merger) of Qwen2-VL: Conv3d patch embedding, LayerNorm blocks with GELU MLPs; the merger
    (LayerNorm + 2-layer MLP from merge^2 patches to the LLM width) is the projector and is trained."""
    e = vc.embed_dim
    m = e * vc.mlp_ratio
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2 * e
    block = 2 * 2 * e + (3 * e * e + 3 * e) + (e * e + e) + (e * m + m) + (m * e + e)
    merged = e * vc.spatial_merge_size ** 2
    merger = 2 * e + (merged * merged + merged) + (merged * vc.hidden_size + vc.hidden_size)
    return patch + vc.depth * block, merger


def dims_from_hf_config(config, name=""):
    """ModelDims of a transformers config object: LLaVA style (text_config + vision_config) or Qwen2-VL style
    (decoder fields at the top level in older files, text_config in newer; both arrive as text_config here)."""
    text = getattr(config, "text_config", None) or config
    h = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    tied = getattr(text, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(config, "tie_word_embeddings", False)
    text_type = getattr(text, "model_type", "")
    qkv_bias = bool(getattr(text, "attention_bias", False)) or text_type.startswith("qwen2")
    dims = ModelDims(name=name or getattr(config, "_name_or_path", "") or config.model_type, vocab=text.vocab_size,
                     hidden=h, layers=text.num_hidden_layers, heads=heads,
                     kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
                     intermediate=text.intermediate_size, tied_embeddings=bool(tied), qkv_bias=qkv_bias)
    vc = getattr(config, "vision_config", None)
    if vc is None:
        return dims
    if config.model_type in ("qwen2_vl",):
        vision, projector = _qwen2_vl_vision_params(vc)
        e, m, merged = vc.embed_dim, vc.embed_dim * vc.mlp_ratio, vc.embed_dim * vc.spatial_merge_size ** 2
        vision_linears = ((e, 3 * e, vc.depth), (e, e, vc.depth), (e, m, vc.depth), (m, e, vc.depth))
        projector_linears = ((merged, merged, 1), (merged, vc.hidden_size, 1))
    elif vc.model_type == "clip_vision_model":
        vision = _clip_vision_params(vc)
        layers = config.vision_feature_layer
        n_features = len(layers) if isinstance(layers, (list, tuple)) else 1
        bias = getattr(config, "multimodal_projector_bias", True)
        vin = vc.hidden_size * n_features
        projector = vin * h + h * h + (2 * h if bias else 0)
        if config.model_type == "llava_next":
            projector += h  # image_newline
        vh, vi, vl = vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers
        vision_linears = ((vh, vh, 4 * vl), (vh, vi, vl), (vi, vh, vl))
        projector_linears = ((vin, h, 1), (h, h, 1))
    else:
        raise ValueError(f"bpo.plan.estimate knows CLIP (LLaVA-1.5/NeXT) and Qwen2-VL vision towers, not "
                         f"{config.model_type} with a {vc.model_type} vision config")
    return replace(dims, vision_params=vision, projector_params=projector, vision_linears=vision_linears,
                   projector_linears=projector_linears)


_CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
               "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
               "projection_dim": 768}

# The published config.json files' dimensions (llava-hf/llava-1.5-7b-hf, llava-hf/llava-next-72b-hf,
# Qwen/Qwen2-VL-72B-Instruct), so plans for the README need no download.
BUILTIN = {
    "llava-1.5-7b": {
        "model_type": "llava", "vision_config": _CLIP_L_336,
        "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    },
    "llava-next-72b": {
        "model_type": "llava_next", "vision_config": _CLIP_L_336,
        "text_config": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 24576,
                        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 64,
                        "tie_word_embeddings": False},
    },
    "qwen2-vl-72b": {
        "model_type": "qwen2_vl", "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False,
        "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 8192, "mlp_ratio": 4, "num_heads": 16,
                          "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    },
}


def load_dims(model):
    """ModelDims of a built-in name, a config.json path or a directory holding config.json."""
    from transformers import AutoConfig

    if model in BUILTIN:
        raw, name = BUILTIN[model], model
    else:
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        if not os.path.isfile(path):
            raise SystemExit(f"--model {model}: no such config.json, directory or built-in name "
                             f"(built-ins: {', '.join(BUILTIN)})")
        with open(path) as f:
            raw = json.load(f)
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    raw = dict(raw)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    return dims_from_hf_config(config, name=name)


# ---------------------------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class Setup:
    nodes: int = 1
    gpus_per_node: int = 8
    zero: int = 3
    offload: str = "none"  # none | optimizer | param
    seq_len: int = 2048
    micro_batch: int = 1
    responses: int = 3
    chunk_size: int = LossConfig.logprob_chunk_size
    head: str = "fused"  # fused | naive
    reference: str = "cached"  # cached | live | adapters_off (LoRA: the policy with its adapters off)
    grad_ckpt: bool = True
    train_vision_tower: bool = False
    gpu_mem_gib: float = 80.0
    optim: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit (optim.name)
    finetune: str = "full"  # full | lora | qlora (model.finetune)
    lora_r: int = 16
    scoring: str = "shared"  # shared | rows (loss.scoring)
    response_len: int = 256  # R: tokens of one response, the part the shared layout does not share

    @property
    def ranks(self):
        return self.nodes * self.gpus_per_node

    @property
    def sequences(self):
        return self.micro_batch * self.responses

    @property
    def tokens(self):
        """S T: tokens one forward computes (see the module docstring)."""
        if self.scoring == "rows":
            return self.sequences * self.seq_len
        return self.micro_batch * (self.seq_len + (self.responses - 1) * min(self.response_len, self.seq_len))

    @property
    def head_tokens(self):
        """Positions the log-prob head scores: every position of every row (rows), or the responses only (shared:
        the scorer gathers the states that predict response tokens)."""
        if self.scoring == "rows":
            return self.sequences * self.seq_len
        return self.sequences * min(self.response_len, self.seq_len)

    @property
    def adapters(self):
        return self.finetune in ("lora", "qlora")


def setup_from_config(cfg, **cluster):
    """The Setup a training config runs (bpo.config tree): its lengths, batch, head, reference, optimizer, fine-tuning
    and scoring, and the ZeRO stage and offload of its ds_config; `cluster`: what a config does not say (nodes,
    gpus_per_node, gpu_mem_gib). The Triton head (loss.logprob_impl triton, or auto on CUDA) is priced as the fused
    one, an upper bound: it keeps the same fp32 lm_head gradient and tiles far smaller than a chunk of logits."""
    from bpo.runtime.ds_configs import DS_CONFIGS, read

    path = cfg.train.ds_config
    if not os.path.isabs(path) and not os.path.exists(path):  # ds_configs/... from another directory
        path = os.path.join(os.path.dirname(DS_CONFIGS), path)
    zero = read(path).get("zero_optimization", {})
    offloaded = lambda key: (zero.get(key) or {}).get("device", "none") not in ("none", None)  # noqa: E731
    adapters = cfg.model.finetune != "full"
    reference = ("cached" if cfg.train.ref_cache else
                 "adapters_off" if adapters and not cfg.train.ref_model_path else "live")
    return Setup(zero=zero.get("stage", 3),
                 offload="param" if offloaded("offload_param") else "optimizer" if offloaded("offload_optimizer")
                 else "none",
                 seq_len=cfg.data.max_length, micro_batch=cfg.train.micro_batch_size,
                 responses={"bpo": 3, "dpo": 2, "sft": 1}[cfg.loss.type], chunk_size=cfg.loss.logprob_chunk_size,
                 head="naive" if cfg.loss.logprob_impl == "naive" else "fused", reference=reference,
                 grad_ckpt=cfg.model.gradient_checkpointing, train_vision_tower=cfg.model.train_vision_tower,
                 optim=cfg.optim.name, finetune=cfg.model.finetune, lora_r=cfg.lora.r, scoring=cfg.loss.scoring,
                 **cluster)


def lora_params(dims, setup):
    """r x (in + out) for each nn.Linear LoRA adapts: the decoder layers' and the projector's (bpo.model.lora leaves the
    output head alone), and the vision tower's with --train-vision-tower."""
    linears = [(a, b, dims.layers) for a, b in dims.layer_linears] + list(dims.projector_linears)
    if setup.train_vision_tower:
        linears += list(dims.vision_linears)
    return setup.lora_r * sum((a + b) * count for a, b, count in linears)


def trainable_params(dims, setup):
    if setup.adapters:
        return lora_params(dims, setup)
    return dims.llm_params + dims.projector_params + (dims.vision_params if setup.train_vision_tower else 0)


# bitsandbytes NF4 with double quantization: 4 bits a weight plus one 8-bit scale per 64 weights (the fp32 scales of
# those scales, one per 256 blocks, are negligible).
NF4_BYTES = 0.5 + 1 / 64
# 8-bit Adam: m and v one byte each, plus one fp32 absmax per block of 256 for each.
ADAM8_BYTES = 2 + 2 * 4 / 256


def weight_bytes(dims, setup):
    """Bytes of the model's weights, the way they sit on the GPUs (before partitioning): bf16, or with QLoRA the
    decoder's Linear weights in NF4; LoRA's adapters (bf16) included."""
    extra = 2 * trainable_params(dims, setup) if setup.adapters else 0
    if setup.finetune == "qlora":
        pq = dims.quantizable_params
        return NF4_BYTES * pq + 2 * (dims.total_params - pq) + extra
    return 2 * dims.total_params + extra


def checkpoint_bytes(dims, setup=Setup()):
    """Disk for one ZeRO checkpoint: fp32 master + the optimizer's moments for the trained parameters (12 B each
    with AdamW, 6 with 8-bit Adam) and the frozen parameters as stored (bf16, NF4 for QLoRA's quantized ones);
    DeepSpeed keeps a LoRA run's whole frozen base in every checkpoint. Its module-state files add little."""
    pt = trainable_params(dims, setup)
    state = 4 + (ADAM8_BYTES if setup.optim != "adamw" else 8)
    return state * pt + weight_bytes(dims, setup) - 2 * pt


def _optimizer_row(setup):
    if setup.optim == "adamw":
        return "optimizer (fp32 master + Adam m, v)", 12, "12 Pt / N"
    return ("optimizer (fp32 master + 8-bit Adam m, v)", 4 + ADAM8_BYTES,
            "(4 + 2 + 8/256) Pt / N")


def estimate(dims, setup):
    """Rows (key, label, bytes per GPU, formula) and host bytes per node. Alternatives (the other head, the other
    references) are rows too; `total` sums the ones `setup` chooses."""
    if setup.zero not in (1, 2, 3):
        raise ValueError("--zero must be 1, 2 or 3")
    if setup.offload not in ("none", "optimizer", "param"):
        raise ValueError("--offload must be none, optimizer or param")
    if setup.offload == "param" and setup.zero != 3:
        raise ValueError("--offload param needs ZeRO-3")
    if setup.optim not in ("adamw", "adamw_8bit", "paged_adamw_8bit"):
        raise ValueError("--optim must be adamw, adamw_8bit or paged_adamw_8bit")
    if setup.optim != "adamw" and setup.offload != "none":
        raise ValueError("--optim 8-bit keeps its states on the GPU; with --offload DeepSpeed steps its own CPU Adam")
    if setup.finetune not in ("full", "lora", "qlora"):
        raise ValueError("--finetune must be full, lora or qlora")
    if setup.reference == "adapters_off" and not setup.adapters:
        raise ValueError("--reference adapters_off needs --finetune lora or qlora")
    n, pt = setup.ranks, trainable_params(dims, setup)
    st, h = setup.tokens, dims.hidden
    z3 = setup.zero == 3
    qlora = setup.finetune == "qlora"
    rows = []

    def row(key, label, value, formula):
        rows.append((key, label, value, formula))

    weights = weight_bytes(dims, setup)
    if qlora:
        w_label, w_formula = "parameters (NF4 decoder Linear, bf16 rest)", "((0.5 + 1/64) Pq + 2 (P - Pq + Pt))"
    elif setup.adapters:
        w_label, w_formula = "parameters (bf16, base + adapters)", "2 (P + Pt)"
    else:
        w_label, w_formula = "parameters (bf16)", "2 P"
    params_gpu = 0 if setup.offload == "param" else (weights / n if z3 else weights)
    row("params", w_label, params_gpu, "on CPU" if setup.offload == "param" else w_formula + (" / N" if z3 else ""))
    if setup.offload == "none":
        row("grads", "gradients (bf16)", 2 * pt / n if setup.zero >= 2 else 2 * pt,
            "2 Pt / N" if setup.zero >= 2 else "2 Pt")
        label, per, formula = _optimizer_row(setup)
        row("optim", label, per * pt / n, formula)
    else:
        row("grads", "gradients", 0, "on CPU")
        row("optim", "optimizer (fp32 master + Adam m, v)", 0, "on CPU")
    if z3:
        layer = 2 * dims.layer_params
        if qlora:
            pq_layer = sum(a * b for a, b in dims.layer_linears)
            layer = NF4_BYTES * pq_layer + 2 * (dims.layer_params - pq_layer)
        row("gather", "ZeRO-3 gathered layers", 2 * max(layer, 2 * dims.embedding_params),
            "2 x max(layer in NF4 + bf16, 2 embedding)" if qlora else "2 x 2 x max(layer, embedding)")
    if z3 and setup.offload == "none":
        row("step", "optimizer step: one sub-group's gradients (bf16 + fp32)",
            STEP_BYTES_PER_GRADIENT * min(SUB_GROUP_SIZE, pt / n), "6 x min(sub_group_size, Pt / N)")
    per_layer = st * (9 * h + 2 * dims.kv_dim + 4 * dims.intermediate) * 2
    if setup.grad_ckpt:
        row("ckpt", "activations: layer-input checkpoints", 2 * dims.layers * st * h, "2 L S T H")
        row("layer", "activations: one layer + its gradients", 2 * per_layer, "2 S T (18H + 4Hkv + 8I)")
    else:
        row("acts", "activations: every layer (no checkpointing)", dims.layers * (per_layer + 2 * st * h),
            "L S T (18H + 4Hkv + 8I + 2H)")
    chunk = min(setup.chunk_size, setup.head_tokens)
    head_weight = dims.vocab * dims.hidden  # V x H: the lm_head gradient each head forms whole
    row("head:fused", f"log-prob head: fused (chunk {chunk})",
        chunk * dims.vocab * HEAD_BYTES_PER_LOGIT + FUSED_WEIGHT_GRAD_BYTES * head_weight, "chunk V x 10 + 6 V H")
    row("head:naive", "log-prob head: naive",
        setup.head_tokens * dims.vocab * HEAD_BYTES_PER_LOGIT + NAIVE_WEIGHT_GRAD_BYTES * head_weight,
        "scored positions x V x 10 + 2 V H")
    row("ref:cached", "reference: cached", 0, "0")
    base = weights - (2 * pt if setup.adapters else 0)  # a frozen copy carries no adapters
    ref_live = 0 if setup.offload == "param" else (base / n if z3 else base)
    copy = "frozen NF4 + bf16 copy" if qlora else "frozen bf16 copy"
    row("ref:live", f"reference: live ({copy})", ref_live,
        "on CPU" if setup.offload == "param" else ("same as parameters, less Pt" if setup.adapters else
                                                    ("2 P / N" if z3 else "2 P")))
    if setup.adapters:
        row("ref:adapters_off", "reference: the policy with adapters off", 0, "0 (one more forward)")
    row("allowance", "CUDA context, NCCL, fragmentation", ALLOWANCE_BYTES, "fixed")

    host_per_rank = 0
    if setup.offload != "none":
        host_per_rank += 16 * pt / n
    if setup.offload == "param":
        host_per_rank += weights / n * (2 if setup.reference == "live" else 1)
    return rows, host_per_rank * setup.gpus_per_node


def references(setup):
    return ("cached", "live", "adapters_off") if setup.adapters else ("cached", "live")


def chosen(rows, setup):
    skip = {f"head:{'naive' if setup.head == 'fused' else 'fused'}"}
    skip |= {f"ref:{ref}" for ref in references(setup) if ref != setup.reference}
    return [r for r in rows if r[0] not in skip]


def total_bytes(dims, setup):
    rows, _ = estimate(dims, setup)
    return sum(r[2] for r in chosen(rows, setup))


def load_bytes(dims, setup):
    """QLoRA only: transformers quantizes outside zero.Init, so the whole NF4 model sits on every GPU until
    deepspeed.initialize partitions it (with the fixed allowance). 0 for the other modes, built partitioned."""
    return weight_bytes(dims, setup) + ALLOWANCE_BYTES if setup.finetune == "qlora" else 0


def _fmt_count(x):
    return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.1f}M"


def report(dims, setup, markdown=False):
    """The table as text: one row per component, chosen rows marked, total, verdict, the other choices' totals."""
    rows, host_node = estimate(dims, setup)
    picked = {r[0] for r in chosen(rows, setup)}
    total = sum(r[2] for r in rows if r[0] in picked)
    pt = trainable_params(dims, setup)
    peak = max(total, load_bytes(dims, setup))
    if setup.adapters:
        where = "decoder + projector" + (" + vision" if setup.train_vision_tower else "")
        trained = (f"trained Pt = {_fmt_count(pt)} LoRA parameters (r={setup.lora_r} on every Linear of the "
                   f"{where}); base frozen" + (", decoder Linear weights in NF4" if setup.finetune == "qlora" else ""))
    else:
        trained = f"trained Pt = {_fmt_count(pt)}"
    lines = [
        f"{dims.name}: {_fmt_count(dims.total_params)} parameters (LLM {_fmt_count(dims.llm_params)}, vision "
        f"{_fmt_count(dims.vision_params)} {'trained' if setup.train_vision_tower else 'frozen'}, projector "
        f"{_fmt_count(dims.projector_params)}); {trained}",
        f"{setup.nodes} node(s) x {setup.gpus_per_node} GPUs = N {setup.ranks}; ZeRO-{setup.zero}, offload "
        f"{setup.offload}; {setup.micro_batch} x {setup.responses} responses, T = {setup.seq_len}, scoring "
        f"{setup.scoring}{f' (R = {setup.response_len})' if setup.scoring == 'shared' else ''}: S T = {setup.tokens} "
        f"tokens per forward; "
        f"gradient checkpointing {'on' if setup.grad_ckpt else 'off'}; optimizer {setup.optim}",
        "",
    ]
    if markdown:
        lines += ["| component | GiB per GPU | formula (bytes) |", "|---|---:|---|"]
    else:
        lines.append(f"  {'component':<58} {'GiB/GPU':>8}  formula (bytes)")
    for key, label, value, formula in rows:
        mark = "" if key in picked else " (alternative)"
        if markdown:
            lines.append(f"| {label}{mark} | {value / GiB:.2f} | {formula} |")
        else:
            lines.append(f"  {label + mark:<58} {value / GiB:>8.2f}  {formula}")
    verdict = (f"fits in {setup.gpu_mem_gib:g} GiB ({setup.gpu_mem_gib - peak / GiB:.1f} GiB spare)"
               if peak <= setup.gpu_mem_gib * GiB else
               f"DOES NOT FIT in {setup.gpu_mem_gib:g} GiB (short by {peak / GiB - setup.gpu_mem_gib:.1f} GiB)")
    if markdown:
        lines.append(f"| **total ({setup.head} head, {setup.reference} reference)** | **{total / GiB:.2f}** | "
                     f"{verdict} |")
    else:
        lines.append(f"  {'total (' + setup.head + ' head, ' + setup.reference + ' reference)':<58} "
                     f"{total / GiB:>8.2f}  {verdict}")
    others = []
    for head in ("fused", "naive"):
        for ref in references(setup):
            if (head, ref) != (setup.head, setup.reference):
                other = total_bytes(dims, replace(setup, head=head, reference=ref)) / GiB
                fits = "fits" if other <= setup.gpu_mem_gib else "does not fit"
                others.append(f"{head} head + {ref} reference {other:.1f} GiB ({fits})")
    lines += ["", "other choices: " + "; ".join(others)]
    if setup.finetune == "qlora":
        lines.append(f"loading: the whole NF4 model sits on every GPU until ZeRO-3 partitions it: "
                     f"{load_bytes(dims, setup) / GiB:.1f} GiB with the allowance (the verdict counts it)")
    if setup.offload != "none":
        lines.append(f"host memory for offloaded state: {host_node / GiB:.1f} GiB per node")
    lines.append(f"one checkpoint on disk: {checkpoint_bytes(dims, setup) / GiB:.0f} GiB")
    from bpo.engines.estimate import engine_advice

    lines.append(engine_advice(dims, setup.gpus_per_node, setup.gpu_mem_gib))
    return "\n".join(lines), peak <= setup.gpu_mem_gib * GiB


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="config.json, a directory with one, or " + ", ".join(BUILTIN)
                        + " (with --config: model.path when left out)")
    parser.add_argument("--config", help="a training config (YAML): every setting it decides is read from it, and "
                                         "the flags for those are refused; nodes, GPUs, GPU memory and the response "
                                         "length stay flags")
    parser.add_argument("overrides", nargs="*", help="with --config: section.key=value, applied after the file")
    parser.add_argument("--nodes", type=int, default=Setup.nodes)
    parser.add_argument("--gpus-per-node", type=int, default=Setup.gpus_per_node)
    parser.add_argument("--zero", type=int, default=Setup.zero, choices=(1, 2, 3))
    parser.add_argument("--offload", default=Setup.offload, choices=("none", "optimizer", "param"))
    parser.add_argument("--seq-len", type=int, default=Setup.seq_len, help="tokens per sequence, image tokens included")
    parser.add_argument("--micro-batch", type=int, default=Setup.micro_batch, help="examples per GPU per forward")
    parser.add_argument("--responses", type=int, default=Setup.responses, help="3 for BPO, 2 for DPO")
    parser.add_argument("--scoring", default=Setup.scoring, choices=("shared", "rows"), help="loss.scoring")
    parser.add_argument("--response-len", type=int, default=Setup.response_len,
                        help="tokens of one response (the shared layout computes the prompt once)")
    parser.add_argument("--chunk-size", type=int, default=Setup.chunk_size, help="loss.logprob_chunk_size")
    parser.add_argument("--head", default=Setup.head, choices=("fused", "naive"), help="loss.logprob_impl")
    parser.add_argument("--reference", default=Setup.reference, choices=("cached", "live", "adapters_off"),
                        help="cached = train.ref_cache set; adapters_off = LoRA's default without a cache")
    parser.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    parser.add_argument("--train-vision-tower", action="store_true")
    parser.add_argument("--optim", default=Setup.optim, choices=("adamw", "adamw_8bit", "paged_adamw_8bit"),
                        help="optim.name")
    parser.add_argument("--finetune", default=Setup.finetune, choices=("full", "lora", "qlora"),
                        help="model.finetune")
    parser.add_argument("--lora-r", type=int, default=Setup.lora_r, help="lora.r")
    parser.add_argument("--gpu-mem-gb", type=float, default=Setup.gpu_mem_gib,
                        help="usable memory per GPU in GiB (an H100 80GB reports 79.6 GiB)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_intermixed_args(argv)
    if not args.model and not args.config:
        parser.error("--model is required without --config")
    if args.overrides and not args.config:
        parser.error(f"overrides {args.overrides} need --config")
    if args.config:
        given = [d for d in CONFIG_DECIDES if getattr(args, d) != parser.get_default(d)]
        if given:
            parser.error(f"--config decides {', '.join(given)}: set them in the config or as section.key=value "
                         f"overrides")
    return args


# The Setup fields a training config decides (setup_from_config), named as parse_args names them.
CONFIG_DECIDES = ("zero", "offload", "seq_len", "micro_batch", "responses", "chunk_size", "head", "reference",
                  "grad_ckpt", "train_vision_tower", "optim", "finetune", "lora_r", "scoring")


def build_setup(args):
    """(model, Setup) from the command line: from --config and its overrides when given, else from the flags."""
    cluster = dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem_gb)
    if args.config:
        from bpo.config import load_config

        cfg = load_config(args.config, args.overrides)
        return args.model or cfg.model.path, setup_from_config(cfg, response_len=args.response_len, **cluster)
    return args.model, Setup(zero=args.zero, offload=args.offload,
                             seq_len=args.seq_len, micro_batch=args.micro_batch, responses=args.responses,
                             chunk_size=args.chunk_size, head=args.head, reference=args.reference,
                             grad_ckpt=args.grad_ckpt, train_vision_tower=args.train_vision_tower, optim=args.optim,
                             finetune=args.finetune, lora_r=args.lora_r, scoring=args.scoring,
                             response_len=args.response_len, **cluster)


def main(argv=None):
    args = parse_args(argv)
    model, setup = build_setup(args)
    try:
        text, fits = report(load_dims(model), setup, markdown=args.markdown)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(text)
    return 0 if fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
