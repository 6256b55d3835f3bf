"""Tiny random-weight replicas of real vision-language families, for tests that must hold for real checkpoints.

    python -m bpo.demo.tiny OUT_DIR --family qwen2_vl

Each replica is what the family's published checkpoint holds, shrunk: its real model class, its real tokenizer class
with the family's special tokens, its chat template as the authors published it (`templates/`, sources in the README
there), and its real image-processor class with the same options at small sizes. Only the sizes (layers, widths,
vocabulary, image resolution) are ours. bpo's own tiny LLaVA (`bpo.demo.tiny.llava`) has a kinder hand-written template;
a test that passes only there proves nothing about real models.

| family | checkpoint replicated | model class |
|---|---|---|
| llava15 | llava-hf/llava-1.5-7b-hf | LlavaForConditionalGeneration (CLIP + Llama) |
| llava_next | llava-hf/llava-v1.6-mistral-7b-hf | LlavaNextForConditionalGeneration (CLIP + Mistral, any-res tiles) |
| llava_onevision | llava-hf/llava-onevision-qwen2-0.5b-ov-hf | LlavaOnevisionForConditionalGeneration (SigLIP + Qwen2) |
| qwen2_vl | Qwen/Qwen2-VL-2B-Instruct | Qwen2VLForConditionalGeneration (3-D rotary positions) |
| qwen2_5_vl | Qwen/Qwen2.5-VL-3B-Instruct | Qwen2_5_VLForConditionalGeneration (window attention) |
| idefics3 | HuggingFaceTB/SmolVLM-Instruct | Idefics3ForConditionalGeneration (image splitting, pixel mask) |
| gemma3 | google/gemma-3-4b-it | Gemma3ForConditionalGeneration (bidirectional image block) |
| internvl | OpenGVLab/InternVL3-1B-hf | InternVLForConditionalGeneration (InternViT + Qwen2) |
| paligemma | google/paligemma-3b-pt-224 | PaliGemmaForConditionalGeneration (no chat template) |
| qwen3_vl | Qwen/Qwen3-VL-8B-Instruct | Qwen3VLForConditionalGeneration (interleaved M-RoPE, DeepStack) |
| mistral3 | mistralai/Ministral-3-14B-Instruct-2512 | Mistral3ForConditionalGeneration (Pixtral + Ministral-3) |
| lfm2_vl | LiquidAI/LFM2.5-VL-1.6B | Lfm2VlForConditionalGeneration (SigLIP2 NaFlex + LFM2 convolutions) |
| smolvlm2 | HuggingFaceTB/SmolVLM2-500M-Video-Instruct | SmolVLMForConditionalGeneration (image splitting) |
| glm4v | zai-org/GLM-4.1V-9B-Thinking | Glm4vForConditionalGeneration (3-D rotary positions) |
| qwen3_vl_moe | Qwen/Qwen3-VL-30B-A3B-Instruct | Qwen3VLMoeForConditionalGeneration (fused experts, top-k routing) |
| llama4 | meta-llama/Llama-4-Scout-17B-16E-Instruct | Llama4ForConditionalGeneration (no base model `.model`) |
| gemma4 | google/gemma-4-26B-A4B-it | Gemma4ForConditionalGeneration (MoE, bidirectional image block) |

The mixture-of-experts replicas keep 4 experts, 2 of them per token (Llama-4 Scout: 1, as published), so that
routing differs from token to token and from rank to rank.
"""

import os

from bpo.demo.tiny.tokenizers import CORPUS, build_tokenizer
from bpo.demo.tiny.llava import save_atomically

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, tie_word_embeddings=False)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
INIT_RANGE = 0.2


def template(name):
    with open(os.path.join(TEMPLATES, name + ".jinja")) as f:
        return f.read()


def _ids(tokenizer, **tokens):
    return {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in tokens.items()}


def _llama_tokenizer(extra, pad=None):
    from transformers import LlamaTokenizer

    tok = build_tokenizer(LlamaTokenizer, byte_level=False, first=["<unk>", "<s>", "</s>"], special_tokens=extra,
                          add_bos_token=True)
    if pad:
        tok.add_special_tokens({"pad_token": pad})
    return tok


