"""LoRA and QLoRA on ZeRO-3: which layers get adapters, the reference with adapters switched off, the 4-bit base.

model.finetune=lora freezes every weight of the model and adds LoRA adapters (PEFT) to each nn.Linear of the
parts that model.train_vision_tower / train_projector / train_language_model mark trained (the parts of
`bpo.model.parts.locate`: image encoder, connector, language model), so one rule covers every family whatever its
module names: Qwen2-VL's connector is `model.visual.merger`, Idefics3's language model `model.text_model`. The
output head is never adapted: the fused log-prob head reads `lm_head.weight` directly and would not see an adapter.
A part without an nn.Linear (Gemma-3's projector is a bare weight matrix) stays frozen and is reported so.

Adapters are injected in place (`peft.inject_adapter_in_model`), not through a PeftModel wrapper, so parameter
names stay the model's own with PEFT's infixes: `...q_proj.base_layer.weight` (frozen base) and
`...q_proj.lora_A.default.weight` (trained). Under ZeRO-3 the base is already partitioned when they are added; the
adapters are plain tensors that `deepspeed.initialize` partitions like any other parameter.

With adapters the base weights never change, so the reference model is the policy itself with its adapters
switched off (`adapters_disabled`): no second copy of the model and no cache are needed.

model.finetune=qlora loads the language model's Linear layers in 4-bit NF4 (bitsandbytes, double quantization,
compute and storage dtype = model.dtype, which lets ZeRO-3 partition the packed weights like any other tensor) and
keeps the image encoder, connector, embeddings and head in model.dtype. bpo runs it on CUDA only, where
bitsandbytes' 4-bit kernels are what QLoRA is built on; `require_platform` refuses it elsewhere (bitsandbytes' CPU
4-bit backend is not a platform bpo supports or tests).
"""

import contextlib
import json
import os
import re

import torch
from torch import nn

from bpo.model.parts import LANGUAGE_MODELS, PARTS, locate, wanted_parts
from bpo.runtime.atomic import write_text
from bpo.runtime.dtypes import torch_dtype

# What QLoRA does to the base, in words: part of a reference cache's fingerprint (bpo.ref_cache.store).
QUANTIZATION = "bitsandbytes 4-bit nf4, double quantization, on the language model's Linear layers (not lm_head)"
ADAPTER = "default"  # PEFT's adapter name; it appears in parameter names and is dropped in saved adapter files
FINETUNE_ADAPTERS = ("lora", "qlora")


class PlatformError(RuntimeError):
    pass


def uses_adapters(model_cfg):
    return model_cfg.finetune in FINETUNE_ADAPTERS


def require_platform(model_cfg):
    """What runs on CUDA only, said before any weights are read: QLoRA, and FlexAttention."""
    if model_cfg.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise PlatformError(
            "model.attn_implementation=flex_attention needs a CUDA GPU: PyTorch's FlexAttention has no backward pass "
            "on CPU, and its compiled CPU kernel (torch 2.14) fails to build for the shared-prompt mask. Use "
            "model.attn_implementation=sdpa here: the same shared-prompt masks, dense.")
    if model_cfg.finetune == "qlora" and not torch.cuda.is_available():
        raise PlatformError(
            "model.finetune=qlora needs a CUDA GPU: bpo loads the 4-bit base with bitsandbytes' CUDA kernels and "
            "trains it on CUDA only, and this machine has no CUDA device. Use model.finetune=lora here (the same "
            "adapters on a base in model.dtype).")


def target_modules(model, model_cfg):
    """{part: [module path of each nn.Linear that gets an adapter]}, parts not trained mapping to []."""
    wanted = wanted_parts(model_cfg)
    head = model.get_output_embeddings()
    targets = {part: [] for part in PARTS}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            part = locate(name + ".weight")[0]
            if wanted[part]:
                targets[part].append(name)
    return targets


def peft_config(lora_cfg, targets, base_model_path=""):
    """The peft.LoraConfig for these targets: exact module paths (PEFT may shorten a long list to the suffixes that
    select the same modules), no bias training, no extra trained modules."""
    from peft import LoraConfig

    return LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout, bias="none",
                      target_modules=sorted(targets), base_model_name_or_path=base_model_path or None)


