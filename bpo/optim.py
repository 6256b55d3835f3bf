"""The optimizer DeepSpeed steps over this rank's ZeRO partition, chosen by optim.name.

- `adamw`: the ds_config's own `optimizer` section (DeepSpeed's AdamW: FusedAdam on CUDA, torch's AdamW where the
  config says `torch_adam`, as ds_configs/zero3_cpu.json does). State per trained parameter: fp32 master weight,
  m and v, 12 bytes.
- `adamw_8bit`: bitsandbytes' AdamW8bit. m and v are kept in 8 bits, blockwise quantized (one fp32 scale per 256
  values), so 4 + 2 bytes per trained parameter instead of 12. It runs on CUDA and on CPU tensors alike.
- `paged_adamw_8bit`: the same states allocated in CUDA unified memory, which the driver moves to host memory when
  the GPU runs short instead of failing with out-of-memory (bitsandbytes pages only tensors of 1e5 elements or
  more). On CPU bitsandbytes has nothing to page and runs it as adamw_8bit, with a warning.

A bitsandbytes optimizer is handed to `deepspeed.initialize` as a client optimizer: ZeRO-3 replaces its parameter
list by the rank's flat fp32 partitions and steps it after clipping, the scheduler drives its learning rate, and its
state (the uint8 moments and their scales) is saved in and restored from every checkpoint like DeepSpeed's own.
"""

import torch

from bpo.config import ConfigError

BITSANDBYTES = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}
STATE_KEYS = ("state1", "state2")  # bitsandbytes' names for Adam's m and v


def is_client(optim_cfg):
    return optim_cfg.name in BITSANDBYTES


def adapt_ds_config(ds, optim_cfg, ds_config_path):
    """The DeepSpeed config for this optimizer: a client optimizer replaces the file's `optimizer` section (DeepSpeed
    would build that one instead) and needs `zero_allow_untested_optimizer`. Returns a new dict."""
    if not is_client(optim_cfg):
        return ds
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    if offload.get("device", "none") not in ("none", None):
        raise ConfigError(
            f"optim.name={optim_cfg.name} keeps 8-bit optimizer states on the device, but {ds_config_path} offloads "
            f"the optimizer to {offload['device']} (where DeepSpeed steps its own CPU Adam); use optim.name=adamw "
            f"with that config, or a config without offload_optimizer")
    ds = {k: v for k, v in ds.items() if k != "optimizer"}
    ds["zero_allow_untested_optimizer"] = True
    return ds


def build_optimizer(params, optim_cfg):
    """The client optimizer over `params`, or None when DeepSpeed builds its own from the ds_config."""
    if not is_client(optim_cfg):
        return None
    import bitsandbytes as bnb

    cls = getattr(bnb.optim, BITSANDBYTES[optim_cfg.name])
    return cls(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
               weight_decay=optim_cfg.weight_decay)


def describe(optim_cfg, ds):
    if not is_client(optim_cfg):
        section = ds.get("optimizer", {})
        return f"optimizer: {section.get('type', '?')} from the ds_config (DeepSpeed's), fp32 moments"
    import bitsandbytes as bnb

    where = "CUDA" if torch.cuda.is_available() else "CPU"
    text = (f"optimizer: bitsandbytes {BITSANDBYTES[optim_cfg.name]} {bnb.__version__} (client optimizer over the "
            f"ZeRO partitions; the ds_config's optimizer section is not used), 8-bit moments on {where}")
    if optim_cfg.name.startswith("paged_") and where == "CPU":
        text += "; paging needs CUDA, so bitsandbytes runs it unpaged here (= adamw_8bit)"
    return text


def repage_states(optimizer):
    """Move a paged optimizer's restored moments back into paged memory.

    bitsandbytes' `load_state_dict` copies every saved state tensor to the parameter's device as an ordinary
    tensor, so after a resume a paged optimizer would silently hold its states in plain GPU memory, the lever
    gone. Each one is copied into a fresh buffer from the optimizer's own allocator, which pages those it would have
    paged at the first step. A no-op for unpaged optimizers and on CPU. Returns how many tensors were moved."""
    if not getattr(optimizer, "is_paged", False):
        return 0
    moved = 0
    for p, state in optimizer.state.items():
        for key in STATE_KEYS:
            value = state.get(key)
            if not torch.is_tensor(value) or getattr(value, "is_paged", False) or p.device.type != "cuda":
                continue
            buffer = optimizer.get_state_buffer(p, dtype=value.dtype)
            if getattr(buffer, "is_paged", False):
                buffer.copy_(value.view(buffer.shape))
                state[key] = buffer
                moved += 1
    return moved


def share_fp32_master(zero_optimizer):
    """Let fp32 weights be their own fp32 master copy in a ZeRO-3 optimizer. Returns the bytes freed.

    DeepSpeed means to do this itself: stage3.py `_create_fp32_partitions` reuses a flat weight partition as the
    master when its dtype and device already match, but it compares `tensor.device` (a torch.device) with its own
    device name (a str), which are never equal, so an fp32 model keeps a second fp32 copy: 4 more bytes per trained
    parameter (DeepSpeed 0.19). Each master is pointed at the partition it copies by swapping its storage, so it stays
    the same tensor object that the optimizer's param groups and state are keyed by; after a step DeepSpeed copies
    the master into the partition, which is then a copy onto itself. bf16 and fp16 weights (a real, separate fp32
    master) and offloaded optimizers are left alone."""
    weights = getattr(zero_optimizer, "fp16_partitioned_groups_flat", None)
    masters = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    if weights is None or masters is None or getattr(zero_optimizer, "offload_optimizer", False):
        return 0
    freed = 0
    for weight, master in zip(weights, masters):
        if (weight is None or weight.dtype != master.dtype or weight.device != master.device
                or weight.shape != master.shape or weight.data_ptr() == master.data_ptr()):
            continue
        freed += master.numel() * master.element_size()
        master.data = weight.data
    return freed


def state_bytes(optimizer_state_dict):
    """Bytes of every tensor in a (bitsandbytes or torch) optimizer state dict: the moments and their scales."""

    def walk(value):
        if torch.is_tensor(value):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    return walk(optimizer_state_dict.get("state", {}))
