"""Where a run's numbers go: metrics.jsonl, TensorBoard, a progress bar and a PNG plot at the end.

Only rank 0 gets a real `RunLog`; every other rank gets `NullLog`, whose methods do nothing, so the training loop
calls the logger unconditionally and never asks which rank it is.
"""

import json
import os
import sys
import time

from bpo.runtime import dist
from bpo.runtime.atomic import write_text

PLOT_KEYS = [("loss", "loss"), ("rewards", "rewards/"), ("accuracy", "accuracies/"), ("margins", "margins/"),
             ("NLL of the chosen response", "nll/")]


class NullLog:
    def start(self, total_steps, initial_step=0):
        pass

    def log(self, step, metrics):
        pass

    def message(self, text):
        pass

    def close(self):
        pass


class RunLog(NullLog):
    def __init__(self, run_dir, tensorboard=True, plot=True, desc="train"):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.plot = plot
        self.desc = desc
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self.bar = None

    def start(self, total_steps, initial_step=0):
        from tqdm import tqdm

        self._truncate_after(initial_step)
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=self.desc, dynamic_ncols=True)
        self.t0 = time.time()

    def _truncate_after(self, step):
        """On resume, drop lines past the checkpoint: they belong to the run that was killed, and will be redone. A
        line that is not a JSON row (a kill in the middle of an append tears the last one) is dropped with a
        warning rather than ending the run: the resumed run writes that step again."""
        if not os.path.exists(self.path):
            return
        rows, bad = read_metrics(self.path)
        for lineno in bad:
            print(f"warning: {self.path}:{lineno} is not a JSON row (torn by a kill?); dropped", file=sys.stderr,
                  flush=True)
        write_text(self.path, (json.dumps(row) + "\n" for row in rows if row["step"] <= step))

    def log(self, step, metrics):
        record = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
        if self.bar is not None:
            shown = {"loss": f"{metrics.get('loss', float('nan')):.4f}"}
            if "accuracies/rejected" in metrics:  # an SFT run has no pairs to be right about
                shown["acc"] = f"{metrics['accuracies/rejected']:.2f}"
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(step - self.bar.n)

    def message(self, text):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.plot and os.path.exists(self.path):
            plot_metrics(self.path, os.path.join(self.run_dir, "metrics.png"))


def make_log(run_dir, **kwargs):
    return RunLog(run_dir, **kwargs) if dist.is_rank0() else NullLog()


def read_metrics(path):
    """(rows, line numbers that are not a JSON object with a "step") of a metrics.jsonl file."""
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
            else:
                bad.append(lineno)
    return rows, bad


def plot_metrics(jsonl_path, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, _ = read_metrics(jsonl_path)
    if not rows:
        return
    panels = []  # (title, keys) of the panels this run has numbers for (an SFT run: loss and NLL only)
    for title, prefix in PLOT_KEYS:
        keys = sorted({k for r in rows for k in r if k == prefix or (prefix.endswith("/") and k.startswith(prefix))})
        if keys:
            panels.append((title, keys))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, png_path)
