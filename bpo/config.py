"""The one config tree every bpo job reads: dataclasses with the paper's defaults, YAML + dotted overrides.

    cfg = load_config("configs/smoke.yaml", ["optim.lr=1e-4", "train.max_steps=20"])

Every default is defined here and nowhere else; `validate` runs once; the resolved tree is printed at start and saved
in the run directory as `config.yaml`, so a run can always be repeated from its own directory.
"""

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field

import yaml


@dataclass
class ModelConfig:
    path: str = ""  # local checkpoint directory; bpo never downloads
    dtype: str = "bf16"  # bf16 | fp16 | fp32: the dtype weights are loaded and trained in
    attn_implementation: str = "auto"  # auto = flash_attention_2 when importable on CUDA, else sdpa
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    # Which parts are trained; defaults are the paper's: vision tower frozen, projector and LLM trained.
    train_vision_tower: bool = False
    train_projector: bool = True
    train_language_model: bool = True
    # full = train the parts' weights; lora = freeze every weight and train LoRA adapters (section `lora`) on the
    # nn.Linear layers of the parts marked trained; qlora = lora on a base whose language-model Linear layers are
    # loaded in 4-bit NF4 (bitsandbytes, CUDA only).
    finetune: str = "full"


@dataclass
class DataConfig:
    train_file: str = ""
    image_root: str = ""  # directory the records' `image` names are relative to
    max_length: int = 1024  # prompt (never cut) + response (cut at the end) tokens per sequence
    # Chat template used instead of the checkpoint's: a Jinja file, or a template shipped in bpo/templates
    # (vicuna_v1: what LLaVA-1.5 was trained with; its published template writes no end of turn). Empty = checkpoint.
    chat_template: str = ""
    skip_bad: bool = False  # train on the usable records of a file with bad ones, reporting each skip
    # Blind responses cut at decode.max_new_tokens (blind_meta.finish_reason "length") are left out of the blind
    # term by default; true keeps them, scored as written: without an end token.
    keep_cut_blind: bool = False
    check_images: bool = True  # open every image once before training


@dataclass
class LossConfig:
    # bpo = chosen vs rejected + chosen vs blind; dpo = the first term only; sft = supervised fine-tuning, the NLL
    # of the chosen response alone (no reference, no rejected or blind response is read)
    type: str = "bpo"
    beta: float = 0.1
    blind_weight: float = 1.0
    # dpo/bpo: add sft_weight x the NLL of the chosen response (bpo.loss.nll_loss; TRL's rpo_alpha, InternVL's MPO
    # generation term). 0 = the paper's objective.
    sft_weight: float = 0.0
    reduction: str = "sum"  # sum | mean of per-token log-probs over a response
    logprob_impl: str = "fused"  # fused = chunked head, never full-vocabulary logits; naive = log_softmax reference
    logprob_chunk_size: int = 1024  # tokens per chunk of the fused head
    # shared = each prompt (and image) computed once with its responses after it (bpo.data.shared); rows = one padded
    # row per response, the readable reference. A family the shared layout cannot take falls back to rows, logged.
    scoring: str = "shared"


