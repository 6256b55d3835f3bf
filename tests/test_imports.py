"""Every module of the package imports on a CPU machine (GPU-only code must guard its imports)."""

import importlib
import os
import pkgutil

import pytest
from setuptools import find_packages

import bpo

MODULES = sorted(m.name for m in pkgutil.walk_packages(bpo.__path__, prefix="bpo."))


def test_the_package_has_its_modules():
    for name in ("bpo.train", "bpo.loss", "bpo.ref_cache.store", "bpo.generate_blind", "bpo.export.job", "bpo.evaluate",
                 "bpo.ops.logprobs", "bpo.data.encode"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


def test_every_package_directory_is_a_package():
    """A directory of modules without __init__.py imports as a namespace package here, yet setup.py's find_packages
    leaves it out of a wheel (and a .gitignore pattern once dropped bpo/demo/__init__.py from the repository)."""
    package = os.path.dirname(bpo.__file__)
    bare = [os.path.relpath(d, package) for d, dirs, files in os.walk(package)
            if "__pycache__" not in d and any(f.endswith(".py") for f in files) and "__init__.py" not in files]
    assert not bare, f"add an __init__.py to {bare}"
    assert set(find_packages(os.path.dirname(package), include=["bpo", "bpo.*"])) >= {
        m for m in MODULES if os.path.isdir(os.path.join(os.path.dirname(package), *m.split(".")))}
