"""The tested versions: the lock `make venv` installs from, and the README lines that say what was tested.

    python -m launch.versions lock     # after the whole suite passed in this interpreter's environment (make lock)
    python -m launch.versions latest   # after the fast subset passed on the newest releases (make test-latest)

Run with the interpreter of the environment that was tested (`.venv-latest/bin/python -m launch.versions ...`): its
installed distributions are what get written. `lock` writes `requirements/lock.txt` (a pip constraints file: one
`name==version` a line, bpo itself left out) and the README's tested-versions line; `latest` writes only the
README's newest-releases line, so the lock stays what the whole suite passed with.
"""

import argparse
import datetime
import os
import platform
import re
import sys
from importlib import metadata

from bpo.runtime.atomic import write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = "requirements/lock.txt"
README = "README.md"
# The packages the README line names: what a user's run depends on most, in the order a user reads them.
SHOWN = ("torch", "torchvision", "transformers", "deepspeed", "kernels", "peft", "tokenizers", "accelerate",
         "bitsandbytes", "triton", "safetensors")
MARKERS = {"lock": "versions:lock", "latest": "versions:latest"}


# Not part of what is tested: bpo itself, and the installer's own tools, which every new venv brings at its own version.
UNLOCKED = {"bpo", "pip", "setuptools", "wheel"}


def installed():
    """{canonical name: version} of every distribution in this environment but UNLOCKED."""
    found = {}
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name not in UNLOCKED:
            found[name] = dist.version
    return dict(sorted(found.items()))


def canonical(name):
    """The PEP 503 form of a distribution name (what pip compares)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_text(versions, today):
    lines = [f"# The environment the whole suite passed with ({today}, Python {platform.python_version()}, "
             f"{platform.machine()}): `make venv` installs with `-c` on this file.",
             "# Regenerate from the newest releases setup.py allows, with the suite run against them: make lock"]
    return "\n".join(lines + [f"{name}=={version}" for name, version in versions.items()]) + "\n"


def read_lock(text):
    """{canonical name: version} of a lock file's `name==version` lines."""
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        if not sep or not version:
            raise ValueError(f"{LOCK} line {number}: {line!r} is not `name==version`")
        pins[canonical(name)] = version
    return pins


def summary(versions, today, what):
    """The README line: the shown packages' versions, and what passed with them on which day."""
    shown = ", ".join(f"{name} {versions[name]}" for name in SHOWN if name in versions)
    return f"{what} ({today}, Python {platform.python_version()}): {shown}"


def replace_line(text, key, line):
    """`text` with the content between `<!-- KEY -->` and `<!-- /KEY -->` replaced by `line`."""
    pattern = re.compile(rf"(<!-- {re.escape(key)} -->)(.*?)(<!-- /{re.escape(key)} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"{README} has no `<!-- {key} -->...<!-- /{key} -->` markers")
    return pattern.sub(lambda m: m.group(1) + line + m.group(3), text, count=1)


def readme_line(text, key):
    """What stands between a README's markers (the tested-versions test compares it with the lock)."""
    match = re.search(rf"<!-- {re.escape(key)} -->(.*?)<!-- /{re.escape(key)} -->", text, re.S)
    return match.group(1) if match else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=sorted(MARKERS))
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    versions = installed()
    readme_path = os.path.join(REPO, README)
    with open(readme_path, encoding="utf-8") as f:
        readme = f.read()
    if args.what == "lock":
        write_text(os.path.join(REPO, LOCK), lock_text(versions, today))
        line = summary(versions, today, f"the whole suite, `{LOCK}`")
    else:
        line = summary(versions, today, "the fast subset (`make test-latest`) on the newest releases")
    write_text(readme_path, replace_line(readme, MARKERS[args.what], line))
    print(f"{args.what}: {line}", file=sys.stderr)


if __name__ == "__main__":
    main()