def _qwen2_tokenizer(extra, **kwargs):
    from transformers import Qwen2Tokenizer

    tok = build_tokenizer(Qwen2Tokenizer, byte_level=True, first=["<|endoftext|>"],
                          special_tokens=["<|im_start|>", "<|im_end|>", *extra], **kwargs)
    tok.eos_token = "<|im_end|>"  # the -Instruct checkpoints end a turn, and generation, with <|im_end|>
    return tok


def _clip_vision(image_size, patch_size):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**VISION, image_size=image_size, patch_size=patch_size, projection_dim=16)


def _siglip_vision(image_size, patch_size):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**VISION, image_size=image_size, patch_size=patch_size, vision_use_head=False)


def llava15():
    from transformers import CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaProcessor

    tok = _llama_tokenizer(["<image>"], pad="<pad>")
    text = LlamaConfig(**TEXT, vocab_size=len(tok), **_ids(tok, bos_token_id="<s>", eos_token_id="</s>",
                                                            pad_token_id="<pad>"))
    config = LlavaConfig(vision_config=_clip_vision(32, 8), text_config=text, image_seq_length=16,
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                image_mean=[0.48145466, 0.4578275, 0.40821073],
                                image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
                               vision_feature_select_strategy="default", chat_template=template("llava15"))
    return config, processor, {"eos_token_id": text.eos_token_id}


def llava_next():
    from transformers import LlavaNextConfig, LlavaNextImageProcessor, LlavaNextProcessor, MistralConfig

    tok = _llama_tokenizer(["<image>"], pad="<pad>")
    text = MistralConfig(**TEXT, vocab_size=len(tok), sliding_window=None,
                         **_ids(tok, bos_token_id="<s>", eos_token_id="</s>", pad_token_id="<pad>"))
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(vision_config=_clip_vision(32, 8), text_config=text, image_grid_pinpoints=pinpoints,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16,
                             vision_feature_select_strategy="default", vision_feature_layer=-2)
    images = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                     image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
                                   vision_feature_select_strategy="default", chat_template=template("llava_next"))
    return config, processor, {"eos_token_id": text.eos_token_id}


def llava_onevision():
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor, Qwen2Config)

    tok = _qwen2_tokenizer(["<image>", "<video>"])
    text = Qwen2Config(**TEXT, vocab_size=len(tok), **_ids(tok, eos_token_id="<|im_end|>",
                                                           pad_token_id="<|endoftext|>"))
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(vision_config=_siglip_vision(32, 8), text_config=text,
                                  image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
                                  vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"))
    images = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    video = LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})
    processor = LlavaOnevisionProcessor(image_processor=images, video_processor=video, tokenizer=tok,
                                        num_image_tokens=16, vision_feature_select_strategy="full",
                                        chat_template=template("llava_onevision"))
    return config, processor, {"eos_token_id": text.eos_token_id}


