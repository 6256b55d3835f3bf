"""Every module of the package imports on a CPU machine (GPU-only code must guard its imports)."""

import importlib
import pkgutil

import pytest

import bpo

MODULES = sorted(m.name for m in pkgutil.walk_packages(bpo.__path__, prefix="bpo."))


def test_the_package_has_its_modules():
    for name in ("bpo.train", "bpo.loss", "bpo.ref_cache.store", "bpo.generate_blind", "bpo.export.job", "bpo.evaluate",
                 "bpo.ops.logprobs", "bpo.data.encode"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)
