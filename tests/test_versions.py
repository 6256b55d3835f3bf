"""The lock (requirements/lock.txt), setup.py's ranges and the README's tested-versions line agree with each other
and with the environment the suite runs in."""

import ast
import os
import re
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from jobs import REPO
from launch import versions


def _setup_requirements():
    """setup.py's install_requires and its test extra, read from the file (installed metadata may be stale)."""
    with open(os.path.join(REPO, "setup.py")) as f:
        call = next(node for node in ast.walk(ast.parse(f.read())) if isinstance(node, ast.Call)
                    and getattr(node.func, "id", "") == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    return [Requirement(r) for r in kwargs["install_requires"] + kwargs["extras_require"]["test"]]


def _lock():
    with open(os.path.join(REPO, versions.LOCK)) as f:
        return versions.read_lock(f.read())


def test_every_requirement_is_pinned_within_its_range():
    pins = _lock()
    for req in _setup_requirements():
        name = versions.canonical(req.name)
        assert name in pins, f"{req.name} is required by setup.py but not pinned in {versions.LOCK}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{versions.LOCK} pins {name}=={pins[name]}, outside setup.py's {req}")


def test_the_readme_names_the_locked_versions():
    with open(os.path.join(REPO, "README.md")) as f:
        line = versions.readme_line(f.read(), versions.MARKERS["lock"])
    assert line is not None
    named = dict(re.findall(r"([a-z0-9-]+) (\d[^,\s]*)", line.split(":", 1)[1]))
    pins = _lock()
    assert set(named) == {n for n in versions.SHOWN if n in pins}
    for name, version in named.items():
        assert pins[name] == version, f"README says {name} {version}, {versions.LOCK} pins {pins[name]}"


@pytest.mark.skipif(os.environ.get("BPO_UNLOCKED") == "1", reason="make lock/test-latest: the lock is being renewed")
def test_the_environment_is_the_locked_one():
    pins, here = _lock(), versions.installed()
    for name in versions.SHOWN:
        assert here.get(name) == pins.get(name), f"{name}: installed {here.get(name)}, locked {pins.get(name)}"


def test_lock_lines_round_trip_and_bad_lines_are_named():
    text = versions.lock_text({"torch": "2.14.1", "pyyaml": "6.0.4"}, "2026-12-07")
    assert versions.read_lock(text) == {"torch": "2.14.1", "pyyaml": "6.0.4"}
    with pytest.raises(ValueError, match=r"line 2: 'torch>=2' is not"):
        versions.read_lock("# header\ntorch>=2\n")


def test_readme_line_is_replaced_between_its_markers_only():
    text = "a <!-- versions:lock -->old<!-- /versions:lock --> b <!-- versions:latest -->x<!-- /versions:latest -->"
    new = versions.replace_line(text, "versions:lock", "new")
    assert new == text.replace(">old<", ">new<")
    assert versions.readme_line(new, "versions:latest") == "x"
    with pytest.raises(ValueError, match="no `<!-- nope -->"):
        versions.replace_line(text, "nope", "y")


def test_names_are_compared_in_their_canonical_form():
    assert versions.canonical("PyYAML") == "pyyaml" and versions.canonical("pytest_xdist") == "pytest-xdist"
    assert all(versions.canonical(d.metadata["Name"]) in versions.installed() for d in metadata.distributions()
               if versions.canonical(d.metadata["Name"]) not in versions.UNLOCKED)
