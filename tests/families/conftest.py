"""Tiny replicas of real families (bpo.tiny.families), built once per session and shared by the family tests."""

import pytest

# Every family bpo claims to train; PaliGemma (no chat template) has tests of its own.
TRAINABLE = ["llava15", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3", "internvl",
             "qwen3_vl_moe", "llama4", "gemma4"]
MOE = ["qwen3_vl_moe", "llama4", "gemma4"]  # mixture-of-experts language models


@pytest.fixture(scope="session")
def replica(tmp_path_factory):
    """replica(name) -> directory of the family's tiny checkpoint (written on first use)."""
    from bpo.tiny import write_family

    root = tmp_path_factory.mktemp("replicas")
    built = {}

    def get(name):
        if name not in built:
            built[name] = write_family(name, str(root / name))
        return built[name]

    return get