def _qwen_vl(version):
    import transformers as tf

    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _qwen2_tokenizer(vision_tokens)
    ids = _ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
               vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    text = dict(**TEXT, vocab_size=len(tok), rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                              "rope_theta": 1000000.0},
                bos_token_id=None, **_ids(tok, eos_token_id="<|im_end|>", pad_token_id="<|endoftext|>"))
    if version == 2:
        vision = dict(depth=2, embed_dim=16, hidden_size=TEXT["hidden_size"], num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = tf.Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
        image_cls, video_cls, proc_cls = tf.Qwen2VLImageProcessor, tf.Qwen2VLVideoProcessor, tf.Qwen2VLProcessor
    else:
        vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=16, out_hidden_size=TEXT["hidden_size"],
                      fullatt_block_indexes=[1])
        config = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        image_cls, video_cls, proc_cls = tf.Qwen2VLImageProcessor, tf.Qwen2VLVideoProcessor, tf.Qwen2_5_VLProcessor
    # Real settings are patch 14, merge 2 and 56*56 .. 28*28*1280 pixels; shrunk to patch 4: 8*8 .. 32*32 pixels.
    size = {"shortest_edge": 8 * 8, "longest_edge": 32 * 32}
    images = image_cls(size=size, patch_size=4, merge_size=2, temporal_patch_size=2)
    video = video_cls(size=size, patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = proc_cls(image_processor=images, video_processor=video, tokenizer=tok,
                         chat_template=template("qwen2_vl"))
    return config, processor, {"eos_token_id": [ids_ for ids_ in (tok.convert_tokens_to_ids("<|im_end|>"),
                                                                  tok.convert_tokens_to_ids("<|endoftext|>"))]}


def qwen2_vl():
    return _qwen_vl(2)


def qwen2_5_vl():
    return _qwen_vl(2.5)


def _smolvlm_text():
    """SmolVLM's tokenizer (GPT-2 byte-level, its image and tile-grid tokens) and Llama text config, shared by the
    Idefics3-class SmolVLM and SmolVLM2."""
    from transformers import GPT2Tokenizer, LlamaConfig

    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = build_tokenizer(GPT2Tokenizer, byte_level=True,
                          special_tokens=["<fake_token_around_image>", "<image>", "<end_of_utterance>",
                                          "<global-img>", *grid],
                          unk_token="<|endoftext|>", bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                          pad_token="<|im_end|>")
    text = LlamaConfig(**TEXT, vocab_size=len(tok), **_ids(tok, bos_token_id="<|im_start|>",
                                                            eos_token_id="<end_of_utterance>",
                                                            pad_token_id="<|im_end|>"))
    return tok, text


def idefics3():
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    tok, text = _smolvlm_text()
    vision = dict(VISION, image_size=32, patch_size=8)
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                            image_token_id=tok.convert_tokens_to_ids("<image>"))
    # SmolVLM: longest edge 4*384, tiles of 384, scale factor 2 -> 81 tokens per tile; here tiles of 32 -> 4 tokens.
    images = Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                    do_image_splitting=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4,
                                  chat_template=template("smolvlm"))
    return config, processor, {"eos_token_id": text.eos_token_id}


def _gemma_tokenizer(extra, **kwargs):
    from transformers import GemmaTokenizer

    return build_tokenizer(GemmaTokenizer, byte_level=False, first=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
                           special_tokens=extra, add_bos_token=True, **kwargs)


def gemma3():
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor, Gemma3TextConfig

    image_tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _gemma_tokenizer(["<start_of_turn>", "<end_of_turn>", *image_tokens.values()],
                           extra_special_tokens=image_tokens)
    # Real: five sliding-window layers to one global. Three layers here: with two, the first layer's view of the
    # image block is too uniform for its bidirectional mask to reach the text tokens.
    text = Gemma3TextConfig(**{**TEXT, "tie_word_embeddings": True, "num_hidden_layers": 3}, head_dim=8,
                            vocab_size=len(tok), sliding_window=16,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                            **_ids(tok, bos_token_id="<bos>", eos_token_id="<eos>", pad_token_id="<pad>"))
    # Real: 896-pixel images in 14-pixel patches (64 x 64), average-pooled to 16 x 16 = 256 tokens; here 32 / 8 -> 4 x 4
    # patches pooled to 2 x 2 = 4 tokens.
    config = Gemma3Config(text_config=text, vision_config=_siglip_vision(32, 8), mm_tokens_per_image=4,
                          **_ids(tok, boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
                                 image_token_index="<image_soft_token>"))
    images = Gemma3ImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.5, 0.5],
                                  image_std=[0.5, 0.5, 0.5], resample=2)
    processor = Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=4,
                                chat_template=template("gemma3"))
    # google/gemma-3-*-it generation_config.json: eos_token_id [1, 106], i.e. <eos> and <end_of_turn>.
    return config, processor, {"eos_token_id": [text.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]}