@dataclass
class LoraConfig:
    """LoRA adapters for model.finetune=lora|qlora (PEFT): W x + (alpha / r) B A x on each adapted nn.Linear."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # on the adapters' input only
    # What train.export_16bit writes to OUTPUT_DIR/hf_model: `adapter` = a PEFT adapter directory (adapter_config.json
    # + adapter_model.safetensors), `merged` = full weights with B A folded in, which load with from_pretrained.
    export: str = "adapter"


@dataclass
class OptimConfig:
    # adamw = the ds_config's optimizer section (DeepSpeed's AdamW: FusedAdam on CUDA, torch's on CPU);
    # adamw_8bit / paged_adamw_8bit = bitsandbytes AdamW with 8-bit moments, handed to DeepSpeed as a client
    # optimizer over the ZeRO partitions (paged: CUDA unified memory; on CPU bitsandbytes runs it unpaged).
    name: str = "adamw"
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: typing.List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | constant (both after linear warm-up)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/bpo"
    ds_config: str = "ds_configs/zero3.json"
    epochs: int = 1
    max_steps: int = -1  # optimizer steps; -1 = run all epochs
    micro_batch_size: int = 1  # examples (not sequences) per rank per forward
    # loss.scoring=shared: pack a micro-batch's examples into sequences of at most this many tokens (padding-free);
    # 0 = one sequence per example.
    max_tokens_per_sequence: int = 0
    grad_accum: int = 1
    seed: int = 42
    log_every: int = 1
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = False  # continue from output_dir/checkpoints/latest when it exists
    ref_cache: str = ""  # directory of cached reference log-probs; empty = live frozen reference model
    ref_model_path: str = ""  # reference weights; empty = model.path (the paper: reference = initial policy)
    export_16bit: bool = False  # also write a Hugging Face model directory (OUTPUT_DIR/hf_model, model.dtype) at the end
    plot: bool = True
    tensorboard: bool = True


@dataclass
class DecodeConfig:
    """How the generation jobs (blind responses, evaluation) decode. Greedy by default, as in the paper."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    zero3: bool = False  # shard the model with ZeRO-3 inference (for models larger than one device; slow)


@dataclass
class BlindConfig:
    input_file: str = ""  # default: data.train_file
    output_file: str = ""  # JSONL: every input record plus `blind` and `blind_meta`
    model_path: str = ""  # default: model.path (the reference model writes y_b)
    batches_per_shard: int = 4  # unit of resumption: a finished shard is never redone


@dataclass
class CacheConfig:
    """The reference log-prob caching job (bpo/ref_logprobs.py); training reads the result via train.ref_cache."""

    output_dir: str = ""
    shard_size: int = 256  # examples per shard file: the unit of resumption
    batch_size: int = 4  # examples per forward
    per_token: bool = False  # also keep per-token log-probs


@dataclass
class EvalConfig:
    """bpo/evaluate.py: generate on a test set, judge safety, pairwise and implicit-reward accuracy."""

    test_file: str = ""  # a file (MMSafe-PO, SPA-VL) or a directory (MM-SafetyBench)
    format: str = "mmsafe_po"  # mmsafe_po | mm_safetybench | spa_vl
    image_root: str = ""  # default: data.image_root
    model_path: str = ""  # the model evaluated (e.g. an exported run); default: model.path
    output_dir: str = "runs/eval"
    judge: typing.Dict[str, typing.Any] = field(default_factory=lambda: {"type": "refusal"})  # see bpo/eval/judges.py
    pairwise: bool = True  # ask the model which of chosen/rejected is harmless (sets with pairs only)
    pairwise_seed: int = 0
    pairwise_max_new_tokens: int = 16
    reward_accuracy: bool = True  # implicit reward margins vs the reference (eval.ref_cache, else model.path live)
    ref_cache: str = ""  # a reference cache built on the test file (bpo/ref_logprobs.py data.train_file=TEST)
    limit: int = 0  # evaluate only the first N examples (0 = all)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    blind: BlindConfig = field(default_factory=BlindConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    pass


def _coerce(value, annotation, key):
    """Turn a YAML or command-line value into the field's type, with an error naming the key."""
    origin = typing.get_origin(annotation)
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if annotation in (int, float, str):
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return annotation(value)
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if origin in (list, typing.List):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            (inner,) = typing.get_args(annotation)
            return [_coerce(v, inner, key) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key}: cannot read {value!r} as {getattr(annotation, '__name__', annotation)}")
    return value


def _apply(node, data, prefix=""):
    hints = typing.get_type_hints(type(node))
    names = {f.name for f in dataclasses.fields(node)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; known keys here: {sorted(names)}")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; give it a mapping")
            _apply(current, value, prefix=path + ".")
        elif isinstance(current, dict) and isinstance(value, dict):
            setattr(node, key, {**current, **_coerce(value, hints[key], path)})  # free-form section: merge keys
        else:
            setattr(node, key, _coerce(value, hints[key], path))


def _set_dotted(data, dotted, raw):
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(path=None, overrides=()):
    """Defaults <- YAML file <- `section.key=value` overrides, then validated."""
    data = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}")
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}")
    return from_dict(data, overrides)


