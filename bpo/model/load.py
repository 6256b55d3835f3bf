"""Loading a vision-language model from a local directory and scoring responses with it.

`SequenceScorer` wraps the Hugging Face model so that one forward returns per-token log-probs of the labels, computed
from the final hidden states by the log-prob head in `bpo.ops`: the (R, T, V) logits tensor of the stock forward is
never built on the fused path.
"""

import contextlib
import inspect
import os

import torch
from torch import nn

from bpo.runtime import dist
from bpo.model import moe
from bpo.data import shared
from bpo.ops.logit_transform import LogitTransform
from bpo.ops.logprobs import DEFAULT_CHUNK_SIZE, naive_sequence_logprobs, resolve_impl, sequence_logprobs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

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
MASKED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")  # config.layer_types values
PARTS = ("vision_encoder", "connector", "language_model")


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

    `quantize` (QLoRA, `bpo.model.lora.quantization_config`): the language model's Linear layers load in 4-bit. transformers
    never builds a quantized model under `zero.Init`: every rank holds the whole 4-bit model on its GPU until
    `deepspeed.initialize` partitions it.
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
    from bpo.model.lora import quantization_config, require_platform

    require_platform(model_cfg)  # QLoRA and FlexAttention need CUDA: every job's models load here
    extra = {"quantization_config": quantization_config(model_cfg)} if quantize else {}
    with layouts:
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=DTYPES[model_cfg.dtype],
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
    import importlib

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


def part_of(param_name):
    """"vision_encoder", "connector" or "language_model" for a parameter name of the full model."""
    return _locate(param_name)[0]


def _locate(param_name):
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


def set_trainable(model, model_cfg):
    """Freeze or train each part by config; returns {part: (trained?, parameter count, module paths)}."""
    wanted = {"vision_encoder": model_cfg.train_vision_tower, "connector": model_cfg.train_projector,
              "language_model": model_cfg.train_language_model}
    parts = {part: (wanted[part], 0, []) for part in PARTS}
    for name, p in model.named_parameters():
        part, module = _locate(name)
        p.requires_grad_(wanted[part])
        train, count, modules = parts[part]
        parts[part] = (train, count + getattr(p, "ds_numel", p.numel()),
                       modules if module in modules else modules + [module])
    if not parts["vision_encoder"][1] or not parts["language_model"][1]:
        raise ValueError(f"{type(model).__name__}: cannot tell its image encoder from its language model (looked for "
                         f"[model.]{{{','.join(VISION_ENCODERS)}}} and [model.]{{{','.join(LANGUAGE_MODELS)}}}); "
                         f"extend bpo/model/load.py's part names for this family")
    return parts


def set_gradient_checkpointing(model, model_cfg):
    """Recompute each decoder layer in backward when model.gradient_checkpointing (non-reentrant: it needs no input
    that requires grad, which a frozen LoRA base would not give it)."""
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False


def base_forward(model):
    """The callable that runs an image-text-to-text model up to its language model's last hidden states (no lm_head):
    its base model (`model.model`), or `TowersForward` for a class without one (Llama-4)."""
    base = getattr(model, "model", None)
    if isinstance(base, nn.Module):
        return base
    if isinstance(getattr(getattr(model, "language_model", None), "model", None), nn.Module):
        return TowersForward(model)
    raise ValueError(f"{type(model).__name__}: found no base model (`model.model`) nor a `language_model` with its own "
                     f"base; extend bpo.model.load.base_forward for this family")


