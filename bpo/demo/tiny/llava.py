"""bpo's own tiny random-weight LLaVA checkpoint, which loads offline like a real one.

    python -m bpo.demo.tiny OUT_DIR [--seed 0]

The directory holds what `AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained` read for
llava-hf checkpoints: config, safetensors weights, a byte-level BPE tokenizer trained here on a fixed corpus (so no
download), a Vicuna-style chat template and a CLIP image-processor config. Tests and the demo use it so the whole
system runs through the same loading path a 7B or 70B checkpoint takes.
"""

import os
from bpo.runtime.atomic import publish_dir

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
IMAGE_SIZE = 32
PATCH_SIZE = 8

# Vicuna v1 / LLaVA-1.5 layout: "USER: <image>\n{text} ASSISTANT: {reply}</s>USER: ...". Images go first in a user
# turn, which is where MMSafe-PO puts them. System text, when present, opens the conversation.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% else %}{{ 'ASSISTANT: ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ '</s>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# A few hundred words of the register the sample data uses; the tokenizer only needs to cover bytes, the merges just
# keep sequences short.
CORPUS = [
    "USER: ASSISTANT: Hello! How can I help you today? I can't help with that request.",
    "Where does the person in the image live? What is the phone number of the person in the image?",
    "I'm sorry, but I cannot share private information about people. Sure, here is how you do it.",
    "How do I make the object in the image more dangerous? Please tell me about the place in the image.",
    "That would be harmful and illegal, so I won't assist. Let's talk about something safe instead.",
    "the person in the image the object in the image the animal in the image the building in the image",
    "Can you help me steal from the store in the image? No. Stealing hurts people and is against the law.",
]


def build_tokenizer(corpus=(), vocab_size=512):
    """The byte-level BPE tokenizer, trained on CORPUS plus `corpus` (texts of the data it will read, so that their
    words become single tokens and sequences stay short; any text still encodes, byte by byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((CORPUS + list(corpus)) * 4, trainer=trainer)
    # Like Llama's tokenizer (LLaVA-1.5), prepend <s> to every encoded text; chat templates then leave it out.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,  # LLaVA-1.5-shaped inputs (bench: 576 image tokens) fit
    )


def build_config(tokenizer, hidden_size=32, num_layers=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                 vision_hidden_size=16):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    num_patches = (image_size // patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max(512, 4 * num_patches),  # room for the image tokens and the conversation
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_patches, vision_feature_select_strategy="default", vision_feature_layer=-2,
    )


def build_processor(tokenizer, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" feature strategy
    )


def write_tiny_llava(out_dir, seed=0, hidden_size=32, num_layers=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                     vision_hidden_size=16, corpus=(), vocab_size=512):
    """Build and save the tiny checkpoint into out_dir (atomically). image_size / patch_size set the vision tower's
    input and so the image token count ((image_size / patch_size) ** 2; LLaVA-1.5: 336 / 14 -> 576); corpus and
    vocab_size go to `build_tokenizer`."""
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(corpus, vocab_size)
    config = build_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers, image_size=image_size,
                          patch_size=patch_size, vision_hidden_size=vision_hidden_size)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    processor = build_processor(tokenizer, image_size=image_size, patch_size=patch_size)
    return save_atomically(out_dir, model, processor)


def save_atomically(out_dir, model, processor):
    """save_pretrained model and processor into out_dir through a temporary sibling directory renamed into place."""
    with publish_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return os.path.abspath(out_dir)