def internvl():
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor, InternVLVideoProcessor,
                              InternVLVisionConfig, Qwen2Config)

    image_tokens = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                    "video_token": "<video>"}
    tok = _qwen2_tokenizer([*image_tokens.values(), "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"],
                           extra_special_tokens=image_tokens)
    text = Qwen2Config(**{**TEXT, "tie_word_embeddings": True}, vocab_size=len(tok),
                       **_ids(tok, eos_token_id="<|im_end|>", pad_token_id="<|endoftext|>"))
    vision = InternVLVisionConfig(**VISION, image_size=[32, 32], patch_size=[8, 8])
    # Real: 448-pixel tiles in 14-pixel patches (32 x 32), pixel-shuffled by 0.5 to 256 tokens; here 32 / 8 -> 4 x 4
    # patches shuffled to 4 tokens per tile.
    config = InternVLConfig(vision_config=vision, text_config=text, image_seq_length=4, downsample_ratio=0.5,
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    # Real: up to 12 tiles of 448 pixels plus a thumbnail; here up to 4 tiles of 32.
    images = GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4,
                                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    video = InternVLVideoProcessor(size={"height": 32, "width": 32})
    processor = InternVLProcessor(image_processor=images, video_processor=video, tokenizer=tok, image_seq_length=4,
                                  chat_template=template("internvl"))
    return config, processor, {"eos_token_id": text.eos_token_id}


def paligemma():
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessor

    tok = _gemma_tokenizer(["<image>"])
    text = GemmaConfig(**{**TEXT, "tie_word_embeddings": True}, head_dim=8, vocab_size=len(tok),
                       **_ids(tok, bos_token_id="<bos>", eos_token_id="<eos>", pad_token_id="<pad>"))
    vision = _siglip_vision(32, 8)
    config = PaliGemmaConfig(text_config=text, vision_config=vision, projection_dim=TEXT["hidden_size"],
                             image_token_index=tok.convert_tokens_to_ids("<image>"))
    config.text_config.num_image_tokens = 16
    images = SiglipImageProcessor(size={"height": 32, "width": 32}, image_seq_length=16)
    # PaliGemma is a pretrained (not chat) model: its processor has no chat template.
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tok)
    return config, processor, {"eos_token_id": text.eos_token_id}


def _byte_level_backend(first, special_tokens, corpus=(), vocab_size=640, **kwargs):
    """A byte-level BPE tokenizer of the generic class (TokenizersBackend, what AutoTokenizer gives checkpoints that
    ship only a tokenizer.json: Tekken, LFM2, GLM-4), trained with the GPT-4-style split that these share with Qwen2."""
    from transformers import Qwen2Tokenizer, TokenizersBackend

    proto = build_tokenizer(Qwen2Tokenizer, byte_level=True, first=first, corpus=corpus, vocab_size=vocab_size)
    tok = TokenizersBackend(tokenizer_object=proto.backend_tokenizer, **kwargs)
    tok.add_tokens(list(special_tokens), special_tokens=True)  # ids in `first` keep theirs; the rest come after
    return tok


def qwen3_vl():
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor

    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _qwen2_tokenizer(vision_tokens)
    ids = _ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
               vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    # Real (Qwen3-VL-8B): head_dim 128, interleaved M-RoPE over sections [24, 20, 20], theta 5e6; here head_dim 8.
    text = dict(**TEXT, head_dim=8, vocab_size=len(tok), bos_token_id=None,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                                 "rope_theta": 5000000.0},
                **_ids(tok, eos_token_id="<|im_end|>", pad_token_id="<|endoftext|>"))
    # Real: 27 blocks, patch 16, merge 2, a 48 x 48 grid of learned positions, DeepStack features from blocks
    # 8, 16, 24 added to the first three LM layers; here 2 blocks, patch 4, an 8 x 8 grid, DeepStack from block 0.
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=TEXT["hidden_size"], num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
    # Real: 65536 .. 16777216 pixels (256 x 256 .. 4096 x 4096) in 16-pixel patches; here 8*8 .. 32*32.
    size = {"shortest_edge": 8 * 8, "longest_edge": 32 * 32}
    images = Qwen2VLImageProcessor(size=size, patch_size=4, merge_size=2, temporal_patch_size=2,
                                   image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video = Qwen3VLVideoProcessor(size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64}, patch_size=4, merge_size=2,
                                  temporal_patch_size=2)
    processor = Qwen3VLProcessor(image_processor=images, video_processor=video, tokenizer=tok,
                                 chat_template=template("qwen3_vl"))
    # Qwen/Qwen3-VL-8B-Instruct generation_config.json: eos_token_id [151645, 151643] (<|im_end|>, <|endoftext|>).
    return config, processor, {"eos_token_id": [tok.convert_tokens_to_ids("<|im_end|>"),
                                                tok.convert_tokens_to_ids("<|endoftext|>")]}


# Tekken's control tokens, ids 0..19 as in the real vocabulary ([IMG] = 10, the config's image_token_index).
_TEKKEN_CONTROL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                   "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]


