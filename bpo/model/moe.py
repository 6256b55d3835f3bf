"""Mixture-of-experts support: ZeRO-3 leaf modules for module-per-expert blocks, and the router's auxiliary loss.

transformers 5's own MoE classes (Qwen3-VL-MoE, Llama-4, Gemma-4) hold every expert of a layer in fused (E, ., .)
tensors, so every rank gathers the same parameters however its tokens are routed. Remote-code models often keep one
nn.Module per expert and call it only for the tokens routed to it: under ZeRO-3, ranks routing differently would
gather different modules, and the collectives would desynchronise (a mismatch on gloo, a hang on NCCL). DeepSpeed's
remedy is to mark the whole MoE block a leaf module (`deepspeed.utils.set_z3_leaf_modules`): its parameters are
gathered together when the block starts, whichever experts run.
"""

import sys

from torch import nn

from bpo.runtime import dist


def leaf_module_classes(model, names=()):
    """The class names of `model`'s modules that ZeRO-3 should gather as one unit: those named (model.z3_leaf_modules,
    each must occur in the model) and every module holding an `experts` nn.ModuleList, the module-per-expert MoE
    layout (one nn.Module per expert, called only for the tokens routed to it)."""
    present = {type(m).__name__ for m in model.modules()}
    unknown = sorted(set(names) - present)
    if unknown:
        moe_like = sorted(n for n in present if "moe" in n.lower() or "expert" in n.lower())
        raise ValueError(f"model.z3_leaf_modules names {unknown}, which {type(model).__name__} has no module of; "
                         f"its MoE-looking classes: {moe_like}")
    found = {type(m).__name__ for m in model.modules() if isinstance(getattr(m, "experts", None), nn.ModuleList)}
    return sorted(set(names) | found)


def set_leaf_modules(model, names=()):
    """Mark the classes of `leaf_module_classes` as ZeRO-3 leaf modules (deepspeed.utils.set_z3_leaf_modules): their
    parameters are fetched all together when the block's forward starts, whichever experts its tokens reach, so every
    rank runs the same gathers in the same order. Returns the class names (empty: nothing set)."""
    classes = leaf_module_classes(model, names)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules  # heavy; only ZeRO-3 loads (which have it) get here

        modules = set_z3_leaf_modules(model, classes)
        dist.print0(f"ZeRO-3 leaf modules: {', '.join(classes)} ({len(modules)} modules gathered whole)")
    return classes


def router_aux_loss_function(model):
    """fn(router_logits, attention_mask) -> the model's own auxiliary load-balancing loss: `load_balancing_loss_func`
    of its modeling module (Switch Transformer eqs. 4-6, as transformers adds it in the model's forward when labels
    are given), with its config's expert count and top-k."""
    loss_fn = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
    text = model.config.get_text_config()
    experts = next((getattr(text, k) for k in ("num_experts", "num_local_experts") if getattr(text, k, None)), None)
    top_k = next((getattr(text, k) for k in ("num_experts_per_tok", "top_k_experts") if getattr(text, k, None)), None)
    if loss_fn is None or experts is None or top_k is None:
        raise ValueError(f"loss.router_aux_coef > 0, but {type(model).__name__} has no auxiliary router loss in "
                         f"transformers (no load_balancing_loss_func in {type(model).__module__}, or no expert count "
                         f"and top-k in its config); set loss.router_aux_coef=0")
    return lambda router_logits, attention_mask: loss_fn(router_logits, experts, top_k, attention_mask)
