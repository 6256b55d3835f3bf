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

from bpo.runtime.atomic import write_text


@dataclass
class ModelConfig:
    path: str = ""  # local checkpoint directory; bpo never downloads
    dtype: str = "bf16"  # bf16 | fp16 | fp32: the dtype weights are loaded and trained in
    # auto = a kernel that takes loss.scoring=shared's masks: flex_attention on CUDA (FlexAttention block masks, no
    # (L, L) mask materialised), sdpa elsewhere (dense masks). flash_attention_2 takes no custom mask: it needs
    # loss.scoring=rows, and with shared the job stops at start.
    attn_implementation: str = "auto"
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
    # ZeRO-3 leaf modules (deepspeed.utils.set_z3_leaf_modules): class names of mixture-of-experts blocks whose
    # parameters are gathered all at once, as one unit. Needed where each expert is its own module, called only when
    # a token routes to it (remote-code DeepSeek/Mixtral-style MoE): ranks routing differently would otherwise gather
    # different modules and their collectives would desynchronise (a hang on NCCL). Blocks holding an `experts`
    # nn.ModuleList are found without being named here (bpo.model.moe.leaf_module_classes); transformers 5's own MoE
    # classes keep every expert in one fused tensor and need none.
    z3_leaf_modules: typing.List[str] = field(default_factory=list)


@dataclass
class DataConfig:
    # .json, .jsonl, either gzipped, .parquet as `datasets` writes it, or a hub dataset folder (bpo.data.formats)
    train_file: str = ""
    split: str = ""  # the split of a dataset folder: SPLIT or CONFIG/SPLIT (e.g. test/harm); empty for a single file
    image_root: str = ""  # directory the records' `image` names are relative to
    # Where images stored inline (parquet HF Image bytes) are extracted, as images/<sha256[:16]>.<ext>; empty = the
    # data file's folder
    image_cache: str = ""
    max_length: int = 1024  # prompt (never cut) + response (cut at the end) tokens per sequence
    # Chat template used instead of the checkpoint's: a Jinja file, or a template shipped in bpo/templates
    # (vicuna_v1: what LLaVA-1.5 was trained with; its published template writes no end of turn). Empty = checkpoint.
    chat_template: str = ""
    # Keyword arguments of the chat template, passed to every rendering (prompts, responses, generation, bpo's probes
    # of the template), e.g. {enable_thinking: false} for templates with a thinking switch (Gemma-4, Qwen3).
    chat_template_kwargs: typing.Dict[str, typing.Any] = field(default_factory=dict)
    skip_bad: bool = False  # train on the usable records of a file with bad ones, reporting each skip
    # Blind responses cut at decode.max_new_tokens (blind_meta.finish_reason "length") are left out of the blind
    # term by default; true keeps them, scored as written: without an end token.
    keep_cut_blind: bool = False
    check_images: bool = True  # open every image once before training
    # Larger images are bad records, refused from their header before decoding (a 12000x12000 photo would take
    # ~2.4 GB on its way through the image processor). 40M pixels is e.g. 8000x5000.
    max_image_pixels: int = 40_000_000
    # Read `image` names that are absolute or climb out of image_root (`../x`); refused by default, so a data file
    # cannot make a job read files elsewhere.
    allow_outside_image_root: bool = False


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
    # The log-prob head (bpo.ops): naive = log_softmax over the full-vocabulary logits, the readable reference;
    # fused = the chunked torch head, never full-vocabulary logits; triton = the Triton kernels (CUDA; CPU only under
    # TRITON_INTERPRET=1), refused where they cannot run; auto = triton on a CUDA device with triton installed, else
    # fused. Every job prints the head it runs at start.
    logprob_impl: str = "auto"
    # Tokens per chunk of the fused head (triton tiles on its own); bpo.ops.logprobs.DEFAULT_CHUNK_SIZE is this value.
    # Its fp32 (V, chunk) logits block is the head's only vocabulary-sized tensor: benchmarks/logprob_bench.py at
    # V = 128256, H = 1024, 4096 tokens put the peak at ~0.11x the naive head's with 256 (the fp32 lm_head gradient
    # is most of it), ~0.13x with 512, and larger chunks were no faster.
    logprob_chunk_size: int = 256
    # shared = each prompt (and image) computed once with its responses after it (bpo.data.shared); rows = one padded
    # row per response, the readable reference. An attention that cannot take the shared layout stops the job.
    scoring: str = "shared"
    # Mixture-of-experts models: add router_aux_coef x the model's own load-balancing loss (its modeling module's
    # `load_balancing_loss_func` over the router logits it returns with output_router_logits=True, e.g. Qwen3-VL-MoE)
    # to the loss, logged as router_aux. 0 = the paper's objective (the routers get only the BPO gradient).
    router_aux_coef: float = 0.0


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
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept; 0 = all
    # Continue from the newest complete checkpoint in output_dir (or start at step 0 when there is none); false into
    # an output_dir that holds checkpoints is refused rather than overwriting them.
    resume: bool = False
    # Changes a resume accepts in the keys that change the math (bpo.run_record), e.g. [loss.beta, data.contents];
    # --allow-change KEY adds one. Recorded in RUN/history/; anything else that differs from the run is refused.
    resume_allow: typing.List[str] = field(default_factory=list)
    # Consecutive steps with a non-finite loss or gradient norm (DeepSpeed skips those updates) that stop the run,
    # naming the last finite checkpoint; 0 = never stop.
    max_bad_steps: int = 3
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
    # hf = transformers `generate` in this process (the reference); vllm = an OpenAI-compatible server (vLLM, SGLang)
    # at server_url, sent the prompts the hf path would decode (bpo/engines/server.py; docs/generation.md).
    engine: str = "hf"
    server_url: str = ""  # base URL of the server's API, e.g. http://127.0.0.1:8000/v1
    server_model: str = ""  # the name the server serves the model under; empty = the model path as configured
    concurrency: int = 32  # requests in flight at once (server engine); keep batch_size a few times larger
    server_timeout_s: float = 600.0  # per request: a 256-token reply from a loaded 72B server can take minutes
    server_retries: int = 5  # retries after the first attempt, on connection errors, HTTP 429 and 5xx
    server_backoff_s: float = 2.0  # first retry waits about this long; doubles each retry, with jitter, up to 60 s


