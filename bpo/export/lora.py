"""Export of a LoRA run's ZeRO-3 checkpoint (model.finetune=lora): a PEFT adapter directory, or full weights, adapters
folded in. Called by `bpo.export.job.export`; the command line is bpo.export's (`--merge` for the second).

The checkpoint holds the adapters as trained parameters (fp32 master copies, `...q_proj.lora_A.default.weight`) and
the base as frozen fragments under PEFT's names (`...q_proj.base_layer.weight`). The run keeps the PEFT config it
trained with in RUN_DIR/adapter_config.json, beside checkpoints/.

Adapter directory (what `PeftModel.save_pretrained` writes, so `PeftModel.from_pretrained(base, OUT_DIR)` loads it):
`adapter_config.json` with base_model_name_or_path set to the base model, and `adapter_model.safetensors` keyed
`base_model.model.<module>.lora_A.weight`, in the export dtype.

Merged (LoRA): every adapted layer's weight becomes W + (alpha / r) B A, computed in fp32 from the fp32 adapters
and the base fragment, one tensor at a time inside bpo.export's shard-by-shard writer, so the memory bound is the
same as a full export's; every other tensor is the base's, under its own name (`.base_layer` dropped).

Merged (QLoRA): the checkpoint's base fragments are 4-bit blocks whose quantization constants live only in the
training process, so they cannot be unpacked here. The adapters fold instead into the base checkpoint's own
model.dtype weights (--base-model, default the run's model.path), through transformers and PEFT
(`merge_and_unload`): the usual way to deploy QLoRA adapters, holding the whole model in host memory once.
"""

import json
import os

import torch

from bpo.export.hf_dir import ExportError, atomic_dir, copy_base_files, hf_name
from bpo.model.lora import CONFIG_FILE, adapter_key, base_name, is_adapter_param, merged_weight
from bpo.runtime.dtypes import torch_dtype

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_lora(ckpt):
    return any(is_adapter_param(n) for n in ckpt.names())


def run_adapter_config(ckpt_dir):
    """The PEFT config the run trained with: RUN_DIR/adapter_config.json, beside checkpoints/ (or above a tag)."""
    here = os.path.abspath(ckpt_dir.rstrip("/"))
    candidates = [os.path.join(os.path.dirname(here), CONFIG_FILE),
                  os.path.join(os.path.dirname(os.path.dirname(here)), CONFIG_FILE)]
    for path in candidates:
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    raise ExportError(f"{ckpt_dir} holds LoRA adapters but no {CONFIG_FILE} was found at {candidates[0]} (bpo's "
                      f"training writes it there at start); without it the adapters' alpha and targets are unknown")


def write_adapter_dir(ckpt, ckpt_dir, out_dir, target, base_model):
    from safetensors.torch import save_file

    config = dict(run_adapter_config(ckpt_dir), base_model_name_or_path=os.path.abspath(base_model),
                  inference_mode=True)
    tensors = {adapter_key(hf_name(n)): ckpt.tensor(n).to(target).contiguous()
               for n in ckpt.names() if is_adapter_param(n)}
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return out_dir


def merged_tensors(ckpt, ckpt_dir, base_model, out_dir, dtype):
    """{HF name: (shape, function)} of the merged model for bpo.export's writer; None when the base is 4-bit and the
    merge was done through PEFT instead (then out_dir is already written)."""
    config = run_adapter_config(ckpt_dir)
    if config.get("use_rslora") or config.get("use_dora"):
        raise ExportError("rsLoRA / DoRA adapters are not folded by bpo.export")  # bpo never trains them
    scale = config["lora_alpha"] / config["r"]
    adapted = {}  # checkpoint name of a base weight -> (its lora_A name, its lora_B name)
    for name in ckpt.names():
        if name.endswith(".lora_A.default.weight"):
            module = name[:-len(".lora_A.default.weight")]
            adapted[module + ".base_layer.weight"] = (name, module + ".lora_B.default.weight")
    for weight, (a, b) in adapted.items():
        expected = torch.Size([ckpt.shape(b)[0], ckpt.shape(a)[1]])
        if ckpt.shape(weight) != expected:  # Params4bit: packed blocks, shape (n, 1)
            merge_into_base(ckpt, ckpt_dir, base_model, out_dir, dtype)
            return None

    def merged(weight, a, b):
        return merged_weight(ckpt.tensor(weight).float(), ckpt.tensor(a).float(), ckpt.tensor(b).float(), scale)

    tensors = {}
    for name in ckpt.names():
        if is_adapter_param(name):
            continue
        if name in adapted:
            a, b = adapted[name]
            shape, fn = torch.Size([ckpt.shape(b)[0], ckpt.shape(a)[1]]), (lambda n=name, a=a, b=b: merged(n, a, b))
        else:
            shape, fn = ckpt.shape(name), (lambda n=name: ckpt.tensor(n))
        tensors[base_name(hf_name(name))] = (shape, fn)
    return tensors


def merge_into_base(ckpt, ckpt_dir, base_model, out_dir, dtype):
    """QLoRA: fold the adapters into the base checkpoint's model.dtype weights with transformers + PEFT."""
    import tempfile

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    with tempfile.TemporaryDirectory(prefix=".adapter-", dir=os.path.dirname(os.path.abspath(out_dir))) as adapter:
        write_adapter_dir(ckpt, ckpt_dir, os.path.join(adapter, "a"), torch.float32, base_model)
        model = AutoModelForImageTextToText.from_pretrained(base_model, dtype=torch_dtype(dtype), local_files_only=True)
        model = PeftModel.from_pretrained(model, os.path.join(adapter, "a")).merge_and_unload()
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp)
            copy_base_files(base_model, tmp, dtype)
