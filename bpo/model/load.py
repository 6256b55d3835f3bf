"""Loading a vision-language model offline from a local directory, ZeRO-3-partitioned or whole, and the start-up lines
that describe it. Part naming and freezing: bpo.model.parts; scoring: bpo.model.scorer."""

import contextlib
import importlib
import os

import torch

from bpo.model import moe
from bpo.model.lora import quantization_config, require_platform
from bpo.runtime import dist
from bpo.runtime.dtypes import torch_dtype


def resolve_attn_implementation(requested, cuda=None):
    """model.attn_implementation -> what the model is built with. `auto` is a kernel that takes the shared-prompt
    layout's masks (loss.scoring=shared, the default), so the path a user starts is the path the tests score:
    flex_attention on CUDA (block masks, the (L, L) mask never built), sdpa elsewhere (FlexAttention has no CPU
    backward). flash_attention_2 is never chosen by `auto`: it takes no custom mask (issue 22)."""
    if requested != "auto":
        return requested
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "flex_attention" if cuda else "sdpa"


def load_model(model_cfg, path=None, ds_config=None, quantize=False):
    """Load an image-text-to-text model offline from a directory.

    With a ZeRO-3 `ds_config` the model is built partitioned: the `HfDeepSpeedConfig` object must be alive while
    `from_pretrained` runs, which makes transformers construct under `deepspeed.zero.Init` and load each weight
    straight into its shard instead of materialising the whole model on every rank.

    `quantize` (QLoRA, `bpo.model.lora.quantization_config`): the language model's Linear layers load in 4-bit.
    transformers never builds a quantized model under `zero.Init`: every rank holds the whole 4-bit model on its GPU
    until `deepspeed.initialize` partitions it.
    """
    from transformers import AutoModelForImageTextToText

    path = path or model_cfg.path
    if not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"{path!r} is a LoRA adapter directory (PEFT), not a model: export the run with "
                                    f"`python -m bpo.export RUN/checkpoints OUT --merge` (or train with "
                                    f"lora.export=merged) for a directory that loads on its own")
        raise FileNotFoundError(f"model directory {path!r} has no config.json; set model.path to a local checkpoint")
    keep_alive = None
    layouts = contextlib.nullcontext()
    if is_zero3(ds_config):
        from transformers.integrations import HfDeepSpeedConfig

        import_model_classes(path, model_cfg.trust_remote_code)
        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (its existence is the point)
        layouts = full_shapes_for_weight_conversions()
    require_platform(model_cfg)  # QLoRA and FlexAttention need CUDA: every job's models load here
    extra = {"quantization_config": quantization_config(model_cfg)} if quantize else {}
    with layouts:
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=torch_dtype(model_cfg.dtype),
            attn_implementation=resolve_attn_implementation(model_cfg.attn_implementation),
            trust_remote_code=model_cfg.trust_remote_code,
            local_files_only=True,
            **extra,
        )
    del keep_alive
    if is_zero3(ds_config):
        moe.set_leaf_modules(model, model_cfg.z3_leaf_modules)
    return model


@contextlib.contextmanager
def full_shapes_for_weight_conversions():
    """While a ZeRO-3 from_pretrained runs: transformers' checkpoint conversions see each parameter's full shape.

    Why: transformers 5 converts some checkpoints at load time (`conversion_mapping.py`). Qwen3-VL-MoE's fused experts
    are stored (E, H, 2I) on the Hub and (E, 2I, H) in the model, so its converter is
    `Transpose(1, 2, check_dims=True)`: transpose unless the tensor already has the parameter's shape, which is the
    case for a checkpoint saved by transformers 5 itself or exported by bpo (model layout). The check reads
    `model.get_parameter(name).shape`; under `zero.Init` that is the partitioned placeholder, shape (0,), never
    equal, so the ZeRO-3 load path (`integrations.deepspeed._apply_weight_conversions_to_state_dict`) transposed
    model-layout tensors too and failed: "size mismatch for ...experts.gate_up_proj: [4, 32, 64] from checkpoint,
    [4, 64, 32] in current model". Any conversion op that reads a parameter's shape (Transpose, the splitting ops)
    had the same blind spot. Here, for the duration of that function, `get_parameter` answers a partitioned
    parameter with a meta tensor of its full shape (`ds_shape`) and dtype; nothing else changes.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    original = hf_deepspeed._apply_weight_conversions_to_state_dict

    def with_full_shapes(model, state_dict, weight_mapping):
        partitioned_lookup = model.get_parameter

        def get_parameter(target):
            param = partitioned_lookup(target)
            if hasattr(param, "ds_shape"):
                return torch.empty(param.ds_shape, dtype=param.dtype, device="meta")
            return param

        model.get_parameter = get_parameter  # an instance attribute, shadowing the method until deleted
        try:
            yield from original(model, state_dict, weight_mapping)
        finally:
            del model.get_parameter

    hf_deepspeed._apply_weight_conversions_to_state_dict = with_full_shapes
    try:
        yield
    finally:
        hf_deepspeed._apply_weight_conversions_to_state_dict = original


def import_model_classes(path, trust_remote_code):
    """Import the modeling module of the checkpoint's config and of each of its sub-configs (text, vision, ...),
    before `zero.Init` is entered.

    Why: `zero.Init` wraps the `__init__` of every nn.Module class, including classes *defined* while it is active,
    and on exit puts back the `__init__` it saw when the class was created. A decorator applied after class creation
    is then lost. transformers >= 5.2x decorates its attention classes with `kernels`' `use_kernelized_func`, whose
    `__init__` sets `_kernel_funcs` and whose forward reads it; a language model imported lazily inside the first
    `from_pretrained` under ZeRO-3 (LLaVA builds its text model with AutoModel.from_config) had that `__init__`
    dropped, so the second model built in the process (the live reference) crashed at its first forward with
    "'LlamaAttention' object has no attribute '_kernel_funcs'". Classes imported here are complete before
    `zero.Init` wraps them, and its exit restores them intact.
    """
    from transformers import AutoConfig, PretrainedConfig

    pending = [AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)]
    while pending:
        config = pending.pop()
        module = type(config).__module__
        if ".configuration_" in module:
            try:
                importlib.import_module(module.replace(".configuration_", ".modeling_"))
            except ImportError:
                pass  # a config without a modeling module of the same name (remote code): built as before
        pending += [v for v in vars(config).values() if isinstance(v, PretrainedConfig)]


def text_hidden_size(model_cfg):
    """The language model's hidden size, from the checkpoint's config.json alone (no weights read)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code,
                                        local_files_only=True)
    return config.get_text_config().hidden_size


def is_zero3(ds_config):
    return ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3


def describe(model, parts, attn):
    """The start-up lines: model class, size, attention, and what each part trains (`parts`:
    bpo.model.parts.set_trainable)."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    dist.print0(f"model: {type(model).__name__}, {total / 1e6:.2f}M parameters, attention={attn}")
    for part, (train, count, modules) in (parts or {}).items():
        dist.print0(f"  {part:<15} {'trained' if train else 'frozen':<8} {count / 1e6:9.3f}M  {', '.join(modules)}")
