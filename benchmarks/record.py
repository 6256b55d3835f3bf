"""Write a benchmark's table into its own section of BENCHMARKS.md, with the machine it ran on."""

import datetime
import os
import platform
import re
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "BENCHMARKS.md")


def machine(cuda=None):
    """The card (CUDA runs) or the CPU model and core count, with the torch build."""
    if torch.cuda.is_available() if cuda is None else cuda:
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, no GPU, torch {torch.__version__}"


def update_section(name, title, command, table):
    """Replace (or append) the section between <!-- bench:NAME --> markers."""
    replace_section(name, f"## {title}\n\n`{command}`\n\nMachine: {machine()}; "
                          f"{datetime.date.today().isoformat()}.\n\n{table.strip()}")


def replace_section(name, markdown):
    """Put `markdown` (a whole section, heading included) between the NAME markers of BENCHMARKS.md."""
    body = f"<!-- bench:{name} -->\n{markdown.strip()}\n<!-- /bench:{name} -->"
    text = open(PATH).read() if os.path.exists(PATH) else "# Benchmarks\n\nEach section is written by its script.\n"
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body + "\n"
    tmp = PATH + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, PATH)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
