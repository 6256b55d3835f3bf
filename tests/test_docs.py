"""The docs hold together with the code: every link in README.md and docs/ leads to a file, every page or section the
code cites exists, and the tables that name what the code has (model families, config keys) name exactly that.

The memory tables and the tested-versions lines are generated and checked elsewhere (tests/test_plan.py,
tests/test_versions.py)."""

import dataclasses
import glob
import os
import re
import typing

from bpo.config import load_config
from bpo.demo.tiny import FAMILIES
from bpo.demo.tiny import families as families_mod
from jobs import REPO

PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
# Where code cites the docs: comments, docstrings and messages.
CODE = ("bpo", "slurm", "launch", "configs", "benchmarks", "tests", "ds_configs")
CODE_FILES = ("Makefile", "setup.py")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _read(path):
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def _code_files():
    paths = list(CODE_FILES)
    for top in CODE:
        for root, _, files in os.walk(os.path.join(REPO, top)):
            paths += [os.path.relpath(os.path.join(root, f), REPO) for f in files
                      if f.endswith((".py", ".sh", ".yaml", ".json", ".md"))]
    return sorted(paths)


def _headings(path):
    return [line.lstrip("#").strip() for line in _read(path).split("\n") if line.startswith("#")]


def _flat(text):
    """A quoted section name as a comment wraps it: line breaks and comment markers removed."""
    return re.sub(r"\s*\n\s*(#\s*)?", " ", text).strip()


def test_docs_exist_and_the_readme_is_short():
    assert {"docs/README.md", "docs/layout.md", "docs/testing.md", "docs/eval_formats.md"} <= set(PAGES)
    assert len(_read("README.md").split("\n")) <= 160


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(_read(page)):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(REPO, os.path.dirname(page), target.split("#")[0]))
            if not os.path.exists(path):
                broken.append(f"{page}: {target}")
    assert not broken, f"links to nothing: {broken}"


def test_every_page_and_section_the_code_cites_exists():
    """A docs page the code names (docs/<page>.md) must exist, and a section it cites in double quotes after README
    or after a page's path must be a heading of that file (one that starts with the words cited)."""
    missing = []
    for path in _code_files() + PAGES:
        text = _read(path)
        for page in re.findall(r"\bdocs/[\w.-]+\.md\b", text):
            if not os.path.exists(os.path.join(REPO, page)):
                missing.append(f"{path}: {page}")
        for page, section in re.findall(r"\b(README|docs/[\w.-]+\.md),?\s+(?:#\s*)?\"([^\"]+)\"", text):
            page = "README.md" if page == "README" else page
            section = _flat(section)
            if os.path.exists(os.path.join(REPO, page)) and not any(h.startswith(section) for h in _headings(page)):
                missing.append(f'{path}: {page} "{section}"')
    assert not missing, f"cited pages or sections that do not exist: {missing}"


def _table_column(text, column):
    """The cells of one column of every Markdown table row in `text` (header and rule rows left out)."""
    cells = []
    for line in text.split("\n"):
        if line.startswith("|") and not line.startswith("|---"):
            cells.append(re.split(r"(?<!\\)\|", line)[column].strip())
    return cells[1:] if cells else cells


def test_the_families_page_names_the_families_the_code_replicates():
    """docs/families.md's table and bpo.demo.tiny.families' table name the same published checkpoints, and that
    module's table names every family `python -m bpo.demo.tiny --family` builds."""
    module_table = families_mod.__doc__.split("| family |", 1)[1]
    module_table = "| family |" + module_table.split("\n\n", 1)[0]
    assert set(_table_column(module_table, 1)) == set(FAMILIES)
    replicated = set(_table_column(module_table, 2))
    docs_table = _read("docs/families.md").split("| family |", 1)[1].split("\n\n", 1)[0]
    named = {c.strip() for cell in _table_column("| family |" + docs_table, 2) for c in cell.split(",")}
    assert named == replicated


# Names the docs use beside config keys that are not keys: what a run's identity records besides them
# (bpo/run_record.py: the data file's contents, the global batch the split multiplies to).
NOT_KEYS = {"data.contents", "train.global_batch"}
FILE_SUFFIXES = {"py", "sh", "md", "json", "jsonl", "yaml", "txt", "jinja", "png", "gz"}


def test_every_config_key_the_docs_name_exists():
    """A `section.key` in code spans of README.md and docs/ names a key of bpo/config.py's tree (a mapping-valued
    key, such as one holding free-form options, takes any sub-key)."""
    cfg = load_config()
    sections = {f.name for f in dataclasses.fields(cfg)}
    unknown = []
    for page in PAGES:
        text = _read(page)
        # code spans, and overrides given on command lines (`section.key=value`, in code blocks too)
        spans = re.findall(r"`([^`\n]+)`", text) + re.findall(r"(?<![\w/.-])([a-z_]+\.[a-z_0-9.]+)=", text)
        for span in spans:
            for key in re.findall(r"(?<![\w/.-])([a-z_]+(?:\.[a-z_0-9]+)+)(?![\w*/-])", span):
                parts = key.split(".")
                if parts[0] not in sections or parts[-1] in FILE_SUFFIXES or key in NOT_KEYS:
                    continue
                nodes = [type(cfg)]  # the classes a value at this depth may have (a union: any of them)
                for part in parts:
                    if not all(dataclasses.is_dataclass(n) for n in nodes):
                        break  # a mapping: its keys are whatever it is given
                    hints = [typing.get_type_hints(n) for n in nodes if part in {f.name for f in dataclasses.fields(n)}]
                    if not hints:
                        unknown.append(f"{page}: {key}")
                        break
                    nodes = [c for h in hints for c in (typing.get_args(h[part]) or (h[part],))]
    assert not unknown, f"config keys the docs name that bpo/config.py lacks: {sorted(set(unknown))}"
