"""The one table from a config's dtype name (model.dtype, judge.dtype, `python -m bpo.export --dtype`) to torch's."""

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(name):
    """torch dtype of a config name; a ValueError naming the allowed names for any other."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}") from None
