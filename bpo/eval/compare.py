"""Compare evaluated runs: one markdown table per benchmark and a PNG chart, from evaluate.py's report.json files.

    python -m bpo.eval.compare runs/base/eval_mmsb runs/bpo/eval_mmsb runs/base/eval_figstep ... --out cmp/

Each argument is an eval.output_dir (or its report.json). Reports are grouped by benchmark (the report's `format`),
one table each, a row per run in the order given. A run is named by --names, else by its evaluated model path.
Numbers from different judges are not comparable: the judge is a column, and a table whose rows used different
judges says so above it. Writes OUT/comparison.md and OUT/comparison.png (safety rate per benchmark and run; with
the modality probe, the rate with the image withheld beside it, hatched).
"""

import argparse
import json
import os
import sys

from bpo.runtime.atomic import write_text

# (column, function of a report -> value or None); rates are shown as percentages
_COLUMNS = (
    ("n", lambda r: r.get("n")),
    ("safety rate", lambda r: r["safety"].get("safety_rate")),
    ("ASR", lambda r: r.get("mm_safetybench", {}).get("overall", {}).get("asr")),
    ("unsafe rate", lambda r: r.get("spa_vl", {}).get("overall", {}).get("unsafe_rate")),
    ("safety, image withheld", lambda r: _probe(r, "image_withheld")),
    ("modality gap", lambda r: r.get("modality_probe", {}).get("overall", {}).get("gap")),
    ("helpfulness (benign)", lambda r: r.get("benign", {}).get("with_image", {}).get("helpfulness")),
    ("pairwise acc.", lambda r: r.get("pairwise", {}).get("accuracy")),
    ("implicit reward acc.", lambda r: r.get("implicit_reward", {}).get("accuracy")),
)
_COUNTS = {"n"}
_POINTS = {"modality gap"}  # a difference of rates: percentage points


def _probe(report, side):
    return report.get("modality_probe", {}).get("overall", {}).get(side, {}).get("safety_rate")


def load_report(path):
    """The report.json of an eval output directory (or the file itself); SystemExit naming what is missing."""
    file = os.path.join(path, "report.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            report = json.load(f)
    except OSError as e:
        raise SystemExit(f"error: cannot read {file}: {e}; pass evaluate.py's eval.output_dir") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {file} is not valid JSON (line {e.lineno}: {e.msg}); rerun evaluate.py") from None
    for key in ("format", "safety", "judge", "model"):
        if key not in report:
            raise SystemExit(f"error: {file} has no {key!r}: not a report.json written by bpo/evaluate.py")
    return report


def _cell(name, value):
    if value is None:
        return "n/a"
    if name in _COUNTS:
        return str(value)
    if name in _POINTS:
        return f"{100 * value:+.1f} pt"
    return f"{100 * value:.1f}%"


def tables(runs):
    """Markdown: a table per benchmark. runs: [(name, report)]."""
    by_format = {}
    for name, report in runs:
        by_format.setdefault(report["format"], []).append((name, report))
    out = ["# Comparison of evaluated runs", ""]
    for fmt, rows in by_format.items():
        columns = [(c, f) for c, f in _COLUMNS if any(f(r) is not None for _, r in rows)]
        out += [f"## {fmt}", ""]
        if len({r["judge"] for _, r in rows}) > 1:
            out += ["Judged by different judges: compare these rows with care.", ""]
        out.append("| run | " + " | ".join(c for c, _ in columns) + " | judge | test file |")
        out.append("|---" * (len(columns) + 3) + "|")
        for name, r in rows:
            cells = [_cell(c, f(r)) for c, f in columns]
            out.append(f"| {name} | " + " | ".join(cells) + f" | {r['judge']} | {r.get('test_file', '')} |")
        out.append("")
    return "\n".join(out)


def chart(runs, path):
    """Grouped bars: safety rate per benchmark (x) and run (bar); the image-withheld rate hatched beside it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    formats = list(dict.fromkeys(r["format"] for _, r in runs))
    names = list(dict.fromkeys(n for n, _ in runs))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(formats)), 4))
    for k, name in enumerate(names):
        for side, hatch, alpha in (("with_image", None, 1.0), ("image_withheld", "//", 0.45)):
            xs, ys = [], []
            for i, fmt in enumerate(formats):
                report = next((r for n, r in runs if n == name and r["format"] == fmt), None)
                value = None if report is None else (report["safety"].get("safety_rate") if side == "with_image"
                                                     else _probe(report, "image_withheld"))
                if value is not None:
                    xs.append(i - 0.4 + width * (k + 0.5) + (width / 4 if hatch else -width / 4))
                    ys.append(100 * value)
            if xs:
                ax.bar(xs, ys, width / 2, color=f"C{k}", alpha=alpha, hatch=hatch,
                       label=name if side == "with_image" else f"{name} (image withheld)")
    ax.set_xticks(range(len(formats)), formats)
    ax.set_ylabel("safety rate (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="eval output directories (or their report.json)")
    parser.add_argument("--names", help="comma-separated run names, one per report (default: the model paths)")
    parser.add_argument("--out", required=True, help="folder for comparison.md and comparison.png")
    args = parser.parse_args(argv)
    reports = [load_report(p) for p in args.reports]
    names = args.names.split(",") if args.names else [r["model"] for r in reports]
    if len(names) != len(reports):
        parser.error(f"--names has {len(names)} names for {len(reports)} reports")
    runs = list(zip(names, reports))
    os.makedirs(args.out, exist_ok=True)
    text = tables(runs)
    write_text(os.path.join(args.out, "comparison.md"), text)
    chart(runs, os.path.join(args.out, "comparison.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