def from_dict(data, overrides=()):
    """A validated Config from a nested dict (as a YAML file holds) and `section.key=value` overrides."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        k, v = item.split("=", 1)
        _set_dotted(data, k.strip(), v.strip())
    cfg = Config()
    _apply(cfg, data)
    validate(cfg)
    return cfg


def _choice(value, allowed, key):
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")


def validate(cfg):
    _choice(cfg.model.dtype, ("bf16", "fp16", "fp32"), "model.dtype")
    _choice(cfg.model.attn_implementation, ("auto", "flash_attention_2", "sdpa", "eager"), "model.attn_implementation")
    _choice(cfg.loss.type, ("bpo", "dpo", "sft"), "loss.type")
    _choice(cfg.loss.reduction, ("sum", "mean"), "loss.reduction")
    _choice(cfg.loss.logprob_impl, ("fused", "naive"), "loss.logprob_impl")
    _choice(cfg.loss.scoring, ("shared", "rows"), "loss.scoring")
    if cfg.train.max_tokens_per_sequence < 0:
        raise ConfigError(f"train.max_tokens_per_sequence must be >= 0, got {cfg.train.max_tokens_per_sequence}")
    _choice(cfg.optim.schedule, ("cosine", "constant"), "optim.schedule")
    _choice(cfg.optim.name, ("adamw", "adamw_8bit", "paged_adamw_8bit"), "optim.name")
    _choice(cfg.model.finetune, ("full", "lora", "qlora"), "model.finetune")
    _choice(cfg.lora.export, ("adapter", "merged"), "lora.export")
    _choice(cfg.eval.format, ("mmsafe_po", "mm_safetybench", "spa_vl"), "eval.format")
    for key, value in [("loss.beta", cfg.loss.beta), ("optim.lr", cfg.optim.lr), ("data.max_length", cfg.data.max_length),
                       ("train.micro_batch_size", cfg.train.micro_batch_size), ("train.grad_accum", cfg.train.grad_accum),
                       ("loss.logprob_chunk_size", cfg.loss.logprob_chunk_size),
                       ("decode.max_new_tokens", cfg.decode.max_new_tokens), ("decode.batch_size", cfg.decode.batch_size),
                       ("decode.temperature", cfg.decode.temperature), ("decode.top_p", cfg.decode.top_p),
                       ("blind.batches_per_shard", cfg.blind.batches_per_shard),
                       ("cache.shard_size", cfg.cache.shard_size), ("cache.batch_size", cfg.cache.batch_size),
                       ("lora.r", cfg.lora.r), ("lora.alpha", cfg.lora.alpha)]:
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.optim.warmup_steps < 0 or cfg.loss.blind_weight < 0 or cfg.loss.sft_weight < 0:
        raise ConfigError("optim.warmup_steps, loss.blind_weight and loss.sft_weight must be >= 0")
    if cfg.loss.type == "sft":
        # Settings SFT would silently ignore are refused, so a run never looks like something it is not.
        ignored = [k for k, v in [("train.ref_cache", cfg.train.ref_cache),
                                  ("train.ref_model_path", cfg.train.ref_model_path),
                                  ("loss.sft_weight", cfg.loss.sft_weight)] if v]
        if ignored:
            raise ConfigError(f"loss.type=sft is the NLL of the chosen response alone: it reads no reference and "
                              f"has no second NLL term to weigh; unset {', '.join(ignored)}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must hold two numbers, got {cfg.optim.betas}")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.model.finetune != "full" and not (cfg.model.train_language_model or cfg.model.train_projector
                                             or cfg.model.train_vision_tower):
        raise ConfigError(f"model.finetune={cfg.model.finetune} adapts the parts model.train_language_model / "
                          f"train_projector / train_vision_tower mark trained, and all three are false")


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def to_yaml(cfg):
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg, path):
    """Write config.yaml atomically so a killed start never leaves half a config behind."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(to_yaml(cfg))
    os.replace(tmp, path)


def require(cfg, *keys):
    """Fail early, naming the key, when a job needs a setting the defaults leave empty."""
    for key in keys:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node in ("", None):
            raise ConfigError(f"{key} is required (set it in the config file or pass {key}=...)")
