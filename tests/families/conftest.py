"""Tiny replicas of real families (bpo.tiny.families), built once per session and shared by the family tests."""

import pytest

# Every family bpo claims to train; PaliGemma (no chat template) has tests of its own.
TRAINABLE = ["llava15", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3", "internvl",
             "qwen3_vl_moe", "llama4", "gemma4"]
MOE = ["qwen3_vl_moe", "llama4", "gemma4"]  # mixture-of-experts language models

# Gemma-4 cases that wait on other branches (bpo/data: the template's generation prompt ends with an empty thought
# channel that the rendered assistant turn lacks, so encoding refuses every record; bpo/ops: final_logit_softcapping
# is not applied by bpo's log-prob head). Remove these marks once both are merged.
GEMMA4_TEMPLATE = pytest.mark.xfail(strict=True, reason="gemma4 chat template: generation prompt ends with an empty "
                                                        "thought channel (bpo/data fix on another branch)")
GEMMA4_TEMPLATE_AND_SOFTCAP = pytest.mark.xfail(strict=True, reason="gemma4: chat template thought channel (bpo/data) "
                                                                    "and final_logit_softcapping (bpo/ops), both on "
                                                                    "other branches")


def with_marks(families, marks):
    """`families` for pytest.mark.parametrize, those in `marks` (family -> mark) carrying their mark."""
    return [pytest.param(f, marks=marks[f]) if f in marks else f for f in families]


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