# Decoding settings that change how requests travel, not what is decoded: a resumed job may change them (a requeued
# job's server comes up on another node), so they stay out of the settings a parts directory is bound to.
TRANSPORT_KEYS = ("zero3", "server_url", "concurrency", "server_timeout_s", "server_retries", "server_backoff_s")


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


# eval.judge: the judge that reads the evaluated model's answers (bpo/eval/judges.py builds it). `type` picks the
# dataclass, and with it the keys the section takes; the YAML gives it as a mapping, e.g. judge: {type: refusal}.


@dataclass
class RefusalJudgeConfig:
    type: str = "refusal"  # offline keyword rules


@dataclass
class OpenAIJudgeConfig:
    type: str = "openai"  # any OpenAI-compatible chat-completions endpoint
    url: str = ""  # base URL, e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key (never the key itself)
    max_retries: int = 5  # retries after the first attempt, on HTTP 429, 5xx and connection errors
    timeout_s: float = 120.0  # per request
    backoff_s: float = 1.0  # first retry waits about this long; doubles each retry, with jitter
    backoff_max_s: float = 60.0
    max_tokens: int = 16  # the verdict is one word; guard models may add a category line
    workers: int = 4  # requests in flight at once
    cache_dir: str = ""  # verdict cache directory; empty = no cache
    prompt_file: str = ""  # empty = bpo/eval/judge_prompt.txt


@dataclass
class HFJudgeConfig:
    type: str = "hf"  # a local guard model
    path: str = ""  # local model directory; never downloaded
    model_class: str = "auto"  # auto | image-text-to-text | causal-lm (auto: by the config's model type)
    dtype: str = "bf16"  # bf16 | fp16 | fp32
    device: str = "auto"  # auto = cuda when available, else cpu
    max_new_tokens: int = 8
    prompt_file: str = ""  # empty = bpo/eval/judge_prompt.txt; or a shipped prompt's name (mm_safetybench)
    # prompt = the judge prompt as one user message; conversation = the guard-model preset: the request (with its
    # image) as the user turn and the response as the assistant turn, through the guard's own chat template, which
    # carries its policy and asks for its verdict (Llama Guard 3 / Llama Guard 3 Vision answer "safe" or "unsafe\nS<k>")
    input: str = "prompt"


