"""DeepSpeed configs: JSON files in ds_configs/, completed from the one config tree.

A ds_config entry that bpo's config also decides (batch sizes, accumulation, clipping, the optimizer's lr / betas / eps
/ weight decay, bf16 / fp16) is either "auto", filled from the config, or equal to the config's value: a literal that
disagrees stops the job naming the file, the entry, the config key and both values, so a run never trains with a
number its config.yaml does not show. Entries bpo's config does not decide (ZeRO settings, sub-group sizes) are the
file's own.

    train (bpo.train.build_ds_config)        train.ds_config, e.g. ds_configs/zero3.json
    ZeRO-3 inference (bpo.engines.hf with decode.zero3, bpo.ref_logprobs)   ds_configs/zero3_inference.json
"""

import json
import os

from bpo.config import ConfigError

DS_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "ds_configs")
INFERENCE = os.path.join(DS_CONFIGS, "zero3_inference.json")


def read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read DeepSpeed config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None


def _same(literal, value):
    if isinstance(value, (list, tuple)):
        return isinstance(literal, (list, tuple)) and len(literal) == len(value) and all(
            _same(a, b) for a, b in zip(literal, value))
    if isinstance(value, bool) or isinstance(literal, bool):
        return literal is value
    if isinstance(literal, (int, float)) and isinstance(value, (int, float)):
        return float(literal) == float(value)  # JSON's 1e-6 and YAML's 1.0e-6 are one number
    return literal == value


def fill(section, key, value, path, entry, config_key, shown=None):
    """section[key] = value where the file leaves it out or says "auto"; a literal equal to `value` stays, one that
    differs raises ConfigError naming `path`'s `entry` and `config_key` with both values (`shown`: the config's value
    as the user wrote it, where `value` is derived from it)."""
    literal = section.get(key, "auto")
    if literal == "auto":
        section[key] = value
    elif not _same(literal, value):
        raise ConfigError(f"{path}: {entry} is {literal!r} but {config_key} is {value if shown is None else shown!r}; "
                          f"the config decides it: set {entry} to \"auto\" in the file (or make the two agree)")


def fill_dtype(ds, dtype, path):
    """bf16.enabled / fp16.enabled from model.dtype."""
    for name in ("bf16", "fp16"):
        fill(ds.setdefault(name, {}), "enabled", dtype == name, path, f"{name}.enabled", "model.dtype", shown=dtype)


def inference_config(model_cfg):
    """The ZeRO-3 inference config (generation with decode.zero3, the reference-cache scorer): INFERENCE with its
    dtype entries filled from model.dtype."""
    ds = read(INFERENCE)
    fill_dtype(ds, model_cfg.dtype, INFERENCE)
    return ds
