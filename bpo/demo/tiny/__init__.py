"""Tiny random-weight checkpoints that load offline through `from_pretrained` like real ones.

    python -m bpo.demo.tiny OUT_DIR [--seed 0]                    # bpo's own tiny LLaVA (tests, demo)
    python -m bpo.demo.tiny OUT_DIR --family qwen2_vl [--seed 0]  # a replica of a real family (bpo.demo.tiny.families)
"""

from bpo.demo.tiny.families import FAMILIES, write_family
from bpo.demo.tiny.llava import write_tiny_llava

__all__ = ["FAMILIES", "write_family", "write_tiny_llava"]