JUDGE_CONFIGS = {"refusal": RefusalJudgeConfig, "openai": OpenAIJudgeConfig, "hf": HFJudgeConfig}
JudgeConfig = typing.Union[RefusalJudgeConfig, OpenAIJudgeConfig, HFJudgeConfig]


@dataclass
class EvalConfig:
    """bpo/evaluate.py: generate on a test set, judge safety, pairwise and implicit-reward accuracy."""

    # A file or hub dataset folder (MMSafe-PO, SPA-VL), a CSV (FigStep), test.json (VLGuard), a checkout (MMSB)
    test_file: str = ""
    split: str = ""  # the split of a dataset folder (SPA-VL: test/harm); inline images go to data.image_cache
    format: str = "mmsafe_po"  # mmsafe_po | mm_safetybench | spa_vl | figstep | vlguard (docs/eval_formats.md)
    image_root: str = ""  # default: data.image_root
    model_path: str = ""  # the model evaluated (e.g. an exported run); default: model.path
    output_dir: str = "runs/eval"
    judge: JudgeConfig = field(default_factory=RefusalJudgeConfig)  # eval.judge.type picks the judge (above)
    pairwise: bool = True  # ask the model which of chosen/rejected is harmless (sets with pairs only)
    pairwise_seed: int = 0
    pairwise_max_new_tokens: int = 16
    reward_accuracy: bool = True  # implicit reward margins vs the reference (eval.ref_cache, else model.path live)
    ref_cache: str = ""  # a reference cache built on the test file (bpo/ref_logprobs.py data.train_file=TEST)
    limit: int = 0  # evaluate only the first N examples (0 = all)
    # Ask every example that has an image a second time with the image withheld (same text, marker dropped) and
    # report both safety rates side by side per category: the modality gap. Doubles generation and judging.
    modality_probe: bool = True


# Entity types the data builder knows, each with the phrase that replaces a mention of such an entity (the order is
# the order the entity prompt lists them in). A type may be added here (build.replace.phrases.animal=...); the
# entity stage then offers it to the LLM.
DEFAULT_PHRASES = {
    "person": "the person in the image",
    "organization": "the organization shown in the image",
    "place": "the place shown in the image",
    "object": "the object in the image",
    "group": "the group of people shown in the image",
    "event": "the event shown in the image",
    "work": "the work shown in the image",
}


@dataclass
class BuildLLMConfig:
    """The OpenAI-compatible chat endpoint the entity and rewrite stages ask (vLLM, SGLang, a hosted API)."""

    url: str = ""  # API base, e.g. http://127.0.0.1:8000/v1
    model: str = ""  # the name the endpoint serves the model under
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (never the key); localhost needs none
    temperature: float = 0.0  # 0 = greedy: the same request gets the same answer, which the cache then keeps
    max_attempts: int = 3  # answers asked per stage and record (the first + re-asks) before the record is reported
    workers: int = 8  # requests in flight at once
    cache_dir: str = ""  # content-hash answer cache; empty = OUTPUT.cache beside build.output_file
    max_retries: int = 5  # HTTP retries after the first attempt, on connection errors, 429 and 5xx
    backoff_s: float = 1.0  # first retry waits about this long; doubles each retry, with jitter, up to 60 s
    timeout_s: float = 120.0  # per request


@dataclass
class BuildEntityConfig:
    backend: str = "llm"  # llm = ask build.llm; spacy = an installed spaCy model; given = the input's own fields
    prompt_file: str = ""  # empty = bpo/build_data/prompts/entity_v1.txt
    max_tokens: int = 64
    spacy_model: str = ""  # backend spacy: a package name or directory spacy.load takes (never downloaded)


@dataclass
class BuildImageConfig:
    backend: str = "bank"  # bank = look the entity up in a local image bank; diffusers = generate an image
    bank: str = ""  # a directory (file names are entity names) or an index file (JSON or JSONL: name -> image)
    min_similarity: float = 0.85  # fuzzy name matching (difflib ratio of normalised names) accepts this or more
    diffusers_model: str = ""  # backend diffusers: a local text-to-image pipeline directory (safetensors)
    diffusers_prompt: str = "a photo of {entity}"
    diffusers_steps: int = 30
    seed: int = 0  # diffusers: each image's seed is derived from this and the entity


