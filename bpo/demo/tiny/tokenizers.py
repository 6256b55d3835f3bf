"""Tiny tokenizers of the real classes (LlamaTokenizer, Qwen2Tokenizer, GemmaTokenizer, GPT2Tokenizer).

A replica must tokenize the way its family does, because that is where trainers go wrong: SentencePiece-style
tokenizers (Llama, Mistral, Gemma) turn spaces into `▁` and may prepend one, so a response tokenized on its own can
differ from the same text tokenized after its prompt; byte-level BPE (Qwen2, GPT-2/SmolLM) does not. transformers 5
builds each tokenizer class from a vocabulary and merges with the family's own normalizer, pre-tokenizer and decoder,
so we train a small BPE with that same pipeline on a fixed corpus (no download) and hand its vocabulary and merges to
the real class.
"""

import json

from bpo.demo.tiny.llava import CORPUS as LLAVA_CORPUS

# bpo's tiny LLaVA's corpus (the register of MMSafe-PO conversations) and the templates' role words; merges only
# keep sequences short.
CORPUS = [*LLAVA_CORPUS, "user assistant system model User: Assistant: You are a helpful assistant. Picture 1:"]


def build_tokenizer(cls, byte_level, first=(), special_tokens=(), vocab_size=640, corpus=(), **kwargs):
    """An instance of the real tokenizer class `cls` with a vocabulary trained here.

    byte_level: True for byte-level BPE families (every byte is a base symbol), False for SentencePiece-style ones
    (byte-fallback tokens <0x00>..<0xFF> in the vocabulary, as Llama and Gemma have). `first`: the tokens that open
    the real vocabulary, in its order (Llama: <unk> <s> </s>), so ids keep their real order; default: the class's
    own special tokens. `corpus`: texts the family's template writes itself, trained on as well (Ministral-3's long
    default system prompt), so that they take a real share of the context. kwargs go to `cls` (its unk/bos/eos/pad
    tokens, add_bos_token); `special_tokens` are added afterwards as special tokens, in order, as the checkpoints'
    added tokens are.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    proto = cls(**kwargs)
    backend = proto.backend_tokenizer
    bpe = Tokenizer(models.BPE(byte_fallback=not byte_level, unk_token=None if byte_level else str(proto.unk_token)))
    bpe.normalizer = backend.normalizer
    if byte_level:
        bpe.pre_tokenizer = backend.pre_tokenizer
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        reserved = []
    else:
        # SentencePiece never merges across a word start, so train on words; the class itself reads the whole text.
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        alphabet = []
        reserved = [f"<0x{i:02X}>" for i in range(256)]
    first = list(first) or [str(t) for t in proto.all_special_tokens]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=first + reserved,
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator([*CORPUS, *corpus] * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = cls(vocab=model["vocab"], merges=merges, **kwargs)
    if special_tokens:
        tokenizer.add_tokens(list(special_tokens), special_tokens=True)
    return tokenizer