def _default_system_message(text):
    """The default system prompt a Mistral template sets (`default_system_message = '...'`), unquoted."""
    import re

    quoted = re.search(r"default_system_message = '((?:[^'\\]|\\.)*)'", text).group(1)
    return quoted.replace("\\n", "\n").replace("\\'", "'")


def mistral3():
    from transformers import (Ministral3Config, Mistral3Config, PixtralImageProcessor, PixtralProcessor,
                              PixtralVisionConfig)

    # The template writes a default system prompt of ~600 real tokens into every conversation; trained on, it takes
    # about 500 here (untrained, over 1400 of the tiny vocabulary's).
    tok = _byte_level_backend(_TEKKEN_CONTROL, [*_TEKKEN_CONTROL, "[ARGS]", "[THINK]", "[/THINK]"],
                              corpus=[_default_system_message(template("mistral3"))], vocab_size=1000,
                              unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    # Real (Ministral-3-14B): 40 layers of 5120, head_dim 128, YaRN (factor 16 over 16384 positions), theta 1e9.
    text = Ministral3Config(**{k: v for k, v in TEXT.items() if k != "max_position_embeddings"}, head_dim=8,
                            vocab_size=len(tok),
                            rope_parameters={"type": "yarn", "rope_theta": 1000000000.0, "factor": 16.0,
                                             "original_max_position_embeddings": 16384,
                                             "max_position_embeddings": 262144, "beta_fast": 32.0, "beta_slow": 1.0,
                                             "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1},
                            **_ids(tok, bos_token_id="<s>", eos_token_id="</s>", pad_token_id="<pad>"))
    # Real Pixtral encoder: images up to 1540 pixels in 14-pixel patches, 2 x 2 patches merged per token; here up
    # to 64 pixels in 4-pixel patches.
    vision = PixtralVisionConfig(**VISION, head_dim=8, image_size=64, patch_size=4)
    config = Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=2, vision_feature_layer=-1,
                            multimodal_projector_bias=False, projector_hidden_act="gelu",
                            image_token_index=tok.convert_tokens_to_ids("[IMG]"), tie_word_embeddings=False)
    images = PixtralImageProcessor(size={"longest_edge": 64}, patch_size={"height": 4, "width": 4})
    processor = PixtralProcessor(image_processor=images, tokenizer=tok, patch_size=4, spatial_merge_size=2,
                                 image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]",
                                 chat_template=template("mistral3"))
    return config, processor, {"eos_token_id": text.eos_token_id}


def lfm2_vl():
    from transformers import (Lfm2Config, Lfm2VlConfig, Lfm2VlImageProcessor, Lfm2VlProcessor,
                              Siglip2VisionConfig)

    grid = [f"<|img_row_{i}_col_{j}|>" for i in range(1, 4) for j in range(1, 4)]
    first = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
             "<|im_start|>", "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>",
             "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>"]
    tok = _byte_level_backend(first, [*first, "<image>", "<|image_start|>", "<|image_end|>", *grid,
                                      "<|img_thumbnail|>"],
                              bos_token="<|startoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>")
    # Real (LFM2.5-1.2B): 16 layers, gated short convolutions with 6 attention layers among them; here one of each.
    text = Lfm2Config(**{**TEXT, "tie_word_embeddings": True}, block_multiple_of=16,
                      layer_types=["conv", "full_attention"], vocab_size=len(tok),
                      **_ids(tok, bos_token_id="<|startoftext|>", eos_token_id="<|im_end|>", pad_token_id="<|pad|>"))
    # Real: SigLIP2 NaFlex, 16-pixel patches, 256 learned positions; here 4-pixel patches, 64 positions.
    vision = Siglip2VisionConfig(**VISION, patch_size=4, num_patches=64, vision_use_head=False)
    config = Lfm2VlConfig(vision_config=vision, text_config=text, projector_hidden_size=32, downsample_factor=2,
                          image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=True)
    # Real: 512-pixel tiles (2 to 10 and a thumbnail) once an image is over 256 tokens (x2 tolerance), 64..256
    # tokens an image; here 16-pixel tiles, 4..16 tokens: the wide image stays whole, the tall one is tiled.
    images = Lfm2VlImageProcessor(encoder_patch_size=4, tile_size=16, min_image_tokens=4, max_image_tokens=16,
                                  downsample_factor=2, do_image_splitting=True, min_tiles=2, max_tiles=10,
                                  use_thumbnail=True, max_pixels_tolerance=2.0, image_mean=[0.5, 0.5, 0.5],
                                  image_std=[0.5, 0.5, 0.5])
    processor = Lfm2VlProcessor(image_processor=images, tokenizer=tok, chat_template=template("lfm2_vl"))
    return config, processor, {"eos_token_id": text.eos_token_id}