@dataclass
class BuildReplaceConfig:
    # entity type -> the phrase its mentions become; keys merge with the defaults, and an empty phrase
    # (build.replace.phrases.event="") takes the type out: the entity stage no longer offers it.
    phrases: typing.Dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PHRASES))


@dataclass
class BuildRewriteConfig:
    backend: str = "llm"  # llm = ask build.llm to rewrite the replaced request; none = keep it as replaced
    prompt_file: str = ""  # empty = bpo/build_data/prompts/rewrite_v1.txt
    max_tokens: int = 256


@dataclass
class BuildConfig:
    """python -m bpo.build_data: text-only preference data -> MMSafe-PO records (bpo/build_data/)."""

    # HH-RLHF transcripts (chosen/rejected), prompt/chosen/rejected or PKU-SafeRLHF records: JSON, JSONL, either
    # gzipped (HH-RLHF's harmless-base/test.jsonl.gz), parquet, or a hub dataset folder with build.input_split
    input_file: str = ""
    input_split: str = ""  # SPLIT or CONFIG/SPLIT of a dataset folder (bpo.data.formats); empty for a single file
    # auto (per record: `response_0` present -> pku, else `prompt` present -> prompt, else hh) | hh | prompt | pku
    input_format: str = "auto"
    output_file: str = ""  # JSONL of MMSafe-PO records; OUTPUT.report.json beside it
    image_dir: str = ""  # where the records' images are written (the image root); empty = OUTPUT_images
    batch_size: int = 16  # records handed to the request workers at once; the progress bar moves per batch
    batches_per_shard: int = 8  # unit of resumption: a finished shard is never redone
    llm: BuildLLMConfig = field(default_factory=BuildLLMConfig)
    entity: BuildEntityConfig = field(default_factory=BuildEntityConfig)
    image: BuildImageConfig = field(default_factory=BuildImageConfig)
    replace: BuildReplaceConfig = field(default_factory=BuildReplaceConfig)
    rewrite: BuildRewriteConfig = field(default_factory=BuildRewriteConfig)


# build.llm settings that change how requests travel, not what is answered: a resumed build may change them.
BUILD_TRANSPORT_KEYS = ("url", "api_key_env", "workers", "cache_dir", "max_retries", "backoff_s", "timeout_s")


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
    build: BuildConfig = field(default_factory=BuildConfig)


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
            if annotation in (int, float) and isinstance(value, bool):
                raise ValueError(value)  # YAML's true is 1 to int(); train.micro_batch_size=true is a mistake
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
        if hints[key] == JudgeConfig:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; give it a mapping")
            setattr(node, key, _judge_from({**_judge_keys_set(current), **value}, path))
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; give it a mapping")
            _apply(current, value, prefix=path + ".")
        elif isinstance(current, dict) and isinstance(value, dict):
            setattr(node, key, {**current, **_coerce(value, hints[key], path)})  # free-form section: merge keys
        else:
            setattr(node, key, _coerce(value, hints[key], path))


def _judge_keys_set(judge):
    """The judge's type and the keys that differ from its defaults: what a later mapping (a YAML file's, then
    overrides) merges with, as into a free-form section, so keys given for another type are refused, not dropped."""
    return {"type": judge.type, **{f.name: getattr(judge, f.name) for f in dataclasses.fields(judge)
                                   if getattr(judge, f.name) != f.default}}


def _judge_from(data, key):
    """The judge config dataclass `data["type"]` picks, its keys read by _coerce; values are validate_judge's."""
    if not isinstance(data, dict) or "type" not in data:
        raise ConfigError(f"{key} needs a 'type', one of {sorted(JUDGE_CONFIGS)}; got {data!r}")
    kind = data["type"]
    if not isinstance(kind, str) or kind not in JUDGE_CONFIGS:
        raise ConfigError(f"{key}.type must be one of {sorted(JUDGE_CONFIGS)}, got {kind!r}")
    cls = JUDGE_CONFIGS[kind]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} for a {kind} judge ({key}); known keys: {sorted(hints)}")
    return cls(**{k: _coerce(v, hints[k], f"{key}.{k}") for k, v in data.items()})


