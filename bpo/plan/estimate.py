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

import os
from dataclasses import dataclass

from bpo.config import LossConfig
from bpo.runtime.ds_configs import DS_CONFIGS, read

GiB = 2**30
ALLOWANCE_BYTES = 4 * GiB
SUB_GROUP_SIZE = 10**8  # ds_configs/zero3.json's sub_group_size
STEP_BYTES_PER_GRADIENT = 2 + 4  # the optimizer step's flat bf16 copy of a sub-group's gradients + its fp32 copy
HEAD_BYTES_PER_LOGIT = 2 + 4 + 4  # bf16 logits + fp32 log-softmax + fp32 gradient
FUSED_WEIGHT_GRAD_BYTES = 4 + 2  # per lm_head weight: the fp32 gradient accumulator + its bf16 copy (bpo.ops)
NAIVE_WEIGHT_GRAD_BYTES = 2  # per lm_head weight: the bf16 gradient of the logits matmul


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