def smolvlm2():
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    tok, text = _smolvlm_text()
    # Real (SmolVLM2-500M-Video-Instruct, the transformers defaults): up to 4 x 512 pixels in 512-pixel tiles plus a
    # global image, SigLIP patches of 16, pixel-shuffled by 4 -> 64 tokens a tile; here up to 2 x 32 pixels in
    # 32-pixel tiles, patches of 4, shuffled by 4 -> 4 tokens a tile.
    vision = dict(VISION, image_size=32, patch_size=4)
    config = SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=4,
                           image_token_id=tok.convert_tokens_to_ids("<image>"))
    images = SmolVLMImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                   do_image_splitting=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video = SmolVLMVideoProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = SmolVLMProcessor(image_processor=images, video_processor=video, tokenizer=tok, image_seq_len=4,
                                 chat_template=template("smolvlm2"))
    return config, processor, {"eos_token_id": text.eos_token_id}


def glm4v():
    from transformers import Glm4vConfig, Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    first = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
             "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
             "<|end_of_video|>", "<|image|>", "<|video|>"]
    tok = _byte_level_backend(first, first, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    ids = _ids(tok, image_token_id="<|image|>", video_token_id="<|video|>", image_start_token_id="<|begin_of_image|>",
               image_end_token_id="<|end_of_image|>", video_start_token_id="<|begin_of_video|>",
               video_end_token_id="<|end_of_video|>")
    # Real (GLM-4.1V-9B): head_dim 128, rotary on half of it, M-RoPE sections [8, 12, 12]; here head_dim 16 (two
    # heads, one KV head) so that the rotated half holds all three sections: [2, 1, 1].
    text = dict(**{**TEXT, "num_attention_heads": 2, "num_key_value_heads": 1}, vocab_size=len(tok),
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5,
                                 "rope_theta": 10000.0},
                **_ids(tok, eos_token_id="<|endoftext|>", pad_token_id="<|endoftext|>"))
    # Real: 24 blocks on 336-pixel position grids of 14-pixel patches, 2 x 2 merged; here 2 blocks, 32 / 4.
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, image_size=32, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=TEXT["hidden_size"])
    config = Glm4vConfig(vision_config=vision, text_config=text, **ids)
    # Real: 112*112 .. 28*28*15000 pixels in 14-pixel patches; here 8*8 .. 32*32 in 4-pixel ones.
    size = {"shortest_edge": 8 * 8, "longest_edge": 32 * 32}
    images = Glm4vImageProcessor(size=size, patch_size=4, merge_size=2, temporal_patch_size=2)
    video = Glm4vVideoProcessor(size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64}, patch_size=4, merge_size=2,
                                temporal_patch_size=2)
    processor = Glm4vProcessor(image_processor=images, video_processor=video, tokenizer=tok,
                               chat_template=template("glm4v"))
    # zai-org/GLM-4.1V-9B-Thinking generation_config.json: eos_token_id [151329, 151336, 151338], i.e.
    # <|endoftext|>, <|user|> and <|observation|>: the model ends its turn by opening the next one.
    return config, processor, {"eos_token_id": [tok.convert_tokens_to_ids(t)
                                                for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]}


FAMILIES = {f.__name__: f for f in (llava15, llava_next, llava_onevision, qwen2_vl, qwen2_5_vl, idefics3, gemma3,
                                    internvl, paligemma, qwen3_vl, mistral3, lfm2_vl, smolvlm2, glm4v)}


# --- Mixture-of-experts families ------------------------------------------------------------------------------------

MOE = dict(num_experts=4, top_k=2, moe_intermediate_size=24)  # 2 * 24 != 32: a transposed expert tensor shows