class TowersForward:
    """The base-model forward of Llama-4's layout, which has none: Llama4ForConditionalGeneration holds its image
    encoder, projector and a whole Llama4ForCausalLM side by side, and its forward ends with that model's lm_head.

    This runs what that forward runs before the lm_head, with the model's own pieces: the token embeddings, the image
    features (`get_image_features`: encoder + projector) scattered into the image placeholders
    (`get_placeholder_mask`), then the language model's own base model. Its output is that base model's
    (last_hidden_state, router_logits when asked). A plain object, not an nn.Module, so that the model's parameters
    are not registered a second time under the scorer.
    """

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids, attention_mask=None, position_ids=None, pixel_values=None, use_cache=False,
                 **kwargs):
        model = self.model
        embeds = model.get_input_embeddings()(input_ids)  # (S, L, H)
        if pixel_values is not None:
            features = model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
            features = features.reshape(-1, features.size(-1)).to(embeds.dtype)  # (image tokens, H)
            mask = model.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=features)
            embeds = embeds.masked_scatter(mask, features)
        return model.language_model.model(inputs_embeds=embeds, attention_mask=attention_mask,
                                          position_ids=position_ids, use_cache=use_cache, **kwargs)


class SequenceScorer(nn.Module):
    """forward(input_ids, attention_mask, labels, **processor_outputs) -> per-token log-probs of the labels.

    Returns (R, M) float32 log-probs of labels[:, 1:], exactly 0 where the label is -100 (prompt, image tokens,
    padding). Two batch layouts are scored alike:
    - rows (`bpo.data.dataset.collate`): R padded rows of prompt + response, M = T - 1; position t predicts t + 1;
    - shared (`bpo.data.shared.collate_shared`): each prompt once with its responses after it, one attention mask
      per sequence that keeps responses apart, positions as if each response stood alone after its prompt (3-D
      rotary positions for families with `get_rope_index`), and `predictor_index` naming the hidden state that
      predicts each response token.
    The base model (`model.model` in transformers 5 image-text-to-text classes; `TowersForward` for Llama-4, which
    has none) produces hidden states; the lm_head weight is applied by `bpo.ops.logprobs`. Of the processor outputs,
    those the base model's forward names are passed (per-token fields such as token_type_ids included); floating ones
    in the model's dtype (Llama-4's image processor returns bf16 pixel_values whatever the model's dtype).

    ZeRO-3: lm_head.weight is partitioned and has numel 0 outside lm_head's own forward, which we never call. We
    register it as an external parameter of this wrapper, so DeepSpeed gathers it for this module's forward and again
    for its backward, and reduces its gradient like any other. Gathering by hand with `GatheredParameters` would
    not do: the weight is saved for backward and would be re-partitioned to an empty tensor before backward runs.

    ZeRO-3 also needs every rank to run the same modules in the same order: a rank whose micro-batch holds no image
    would skip the image encoder's gathers while the others run them, and the collectives would desynchronise (a
    mismatch on gloo, a hang on NCCL). Given `blank` (`bpo.data.encode.blank_image_example`), such a batch gets one
    extra row, a blank image with its prompt, that runs through the model's own forward; its hidden states join the
    result multiplied by zero, so every part also takes part in backward, with zero gradient.

    `router_aux`: also ask the model for its router logits and keep its auxiliary load-balancing loss of this forward
    in `self.router_aux_loss` (a scalar tensor with grad; `bpo.model.moe.router_aux_loss_function`), for
    loss.router_aux_coef.

    `zero3`: whether ZeRO-3 partitions the model. None reads it off the head (a model built under `zero.Init` is
    partitioned already); a QLoRA model is quantized outside `zero.Init` and partitioned only by
    `deepspeed.initialize`, after this wrapper exists, so its callers say True.
    """

    def __init__(self, model, impl="auto", chunk_size=DEFAULT_CHUNK_SIZE, blank=None, zero3=None, router_aux=False):
        super().__init__()
        self.model = model
        self.impl = impl  # loss.logprob_impl; jobs pass the head resolve_impl chose (and printed), tests may pass auto
        self.chunk_size = chunk_size
        self.transform = LogitTransform.from_model(model)  # what model's forward does to its logits (Gemma softcap)
        call = self.base.forward if isinstance(self.base, nn.Module) else self.base
        self.accepted = set(inspect.signature(call).parameters) - {"input_ids", "attention_mask", "kwargs"}
        self.dtype = next(model.parameters()).dtype
        self.router_aux = moe.router_aux_loss_function(model) if router_aux else None
        self.router_aux_loss = None
        self.attn = model.config.get_text_config()._attn_implementation  # how the shared masks are given
        head = model.get_output_embeddings().weight
        self.blank = None
        if hasattr(head, "ds_id") if zero3 is None else zero3:
            import deepspeed

            deepspeed.zero.register_external_parameter(self, head)
            self.blank = blank

    def forward(self, input_ids, attention_mask, labels, predictor_index=None, position_ids=None, example_of=None,
                part_of=None, prompt_spans=None, **processor_outputs):
        extra = {k: v.to(self.dtype) if v.is_floating_point() else v
                 for k, v in processor_outputs.items() if k in self.accepted}
        seq = {"input_ids": input_ids, "attention_mask": attention_mask}  # every (S, L) tensor of the batch
        if predictor_index is not None:
            seq.update(position_ids=position_ids, example_of=example_of, part_of=part_of)
        rows, width = input_ids.shape
        if self.blank is not None and not self.blank.image_inputs.keys() & extra.keys():
            seq, extra, prompt_spans = self._add_blank_row(seq, extra, prompt_spans)
        if predictor_index is None:
            out = self.base(**seq, use_cache=False, **extra, **self._router_kwargs())
        else:
            positions = self._positions(seq, extra, prompt_spans)
            out = self.base(input_ids=seq["input_ids"], attention_mask=self._shared_masks(seq, extra),
                                   position_ids=positions, use_cache=False, **extra, **self._router_kwargs())
        hidden = out.last_hidden_state  # (S, L, H), or (S + 1, L', H) with the blank row
        if self.router_aux is not None:  # router logits: per MoE layer (S * L, E), real tokens by the (S, L) mask
            self.router_aux_loss = self.router_aux(out.router_logits, seq["attention_mask"])
        if hidden.shape[0] > rows:
            hidden = hidden[:rows, :width] + 0.0 * hidden[rows:].sum()
        if predictor_index is None:
            hidden = hidden[:, :-1]  # (R, T-1, H): position t predicts token t+1
        else:
            hidden = hidden.flatten(0, 1)[predictor_index]  # (R, M, H): the state before each response token
        targets = labels[:, 1:]  # (R, M)
        weight = self.model.get_output_embeddings().weight  # (V, H)
        if self.impl == "auto":
            self.impl = resolve_impl(self.impl, hidden.device)  # once, now that the device is known
        if self.impl == "naive":
            return naive_sequence_logprobs(hidden, weight, targets, transform=self.transform)
        backend = "triton" if self.impl == "triton" else "torch"
        return sequence_logprobs(hidden, weight, targets, chunk_size=self.chunk_size, backend=backend,
                                 transform=self.transform)

    @property
    def base(self):
        """`base_forward(self.model)`, looked up on use: an nn.Module stored as an attribute would be registered a
        second time under this wrapper (its parameters twice in state_dict)."""
        return base_forward(self.model)

    def _router_kwargs(self):
        return {"output_router_logits": True} if self.router_aux is not None else {}

    def _shared_masks(self, seq, extra):
        """The attention mask of a shared batch: (S, 1, L, L) for SDPA and eager, a BlockMask for flex_attention; for
        families with sliding-window layers, one per layer type ({"full_attention": ..., "sliding_attention": ...},
        which their text models take as prepared)."""
        blocks = self._image_blocks(extra)
        text = self.model.config.get_text_config()
        sliding = "sliding_attention" in (getattr(text, "layer_types", None) or [])
        if self.attn == "flex_attention":
            masks = {"full_attention": self._block_mask(seq, blocks)}
            if sliding:
                masks["sliding_attention"] = self._block_mask(seq, blocks, text.sliding_window)
            return masks if sliding else masks["full_attention"]
        allowed = {"full_attention": shared.attention_allowed(seq["example_of"], seq["part_of"], blocks)}
        if sliding:
            allowed["sliding_attention"] = allowed["full_attention"] & shared.within_window(seq["position_ids"],
                                                                                            text.sliding_window)
        if self.attn == "eager":  # eager attention adds its mask to the scores
            allowed = {k: torch.zeros(m.shape, dtype=self.dtype, device=m.device).masked_fill(
                ~m, torch.finfo(self.dtype).min) for k, m in allowed.items()}
        return allowed if len(allowed) > 1 else allowed["full_attention"]

    def _image_blocks(self, extra):
        """(S, L) ids of the image blocks whose tokens attend to each other both ways, or None for a model whose
        image tokens attend causally. Gemma-3: image tokens by `token_type_ids`. Gemma-4
        (use_bidirectional_attention="vision"): image and video tokens by `mm_token_type_ids`, which other families
        (Qwen2-VL, Qwen3-VL) also pass but only for their rotary positions."""
        if "token_type_ids" in extra:
            return shared.image_blocks(extra["token_type_ids"])
        text = self.model.config.get_text_config()
        if getattr(text, "use_bidirectional_attention", None) == "vision" and "mm_token_type_ids" in extra:
            return shared.image_blocks(extra["mm_token_type_ids"], image_types=(1, 2))
        return None

    @staticmethod
    def _block_mask(seq, blocks, window=None):
        """The same rule as a FlexAttention BlockMask (flex_attention never materialises the (L, L) mask)."""
        from torch.nn.attention.flex_attention import create_block_mask

        rows, length = seq["input_ids"].shape
        mask_mod = shared.allowed_mask_mod(seq["example_of"], seq["part_of"], blocks, seq["position_ids"], window)
        return create_block_mask(mask_mod, rows, None, length, length, device=seq["input_ids"].device)

    def _positions(self, seq, extra, prompt_spans):
        """Position ids of a shared batch: 1-D as collated, or the family's multimodal rotary positions (Qwen2-VL,
        Qwen2.5-VL: (3, S, L)), computed from each prompt alone and continued the same way along its responses."""
        flat = seq["position_ids"]  # (S, L)
        rope_index = getattr(getattr(self.model, "model", None), "get_rope_index", None)
        if rope_index is None:
            return flat
        spans = prompt_spans.tolist()
        longest = max(p for _, _, p in spans)
        ids = torch.zeros((len(spans), longest), dtype=torch.long, device=flat.device)
        mask = torch.zeros_like(ids)
        types = torch.zeros_like(ids)
        for e, (s, start, p) in enumerate(spans):
            ids[e, :p] = seq["input_ids"][s, start:start + p]
            mask[e, :p] = 1
            if "mm_token_type_ids" in extra:
                types[e, :p] = extra["mm_token_type_ids"][s, start:start + p]
        prompt_pos, _ = rope_index(input_ids=ids, mm_token_type_ids=types, attention_mask=mask,
                                   image_grid_thw=extra.get("image_grid_thw"))  # (3, E, P)
        out = torch.zeros((3, *flat.shape), dtype=torch.long, device=flat.device)
        example_of = seq["example_of"]
        for e, (s, start, p) in enumerate(spans):
            mine = example_of[s] == e  # this example's tokens in sequence s
            out[:, s, start:start + p] = prompt_pos[:, e, :p]
            after = mine.clone()
            after[start:start + p] = False  # its responses: text positions continuing after the prompt
            out[:, s, after] = prompt_pos[:, e, :p].max() + 1 + (flat[s, after] - p)
        return out

    def _add_blank_row(self, seq, extra, prompt_spans):
        """The batch plus the blank image example as its last sequence, all right-padded to the wider of the two."""
        blank, device = self.blank, seq["input_ids"].device
        rows, width = seq["input_ids"].shape
        n = len(blank.prompt_ids)
        wide = max(width, n)

        def stack(batch_rows, blank_row, fill):  # (S, L) + (n,) -> (S + 1, wide)
            out = torch.full((rows + 1, wide), fill, dtype=batch_rows.dtype, device=device)
            out[:rows, :width] = batch_rows
            out[rows, :n] = torch.as_tensor(blank_row, dtype=batch_rows.dtype, device=device)
            return out

        blank_rows = {"input_ids": (blank.prompt_ids, blank.pad_id), "attention_mask": ([1] * n, 0),
                      "position_ids": (list(range(n)), 0), "part_of": ([0] * n, -1),
                      "example_of": ([len(prompt_spans) if prompt_spans is not None else 0] * n, -1)}
        seq = {k: stack(v, *blank_rows[k]) for k, v in seq.items()}
        fields = {}
        for key, values in blank.prompt_fields.items():
            if key in self.accepted:
                batch_rows = extra.get(key, torch.full((rows, width), values[0], dtype=torch.long, device=device))
                fields[key] = stack(batch_rows, values, values[0])
        images = {k: v.to(device, self.dtype if v.is_floating_point() else v.dtype)
                  for k, v in blank.image_inputs.items() if k in self.accepted}
        if prompt_spans is not None:
            prompt_spans = torch.cat([prompt_spans, torch.tensor([[rows, 0, n]], device=prompt_spans.device)])
        return seq, {**extra, **fields, **images}, prompt_spans


