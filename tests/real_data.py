"""Where the published benchmark files live (/work/shared/real_data/SOURCES.md): CI puts a copy of shared/ beside
the repository (REPO/../shared/real_data); elsewhere set BPO_REAL_DATA. Tests that need them skip, saying so."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def real_data_dir():
    for where in (os.path.join(REPO, "..", "shared", "real_data"), os.environ.get("BPO_REAL_DATA", "")):
        if where and os.path.isdir(where):
            return os.path.abspath(where)
    return None


def real_path(*parts):
    """The path of a published file, or skip the test with the reason."""
    root = real_data_dir()
    if root is None:
        pytest.skip("the published benchmark files are not here: no REPO/../shared/real_data and BPO_REAL_DATA unset")
    path = os.path.join(root, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is not in the real-data folder")
    return path
