"""The parts of an image-text-to-text model (image encoder, connector, language model): which part each parameter
belongs to, and freezing or training each by config. LoRA (bpo.model.lora) chooses its target layers by the same
rule."""

# What each part of an image-text-to-text model is called under its base model (`model.model` in transformers 5), or
# at the top level for classes without one (Llama-4: `vision_model`, `multi_modal_projector` and a whole
# `language_model` ForCausalLM beside each other): the image encoder, the language model, and everything else between
# them (the connector: multi_modal_projector, Idefics3's connector, LLaVA-NeXT's image_newline, Gemma-4's
# embed_vision). Qwen2-VL, Qwen2.5-VL and Qwen3-VL keep their connector (`merger`, and Qwen3-VL's
# `deepstack_merger_list`) inside the image encoder module.
VISION_ENCODERS = ("vision_tower", "visual", "vision_model")
LANGUAGE_MODELS = ("language_model", "text_model")
CONNECTORS_IN_VISION = ("merger", "deepstack_merger_list")
OUTPUT_HEADS = ("lm_head",)
PARTS = ("vision_encoder", "connector", "language_model")


def part_of(param_name):
    """"vision_encoder", "connector" or "language_model" for a parameter name of the full model."""
    return locate(param_name)[0]


def locate(param_name):
    """(part, the module path that decides it), e.g. ("connector", "model.visual.merger")."""
    path = param_name.split(".")
    if path[0] in OUTPUT_HEADS:
        return "language_model", path[0]
    depth = 1 if path[0] == "model" else 0  # under the base model, or at the top level (Llama-4)
    name = path[depth]
    if name in LANGUAGE_MODELS:
        return "language_model", ".".join(path[:depth + 1])
    if name in VISION_ENCODERS:
        if len(path) > depth + 1 and path[depth + 1] in CONNECTORS_IN_VISION:
            return "connector", ".".join(path[:depth + 2])
        return "vision_encoder", ".".join(path[:depth + 1])
    return "connector", ".".join(path[:depth + 1])


def wanted_parts(model_cfg):
    """{part: whether the config trains it} (model.train_vision_tower, train_projector, train_language_model)."""
    return {"vision_encoder": model_cfg.train_vision_tower, "connector": model_cfg.train_projector,
            "language_model": model_cfg.train_language_model}


def set_trainable(model, model_cfg):
    """Freeze or train each part by config; returns {part: (trained?, parameter count, module paths)}."""
    wanted = wanted_parts(model_cfg)
    parts = {part: (wanted[part], 0, []) for part in PARTS}
    for name, p in model.named_parameters():
        part, module = locate(name)
        p.requires_grad_(wanted[part])
        train, count, modules = parts[part]
        parts[part] = (train, count + getattr(p, "ds_numel", p.numel()),
                       modules if module in modules else modules + [module])
    if not parts["vision_encoder"][1] or not parts["language_model"][1]:
        raise ValueError(f"{type(model).__name__}: cannot tell its image encoder from its language model (looked for "
                         f"[model.]{{{','.join(VISION_ENCODERS)}}} and [model.]{{{','.join(LANGUAGE_MODELS)}}}); "
                         f"extend bpo/model/parts.py's part names for this family")
    return parts


def set_gradient_checkpointing(model, model_cfg):
    """Recompute each decoder layer in backward when model.gradient_checkpointing (non-reentrant: it needs no input
    that requires grad, which a frozen LoRA base would not give it)."""
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