def choose_layout(scoring, model):
    """The batch layout a model is scored with: loss.scoring; returns (layout, a line for the start-up log).

    An attention implementation that takes no custom mask stops the job (bpo.config.validate refuses the known case
    before any weights load): scoring in rows instead would run a different, slower job than the one asked for, and
    another attention fixes it. A family whose layers mix tokens outside the attention mask (LFM2's convolutions) can
    only be scored in rows, whatever the attention: it is, and the start-up log says why."""
    if scoring == "shared":
        why = attention_without_mask(model)
        if why is not None:
            raise ValueError(f"loss.scoring=shared, but {type(model).__name__}: {why}; or set loss.scoring=rows")
        why = layers_outside_attention(model)
        if why is not None:
            return "rows", f"scoring: rows (loss.scoring=shared, but {type(model).__name__}: {why})"
    return scoring, f"scoring: {scoring}"


def shared_layout_unsupported(model):
    """Why this model cannot score the shared-prompt layout (bpo.data.shared), or None when it can."""
    return attention_without_mask(model) or layers_outside_attention(model)


def attention_without_mask(model):
    attn = model.config.get_text_config()._attn_implementation
    if attn not in ("sdpa", "eager", "flex_attention"):
        return (f"attention {attn!r} takes no custom attention mask: use model.attn_implementation=sdpa or "
                f"flex_attention (CUDA)")
    return None


def layers_outside_attention(model):
    """The layout's masks keep a packed response from seeing the one before it only in attention layers; other
    layers (LFM2's short convolutions, linear attention, Mamba) mix neighbouring tokens whatever the mask says."""
    mixing = sorted(set(getattr(model.config.get_text_config(), "layer_types", None) or ()) - set(MASKED_LAYER_TYPES))
    if mixing:
        return f"its {'/'.join(mixing)} layers mix tokens outside the attention mask"
    return None


def is_zero3(ds_config):
    return ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3


def model_inputs(batch, device):
    """The tensors of a collated batch that the model takes, moved to `device`."""
    skip = {"kind", "example_index", "ids", "has_blind"}
    return {k: v.to(device) for k, v in batch.items() if k not in skip and isinstance(v, torch.Tensor)}


def describe(model, parts, attn):
    """The start-up lines: model class, size, attention, and (`parts` from set_trainable) what each part trains."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    dist.print0(f"model: {type(model).__name__}, {total / 1e6:.2f}M parameters, attention={attn}")
    for part, (train, count, modules) in (parts or {}).items():
        dist.print0(f"  {part:<15} {'trained' if train else 'frozen':<8} {count / 1e6:9.3f}M  {', '.join(modules)}")