def judge_config(data, key="eval.judge"):
    """A validated judge config from a mapping of eval.judge's keys (a library caller's; the tree's own is read by
    load_config): the same reading and checks as the config file's."""
    judge = _judge_from(data, key)
    validate_judge(judge, key)
    return judge


def _set_dotted(data, dotted, raw):
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}={raw}: {k!r} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", "") or e).strip()
        raise ConfigError(f"override {dotted}={raw}: the value is not valid YAML ({problem}); quote a string, "
                          f"write a list as [a, b]") from None


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


# Arguments apply_chat_template takes itself (or that bpo sets): not the template's own keyword arguments.
_RESERVED_TEMPLATE_KWARGS = ("conversation", "messages", "chat_template", "tools", "documents", "add_generation_prompt",
                             "continue_final_message", "return_assistant_tokens_mask", "tokenize", "return_tensors",
                             "return_dict", "processor_kwargs", "tokenizer_kwargs", "sanitize_control_tokens",
                             "load_audio_from_video")


def _validate_template_kwargs(kwargs):
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"data.chat_template_kwargs: {key!r} is not a template variable name")
        if key in _RESERVED_TEMPLATE_KWARGS:
            raise ConfigError(f"data.chat_template_kwargs: {key!r} is an argument of apply_chat_template that bpo "
                              f"sets itself, not a template variable")


def validate(cfg):
    _validate_template_kwargs(cfg.data.chat_template_kwargs)
    _choice(cfg.model.dtype, ("bf16", "fp16", "fp32"), "model.dtype")
    _choice(cfg.model.attn_implementation, ("auto", "flash_attention_2", "flex_attention", "sdpa", "eager"),
            "model.attn_implementation")
    _choice(cfg.loss.type, ("bpo", "dpo", "sft"), "loss.type")
    _choice(cfg.loss.reduction, ("sum", "mean"), "loss.reduction")
    _choice(cfg.loss.logprob_impl, ("naive", "fused", "triton", "auto"), "loss.logprob_impl")
    _choice(cfg.loss.scoring, ("shared", "rows"), "loss.scoring")
    if cfg.loss.scoring == "shared" and cfg.model.attn_implementation == "flash_attention_2":
        # Never a silent fallback to rows: that is another job, ~3x the prompt tokens (issue 22).
        raise ConfigError("loss.scoring=shared gives each sequence a custom attention mask (each response sees its "
                          "prompt, never a sibling), and model.attn_implementation=flash_attention_2 takes none: use "
                          "model.attn_implementation=auto (flex_attention on CUDA, sdpa on CPU), sdpa or "
                          "flex_attention, or set loss.scoring=rows")
    _choice(cfg.optim.schedule, ("cosine", "constant"), "optim.schedule")
    _choice(cfg.optim.name, ("adamw", "adamw_8bit", "paged_adamw_8bit"), "optim.name")
    _choice(cfg.model.finetune, ("full", "lora", "qlora"), "model.finetune")
    _choice(cfg.lora.export, ("adapter", "merged"), "lora.export")
    _choice(cfg.eval.format, ("mmsafe_po", "mm_safetybench", "spa_vl", "figstep", "vlguard"), "eval.format")
    _choice(cfg.decode.engine, ("hf", "vllm"), "decode.engine")
    if cfg.decode.engine == "vllm" and not cfg.decode.server_url.startswith(("http://", "https://")):
        raise ConfigError("decode.engine=vllm needs decode.server_url, the server's API base such as "
                          f"http://127.0.0.1:8000/v1 (got {cfg.decode.server_url!r})")
    if cfg.decode.engine == "vllm" and cfg.decode.zero3:
        raise ConfigError("decode.zero3 shards an in-process model; with decode.engine=vllm the server holds the "
                          "model, so set decode.zero3=false")
    for key, value in [("loss.beta", cfg.loss.beta), ("optim.lr", cfg.optim.lr), ("data.max_length", cfg.data.max_length),
                       ("train.micro_batch_size", cfg.train.micro_batch_size), ("train.grad_accum", cfg.train.grad_accum),
                       ("loss.logprob_chunk_size", cfg.loss.logprob_chunk_size),
                       ("decode.max_new_tokens", cfg.decode.max_new_tokens), ("decode.batch_size", cfg.decode.batch_size),
                       ("decode.temperature", cfg.decode.temperature), ("decode.top_p", cfg.decode.top_p),
                       ("decode.concurrency", cfg.decode.concurrency),
                       ("decode.server_timeout_s", cfg.decode.server_timeout_s),
                       ("decode.server_backoff_s", cfg.decode.server_backoff_s),
                       ("blind.batches_per_shard", cfg.blind.batches_per_shard),
                       ("cache.shard_size", cfg.cache.shard_size), ("cache.batch_size", cfg.cache.batch_size),
                       ("lora.r", cfg.lora.r), ("lora.alpha", cfg.lora.alpha)]:
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for key, value in [("train.epochs", cfg.train.epochs), ("data.max_image_pixels", cfg.data.max_image_pixels)]:
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    for key, value in [("train.save_every", cfg.train.save_every), ("train.keep_checkpoints", cfg.train.keep_checkpoints),
                       ("optim.warmup_steps", cfg.optim.warmup_steps), ("loss.blind_weight", cfg.loss.blind_weight),
                       ("loss.sft_weight", cfg.loss.sft_weight), ("eval.limit", cfg.eval.limit),
                       ("loss.router_aux_coef", cfg.loss.router_aux_coef),
                       ("train.max_tokens_per_sequence", cfg.train.max_tokens_per_sequence),
                       ("decode.server_retries", cfg.decode.server_retries),
                       ("train.max_bad_steps", cfg.train.max_bad_steps)]:
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.train.max_steps != -1 and cfg.train.max_steps < 1:
        raise ConfigError(f"train.max_steps must be -1 (run all epochs) or at least 1, got {cfg.train.max_steps}")
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
    validate_judge(cfg.eval.judge)
    validate_build(cfg.build)


