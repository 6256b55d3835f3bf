"""Tiny replicas of real families (bpo.demo.tiny.families), built once per session and shared by the family tests."""

import pytest

# Every family bpo claims to train; PaliGemma (no chat template) has tests of its own.
TRAINABLE = ["llava15", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3", "internvl",
             "qwen3_vl", "mistral3", "lfm2_vl", "smolvlm2", "glm4v", "qwen3_vl_moe", "llama4", "gemma4"]
MOE = ["qwen3_vl_moe", "llama4", "gemma4"]  # mixture-of-experts language models
# One family per kind of processor (LLaVA's CLIP, Qwen-VL's with its torchvision video processor, Idefics3's image
# splitting, Gemma-3's token types, InternVL's tiles, and each newer family's own): the families `make test-latest`
# checks on the newest releases.
PROCESSOR_KINDS = ["llava15", "qwen2_vl", "idefics3", "gemma3", "internvl", "qwen3_vl", "mistral3", "lfm2_vl",
                   "smolvlm2", "glm4v", "llama4", "gemma4"]


def marked(families):
    """`families` for parametrize, those in PROCESSOR_KINDS marked `latest`."""
    return [pytest.param(f, marks=pytest.mark.latest) if f in PROCESSOR_KINDS else f for f in families]


@pytest.fixture(scope="session")
def replica(tmp_path_factory):
    """replica(name) -> directory of the family's tiny checkpoint (written on first use)."""
    from bpo.demo.tiny import write_family

    root = tmp_path_factory.mktemp("replicas")
    built = {}

    def get(name):
        if name not in built:
            built[name] = write_family(name, str(root / name))
        return built[name]

    return get
