"""The models bpo.plan knows: a model's dimensions (ModelDims), read from a Hugging Face config.json or a built-in
name with the published dimensions (llava-1.5-7b, llava-next-72b, qwen2-vl-72b), so no weights are ever read."""

import json
import os
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelDims:
    """What the estimate needs of a model: the decoder's shape, and the vision side as parameter counts."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    vision_params: int = 0  # the vision tower (frozen by default)
    projector_params: int = 0  # vision -> text connector (trained)
    # nn.Linear layers outside the decoder, as (in, out, how many): what LoRA adapts there
    vision_linears: tuple = ()
    projector_linears: tuple = ()

    @property
    def q_dim(self):
        return self.heads * self.head_dim

    @property
    def kv_dim(self):
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self):
        """One decoder layer: q/k/v/o projections (+ q/k/v bias), SwiGLU MLP, two RMSNorms."""
        h = self.hidden
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        bias = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0
        return attn + bias + 3 * h * self.intermediate + 2 * h

    @property
    def layer_linears(self):
        """(in, out) of one decoder layer's Linear layers: q, k, v, o, gate, up, down."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return ((h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h))

    @property
    def quantizable_params(self):
        """Pq: the decoder layers' Linear weights, which QLoRA stores in 4 bits (biases, norms, embeddings, head and
        the vision side stay in bf16)."""
        return self.layers * sum(a * b for a, b in self.layer_linears)

    @property
    def embedding_params(self):
        return self.vocab * self.hidden

    @property
    def llm_params(self):
        head = 0 if self.tied_embeddings else self.embedding_params
        return self.embedding_params + self.layers * self.layer_params + self.hidden + head

    @property
    def total_params(self):
        return self.llm_params + self.vision_params + self.projector_params



# ---------------------------------------------------------------------------------------------------------------
# Reading a Hugging Face config (through transformers, which fills in the model type's defaults for absent keys)


def _clip_vision_params(vc):
    """CLIP vision transformer: class + patch (Conv2d, no bias) + position embeddings, pre/post LayerNorms, layers
    of attention (q, k, v, o with bias) and a 2-layer MLP, each with two LayerNorms."""
    h, i, c, p = vc.hidden_size, vc.intermediate_size, vc.num_channels, vc.patch_size
    patches = (vc.image_size // p) ** 2
    embeddings = h + c * p * p * h + (patches + 1) * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h
    return embeddings + 2 * 2 * h + vc.num_hidden_layers * layer


def _qwen2_vl_vision_params(vc):
    """(vision tower, merger) of Qwen2-VL: Conv3d patch embedding, LayerNorm blocks with GELU MLPs; the merger
    (LayerNorm + 2-layer MLP from merge^2 patches to the LLM width) is the projector and is trained."""
    e = vc.embed_dim
    m = e * vc.mlp_ratio
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2 * e
    block = 2 * 2 * e + (3 * e * e + 3 * e) + (e * e + e) + (e * m + m) + (m * e + e)
    merged = e * vc.spatial_merge_size ** 2
    merger = 2 * e + (merged * merged + merged) + (merged * vc.hidden_size + vc.hidden_size)
    return patch + vc.depth * block, merger


def dims_from_hf_config(config, name=""):
    """ModelDims of a transformers config object: LLaVA style (text_config + vision_config) or Qwen2-VL style
    (decoder fields at the top level in older files, text_config in newer; both arrive as text_config here)."""
    text = getattr(config, "text_config", None) or config
    h = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    tied = getattr(text, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(config, "tie_word_embeddings", False)
    text_type = getattr(text, "model_type", "")
    qkv_bias = bool(getattr(text, "attention_bias", False)) or text_type.startswith("qwen2")
    dims = ModelDims(name=name or getattr(config, "_name_or_path", "") or config.model_type, vocab=text.vocab_size,
                     hidden=h, layers=text.num_hidden_layers, heads=heads,
                     kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
                     intermediate=text.intermediate_size, tied_embeddings=bool(tied), qkv_bias=qkv_bias)
    vc = getattr(config, "vision_config", None)
    if vc is None:
        return dims
    if config.model_type in ("qwen2_vl",):
        vision, projector = _qwen2_vl_vision_params(vc)
        e, m, merged = vc.embed_dim, vc.embed_dim * vc.mlp_ratio, vc.embed_dim * vc.spatial_merge_size ** 2
        vision_linears = ((e, 3 * e, vc.depth), (e, e, vc.depth), (e, m, vc.depth), (m, e, vc.depth))
        projector_linears = ((merged, merged, 1), (merged, vc.hidden_size, 1))
    elif vc.model_type == "clip_vision_model":
        vision = _clip_vision_params(vc)
        layers = config.vision_feature_layer
        n_features = len(layers) if isinstance(layers, (list, tuple)) else 1
        bias = getattr(config, "multimodal_projector_bias", True)
        vin = vc.hidden_size * n_features
        projector = vin * h + h * h + (2 * h if bias else 0)
        if config.model_type == "llava_next":
            projector += h  # image_newline
        vh, vi, vl = vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers
        vision_linears = ((vh, vh, 4 * vl), (vh, vi, vl), (vi, vh, vl))
        projector_linears = ((vin, h, 1), (h, h, 1))
    else:
        raise ValueError(f"bpo.plan.catalog knows CLIP (LLaVA-1.5/NeXT) and Qwen2-VL vision towers, not "
                         f"{config.model_type} with a {vc.model_type} vision config")
    return replace(dims, vision_params=vision, projector_params=projector, vision_linears=vision_linears,
                   projector_linears=projector_linears)


_CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
               "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
               "projection_dim": 768}

# The published config.json files' dimensions (llava-hf/llava-1.5-7b-hf, llava-hf/llava-next-72b-hf,
# Qwen/Qwen2-VL-72B-Instruct), so the plans the docs quote need no download.
BUILTIN = {
    "llava-1.5-7b": {
        "model_type": "llava", "vision_config": _CLIP_L_336,
        "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    },
    "llava-next-72b": {
        "model_type": "llava_next", "vision_config": _CLIP_L_336,
        "text_config": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 24576,
                        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 64,
                        "tie_word_embeddings": False},
    },
    "qwen2-vl-72b": {
        "model_type": "qwen2_vl", "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False,
        "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 8192, "mlp_ratio": 4, "num_heads": 16,
                          "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    },
}


def load_dims(model):
    """ModelDims of a built-in name, a config.json path or a directory holding config.json."""
    from transformers import AutoConfig  # here, not at the top: start-up time (seconds), and only this needs it

    if model in BUILTIN:
        raw, name = BUILTIN[model], model
    else:
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        if not os.path.isfile(path):
            raise SystemExit(f"--model {model}: no such config.json, directory or built-in name "
                             f"(built-ins: {', '.join(BUILTIN)})")
        with open(path) as f:
            raw = json.load(f)
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    raw = dict(raw)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    return dims_from_hf_config(config, name=name)