def validate_judge(j, key="eval.judge"):
    """The judge's values, for the type it is; what only building it can tell (the API key, the prompt file, the
    model directory) bpo.eval.judges checks."""
    if j.type == "openai":
        if not j.url.startswith(("http://", "https://")) or not j.model:
            raise ConfigError(f"an openai judge needs url (http:// or https://) and model; got url={j.url!r}, "
                              f"model={j.model!r}")
        if j.max_retries < 0 or j.timeout_s <= 0 or j.workers < 1 or j.max_tokens < 1:
            raise ConfigError(f"{key}: max_retries must be >= 0; timeout_s, workers and max_tokens must be positive")
    if j.type == "hf":
        if not j.path:
            raise ConfigError("an hf judge needs path (a local model directory)")
        if j.model_class not in ("auto", "image-text-to-text", "causal-lm"):
            raise ConfigError(f"{key}.model_class must be auto, image-text-to-text or causal-lm, got "
                              f"{j.model_class!r}")
        if j.dtype not in ("bf16", "fp16", "fp32") or j.max_new_tokens < 1:
            raise ConfigError(f"{key}: dtype must be bf16, fp16 or fp32 and max_new_tokens positive")
        if j.input not in ("prompt", "conversation"):
            raise ConfigError(f"{key}.input must be prompt or conversation, got {j.input!r}")
        if j.input == "conversation" and j.prompt_file:
            raise ConfigError(f"{key}.input=conversation sends the exchange through the guard model's own chat "
                              f"template; it reads no prompt_file (leave it empty)")


