"""Scoring responses with a loaded model: `SequenceScorer` wraps the Hugging Face model so that one forward returns
per-token log-probs of the labels, computed from the final hidden states by the log-prob head in `bpo.ops`: the
(R, T, V) logits tensor of the stock forward is never built on the fused path. Also here: the batch layout a model is
scored with (`choose_layout`), and the tensors of a batch the model takes (`model_inputs`).

The reference cache's fingerprint hashes this file (bpo.ref_cache.fingerprint.SCORING_CODE): keep here what the
scored numbers depend on, and loading or freezing in bpo.model.load / bpo.model.parts.
"""

import inspect

import torch
from torch import nn

from bpo.data import shared
from bpo.model import moe
from bpo.ops.logit_transform import LogitTransform
from bpo.ops.logprobs import DEFAULT_CHUNK_SIZE, naive_sequence_logprobs, resolve_impl, sequence_logprobs

MASKED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")  # config.layer_types values


def base_forward(model):
    """The callable that runs an image-text-to-text model up to its language model's last hidden states (no lm_head):
    its base model (`model.model`), or `TowersForward` for a class without one (Llama-4)."""
    base = getattr(model, "model", None)
    if isinstance(base, nn.Module):
        return base
    if isinstance(getattr(getattr(model, "language_model", None), "model", None), nn.Module):
        return TowersForward(model)
    raise ValueError(f"{type(model).__name__}: found no base model (`model.model`) nor a `language_model` with its own "
                     f"base; extend bpo.model.scorer.base_forward for this family")


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

    Returns (R, M) float32 log-probs of labels[:, 1:], exactly 0 where the label is IGNORE_INDEX (prompt, image
    tokens, padding; `bpo.ops.logprobs.response_mask` marks the others). Two batch layouts are scored alike:
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
            import deepspeed  # heavy, and only ZeRO-3 needs it: a CPU test or a single-GPU run does not import it

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


def model_inputs(batch, device):
    """The tensors of a collated batch that the model takes, moved to `device`."""
    skip = {"kind", "example_index", "ids", "has_blind"}
    return {k: v.to(device) for k, v in batch.items() if k not in skip and isinstance(v, torch.Tensor)}