def add_adapters(model, model_cfg, lora_cfg):
    """Freeze the model and add LoRA adapters by part; returns (peft config, {part: (adapted, adapter parameters,
    adapted layers, base parameters)})."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    targets = target_modules(model, model_cfg)
    flat = [name for names in targets.values() for name in names]
    if not flat:
        raise ValueError(f"{type(model).__name__}: the parts marked trained hold no nn.Linear layer to adapt")
    config = peft_config(lora_cfg, flat, model_cfg.path)
    base = {part: 0 for part in PARTS}
    for name, p in model.named_parameters():
        base[locate(name)[0]] += getattr(p, "ds_numel", p.numel())
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    adapters = {part: 0 for part in PARTS}
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            if not p.requires_grad:
                raise RuntimeError(f"PEFT left adapter parameter {name} frozen")
            adapters[locate(name)[0]] += p.numel()
        elif p.requires_grad:
            raise RuntimeError(f"PEFT left base parameter {name} trainable")
    parts = {part: (bool(targets[part]), adapters[part], len(targets[part]), base[part]) for part in PARTS}
    return config, parts


CONFIG_FILE = "adapter_config.json"  # PEFT's name; a run keeps its own beside checkpoints/ for bpo.export


def config_dict(config):
    """A peft.LoraConfig as the JSON object PEFT writes to adapter_config.json."""
    out = {}
    for key, value in config.to_dict().items():
        out[key] = sorted(value) if isinstance(value, set) else (str(value.value) if hasattr(value, "value")
                                                                 else value)
    return out


def save_config(config, directory):
    """Write DIRECTORY/adapter_config.json atomically."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CONFIG_FILE)
    write_text(path, json.dumps(config_dict(config), indent=2, sort_keys=True))
    return path


def describe(parts, model_cfg, lora_cfg):
    """Lines for the start-up log: what each part trains."""
    wanted = wanted_parts(model_cfg)
    lines = [f"LoRA r={lora_cfg.r} alpha={lora_cfg.alpha:g} (scale {lora_cfg.alpha / lora_cfg.r:g}) "
             f"dropout={lora_cfg.dropout:g}, base {'4-bit NF4 (QLoRA)' if model_cfg.finetune == 'qlora' else 'frozen'}"
             f"; reference = the same weights with adapters off unless train.ref_cache / train.ref_model_path"]
    for part, (adapted, count, layers, base) in parts.items():
        if adapted:
            state = f"lora     {count:>13,} adapter parameters on {layers} Linear layers"
        elif wanted[part]:
            state = "frozen   (asked for, but it has no nn.Linear layer to adapt)"
        else:
            state = "frozen"
        lines.append(f"  {part:<15} {state}  (base {base / 1e6:.3f}M frozen)")
    return "\n".join(lines)


def is_adapter_param(name):
    return ".lora_A." in name or ".lora_B." in name


@contextlib.contextmanager
def adapters_disabled(model):
    """Run the model as its base: every LoRA layer computes base_layer(x) alone.

    PEFT's switch also clears the adapters' requires_grad; switching back restores it. Only the flag changes, the
    tensors stay the same objects, so the gradient hooks ZeRO-3 put on them stay in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise RuntimeError("adapters_disabled: the model has no adapter layers")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def adapter_key(name):
    """Parameter name in the model (`...q_proj.lora_A.default.weight`) -> key in a PEFT adapter file
    (`base_model.model....q_proj.lora_A.weight`), as `PeftModel.save_pretrained` writes it."""
    return "base_model.model." + name.replace(f".{ADAPTER}.", ".")


def base_name(name):
    """`...q_proj.base_layer.weight` -> `...q_proj.weight`: the name the model has without adapters."""
    return name.replace(".base_layer.", ".")


def merged_weight(weight, lora_a, lora_b, scale):
    """W + scale B A: the weight of a Linear whose adapter is folded in. (out, in) + (out, r) @ (r, in)."""
    return weight + scale * (lora_b.double() @ lora_a.double()).to(weight.dtype)


def quantization_config(model_cfg):
    """bitsandbytes 4-bit for the language model's Linear layers only; every other module stays in model.dtype.

    transformers leaves a module unquantized when a pattern matches its name from the start: here anything under
    `model.` that is not the language model (image encoder, connector), and the output head."""
    from transformers import BitsAndBytesConfig

    dtype = torch_dtype(model_cfg.dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype,
                              llm_int8_skip_modules=unquantized_patterns())


def unquantized_patterns():
    language = "|".join(re.escape(m) for m in LANGUAGE_MODELS)
    return [rf"model\.(?!(?:{language})(?:\.|$))[^.]+", "lm_head"]