def validate_build(b):
    """The build section's values; what the build job needs set is `require_build`, which that job calls."""
    _choice(b.input_format, ("auto", "hh", "prompt", "pku"), "build.input_format")
    _choice(b.entity.backend, ("llm", "spacy", "given"), "build.entity.backend")
    _choice(b.image.backend, ("bank", "diffusers"), "build.image.backend")
    _choice(b.rewrite.backend, ("llm", "none"), "build.rewrite.backend")
    for key, value in [("build.batch_size", b.batch_size), ("build.batches_per_shard", b.batches_per_shard),
                       ("build.llm.max_attempts", b.llm.max_attempts), ("build.llm.workers", b.llm.workers),
                       ("build.llm.timeout_s", b.llm.timeout_s), ("build.entity.max_tokens", b.entity.max_tokens),
                       ("build.rewrite.max_tokens", b.rewrite.max_tokens),
                       ("build.image.diffusers_steps", b.image.diffusers_steps)]:
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if b.llm.max_retries < 0 or b.llm.backoff_s < 0 or b.llm.temperature < 0:
        raise ConfigError("build.llm.max_retries, backoff_s and temperature must be >= 0")
    if not 0 < b.image.min_similarity <= 1:
        raise ConfigError(f"build.image.min_similarity must be in (0, 1], got {b.image.min_similarity}")
    for kind, phrase in b.replace.phrases.items():
        if phrase is None:
            continue
        if not isinstance(phrase, str) or any(m in phrase for m in ("<image>", "USER:", "ASSISTANT:")):
            raise ConfigError(f"build.replace.phrases.{kind} must be a phrase of plain text (no <image>, USER: or "
                              f"ASSISTANT: marker), got {phrase!r}")
    if not any(b.replace.phrases.values()):
        raise ConfigError("build.replace.phrases leaves no entity type with a phrase")
    if "{entity}" not in b.image.diffusers_prompt:
        raise ConfigError(f"build.image.diffusers_prompt must contain {{entity}}, got {b.image.diffusers_prompt!r}")


def require_build(b):
    """What python -m bpo.build_data needs set, for the backends chosen (other jobs leave the section empty)."""
    for key in ("input_file", "output_file"):
        if not getattr(b, key):
            raise ConfigError(f"build.{key} is required (set it in the config file or pass build.{key}=...)")
    uses_llm = [f"build.{s}.backend=llm" for s in ("entity", "rewrite") if getattr(b, s).backend == "llm"]
    if uses_llm and (not b.llm.url.startswith(("http://", "https://")) or not b.llm.model):
        raise ConfigError(f"{' and '.join(uses_llm)} ask an OpenAI-compatible endpoint: set build.llm.url (its "
                          f"API base, e.g. http://127.0.0.1:8000/v1) and build.llm.model (got url={b.llm.url!r}, "
                          f"model={b.llm.model!r})")
    if b.entity.backend == "spacy" and not b.entity.spacy_model:
        raise ConfigError("build.entity.backend=spacy needs build.entity.spacy_model (an installed model's name or "
                          "directory, e.g. en_core_web_sm)")
    if b.image.backend == "bank" and not b.image.bank:
        raise ConfigError("build.image.backend=bank needs build.image.bank (a directory of images or an index file)")
    if b.image.backend == "diffusers" and not b.image.diffusers_model:
        raise ConfigError("build.image.backend=diffusers needs build.image.diffusers_model (a local pipeline "
                          "directory)")


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def to_yaml(cfg):
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# The keys holding paths that a run's saved config.yaml is read back for (export takes model.path from it).
PATH_KEYS = ("model.path", "data.train_file", "data.image_root", "train.output_dir", "train.ds_config",
             "train.ref_cache", "train.ref_model_path")


def with_absolute_paths(cfg):
    """A copy of cfg with PATH_KEYS made absolute (empty ones stay empty), so a saved config means the same files
    whatever directory it is read from."""
    out = copy.deepcopy(cfg)
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(out, section), name)
        if value:
            setattr(getattr(out, section), name, os.path.abspath(value))
    return out


def save_config(cfg, path):
    """Write config.yaml atomically so a killed start never leaves half a config behind."""
    write_text(path, to_yaml(cfg))


def require(cfg, *keys):
    """Fail early, naming the key, when a job needs a setting the defaults leave empty."""
    for key in keys:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node in ("", None):
            raise ConfigError(f"{key} is required (set it in the config file or pass {key}=...)")


def check_model_dir(path, key):
    """Fail early, naming the key, unless `path` is a local model directory. bpo never downloads; without this a
    wrong path reaches transformers, which reads it as a Hub repo id and fails with a raw HFValidationError."""
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{key} {path!r} is not a model directory (no config.json in it); set {key} to a local "
                          f"checkpoint directory")
