"""bpo.model.moe on a module-per-expert model: which blocks become ZeRO-3 leaf modules (the replicas of real MoE families,
whose experts are fused, are in tests/families/test_moe.py)."""

import pytest
from torch import nn


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(4, 4)

    def forward(self, x):
        return self.w(x)


class ModulePerExpertMoe(nn.Module):
    """The remote-code layout (DeepSeek-V2/V3, Mixtral before transformers 5): one module per expert, each called only
    for the tokens routed to it."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 3)
        self.experts = nn.ModuleList([Expert() for _ in range(3)])


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"mlp": ModulePerExpertMoe()}), nn.Linear(4, 4)])


def test_leaf_modules_found_or_named():
    from deepspeed.utils import get_z3_leaf_modules

    from bpo.model.moe import leaf_module_classes, set_leaf_modules

    toy = Toy()
    assert leaf_module_classes(toy) == ["ModulePerExpertMoe"]  # found by its `experts` ModuleList
    assert leaf_module_classes(toy, ["Linear"]) == ["Linear", "ModulePerExpertMoe"]
    with pytest.raises(ValueError, match="z3_leaf_modules.*NoSuchBlock"):
        leaf_module_classes(toy, ["NoSuchBlock"])
    assert set_leaf_modules(toy) == ["ModulePerExpertMoe"]
    assert get_z3_leaf_modules(toy) == [toy.layers[0]["mlp"]]