def qwen3_vl_moe():
    from transformers import (Qwen2VLImageProcessor, Qwen3VLMoeConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor)

    tok = _qwen2_tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    ids = _ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
               vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    # Real: 128 experts, 8 per token, mrope_section [24, 20, 20] interleaved over head_dim 128; here head_dim 8.
    text = dict(**TEXT, head_dim=8, vocab_size=len(tok), num_experts=MOE["num_experts"],
                num_experts_per_tok=MOE["top_k"], moe_intermediate_size=MOE["moe_intermediate_size"],
                decoder_sparse_step=1, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                        "mrope_interleaved": True, "rope_theta": 5000000.0},
                bos_token_id=None, **_ids(tok, eos_token_id="<|im_end|>", pad_token_id="<|endoftext|>"))
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=TEXT["hidden_size"], num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    config = Qwen3VLMoeConfig(vision_config=vision, text_config=text, **ids)
    # Real: patch 16, merge 2, 64*64*... pixels (shortest_edge 65536); shrunk to patch 4: 8*8 .. 32*32 pixels.
    size = {"shortest_edge": 8 * 8, "longest_edge": 32 * 32}
    images = Qwen2VLImageProcessor(size=size, patch_size=4, merge_size=2, temporal_patch_size=2,
                                   image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video = Qwen3VLVideoProcessor(size=size, patch_size=4, merge_size=2, temporal_patch_size=2,
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Qwen3VLProcessor(image_processor=images, video_processor=video, tokenizer=tok,
                                 chat_template=template("qwen3_vl_moe"))
    return config, processor, {"eos_token_id": [tok.convert_tokens_to_ids("<|im_end|>"),
                                                tok.convert_tokens_to_ids("<|endoftext|>")]}


def _llama4_tokenizer():
    """Llama-4's tokenizer is a tiktoken-style byte-level BPE published as a plain PreTrainedTokenizerFast (no class
    of its own): the Llama-3 split pattern, byte-level symbols, BOS added by a post-processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>", "<|python_start|>",
                "<|python_end|>", "<|finetune_right_pad|>", "<|image_start|>", "<|image_end|>", "<|image|>",
                "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(CORPUS * 4, trainer=trainer)
    bpe.add_special_tokens(specials)
    bos = bpe.token_to_id("<|begin_of_text|>")
    bpe.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
                                   pad_token="<|finetune_right_pad|>")


def llama4():
    from transformers import Llama4Config, Llama4ImageProcessor, Llama4Processor, Llama4TextConfig, Llama4VisionConfig

    tok = _llama4_tokenizer()
    # Real Scout: 48 layers, all MoE (16 experts, 1 per token, a shared expert), every 4th layer without RoPE,
    # chunked attention of 8192 tokens; here 2 layers, the second without RoPE.
    text = Llama4TextConfig(**{k: v for k, v in TEXT.items() if k != "intermediate_size"}, head_dim=8,
                            intermediate_size=MOE["moe_intermediate_size"], intermediate_size_mlp=64,
                            num_local_experts=MOE["num_experts"],
                            num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layer_interval=2,
                            attention_chunk_size=8192, vocab_size=len(tok),
                            **_ids(tok, bos_token_id="<|begin_of_text|>", eos_token_id="<|eot|>",
                                   pad_token_id="<|finetune_right_pad|>"))
    # Real: 336-pixel tiles in 14-pixel patches (24 x 24), pixel-shuffled by 0.5 to 144 tokens per tile; here 32-pixel
    # tiles in 8-pixel patches (4 x 4), shuffled to 4 tokens per tile.
    # The pixel-shuffle MLP takes hidden_size / 0.5**2 features: Scout's 1408 -> 5632 (its intermediate_size).
    vision = Llama4VisionConfig(**{**VISION, "intermediate_size": 64}, image_size=32, patch_size=8,
                                vision_output_dim=32, pixel_shuffle_ratio=0.5,
                                projector_input_dim=32, projector_output_dim=32,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000})
    config = Llama4Config(vision_config=vision, text_config=text,
                          **_ids(tok, boi_token_index="<|image_start|>", eoi_token_index="<|image_end|>",
                                 image_token_index="<|patch|>"))
    # Real: up to 16 tiles of 336 pixels (plus a global one); here up to 4 of 32.
    images = Llama4ImageProcessor(size={"height": 32, "width": 32}, max_patches=4, resize_to_max_canvas=False,
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Llama4Processor(image_processor=images, tokenizer=tok, patch_size=8, pixel_shuffle_ratio=0.5,
                                chat_template=template("llama4"))
    # meta-llama/Llama-4-Scout-17B-16E-Instruct generation_config.json: eos_token_id [200001, 200007, 200008], i.e.
    # <|end_of_text|>, <|eom|> and <|eot|>.
    return config, processor, {"eos_token_id": [tok.convert_tokens_to_ids(t)
                                                for t in ("<|end_of_text|>", "<|eom|>", "<|eot|>")]}


def gemma4():
    from transformers import (Gemma4AudioFeatureExtractor, Gemma4Config, Gemma4ImageProcessor, Gemma4Processor,
                              Gemma4TextConfig, Gemma4VideoProcessor, Gemma4VisionConfig)

    mm_tokens = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                 "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}
    turn = ["<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>", "<|tool_call>",
            "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']
    tok = _gemma_tokenizer([*turn, *mm_tokens.values(), "<|video|>"], extra_special_tokens=mm_tokens)
    # Real 26B-A4B: 128 experts, 8 per token, beside a dense MLP in every layer; five sliding-window layers to one
    # global; final logits soft-capped at 30; image tokens attend bidirectionally ("vision").
    text = Gemma4TextConfig(**{**TEXT, "tie_word_embeddings": True, "num_hidden_layers": 3}, head_dim=8,
                            vocab_size=len(tok), vocab_size_per_layer_input=len(tok), hidden_size_per_layer_input=0,
                            sliding_window=16, layer_types=["sliding_attention", "sliding_attention",
                                                            "full_attention"],
                            final_logit_softcapping=30.0, use_bidirectional_attention="vision",
                            enable_moe_block=True, num_experts=MOE["num_experts"], top_k_experts=MOE["top_k"],
                            moe_intermediate_size=MOE["moe_intermediate_size"],
                            **_ids(tok, bos_token_id="<bos>", eos_token_id="<eos>", pad_token_id="<pad>"))
    vision = Gemma4VisionConfig(**VISION, num_key_value_heads=2, head_dim=8, patch_size=4, pooling_kernel_size=3,
                                position_embedding_size=64)
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=None,
                          **_ids(tok, boi_token_id="<|image>", eoi_token_id="<image|>", image_token_id="<|image|>",
                                 video_token_id="<|video|>", boa_token_id="<|audio>", eoa_token_index="<audio|>",
                                 audio_token_id="<|audio|>"))
    # Real: 16-pixel patches pooled 3 x 3, up to 280 soft tokens per image; here 4-pixel patches and the smallest
    # budget the class allows (70 soft tokens).
    images = Gemma4ImageProcessor(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    video = Gemma4VideoProcessor(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    processor = Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=images,
                                tokenizer=tok, video_processor=video, image_seq_length=70,
                                chat_template=template("gemma4"))
    # google/gemma-4-*-it generation_config.json: eos_token_id [1, 106], i.e. <eos> and <turn|>.
    return config, processor, {"eos_token_id": [text.eos_token_id, tok.convert_tokens_to_ids("<turn|>")]}


FAMILIES.update({f.__name__: f for f in (qwen3_vl_moe, llama4, gemma4)})


def write_family(name, out_dir, seed=0):
    """Build the replica of family `name` and save it into out_dir (atomically); returns out_dir."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}")
    torch.manual_seed(seed)
    config, processor, generation = FAMILIES[name]()
    # At the usual 0.02 a model this small attends almost uniformly, so a wrong attention mask or wrong positions
    # (image tokens attending causally, 1-D instead of 3-D rotary positions) would move log-probs by less than a
    # test's tolerance. Wider weights make them matter, as they do in a trained model.
    for sub in (config, config.get_text_config(), getattr(config, "vision_config", None)):
        if sub is not None:
            sub.initializer_range = INIT_RANGE
    model = AutoModelForImageTextToText.from_config(config)
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                                               do_sample=False, **generation)
    return save_atomically(out_dir, model, processor)
