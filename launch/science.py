"""The science demo behind `make demo`: does BPO beat DPO where only the image says what is harmful?

    python -m launch.science [--out demo] [--seeds 0 1 2] [--nproc 2]

Runs bpo's own commands on bpo.demo.world (docs/science_demo.md), each printed before it runs, its output in
OUT/logs/. Once: the starting checkpoint (`python -m bpo.demo.world model OUT/start`). Then per seed S, in OUT/seed_S/:

    world/           python -m bpo.demo.world data ... --seed S             (training files drawn by S; val, test fixed)
    base/            deepspeed bpo/train.py --config configs/science_sft.yaml     the SFT base -> base/hf_model
    world/pref_blind.jsonl   deepspeed bpo/generate_blind.py              the base's answers, image withheld
    ref_cache/       deepspeed bpo/ref_logprobs.py                        the base's log-probs of every response
    dpo/, bpo/       deepspeed bpo/train.py --config configs/science.yaml loss.type=dpo | bpo   -> */hf_model
    eval_base/, eval_dpo/, eval_bpo/   deepspeed bpo/evaluate.py          on world/test.json, offline refusal judge

DPO and BPO start from the same base, read the same file and cache and take the same steps; only loss.type
differs. At the end OUT/science.json (every score), OUT/science.md (the table) and OUT/science.png (the chart). A
rerun skips finished stages and the jobs resume their own partial work, so a killed demo continues where it stopped.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

from bpo.runtime.atomic import write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = {"base": "base (SFT)", "dpo": "DPO", "bpo": "BPO"}
# method -> (loss.type, training script, extra overrides). Tests add variants (tests/scripts/train_flipped_blind.py).
METHODS = {"dpo": ("dpo", "bpo/train.py", ()), "bpo": ("bpo", "bpo/train.py", ())}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stage:
    """One command of the chain: skipped when `done()` already holds, else run with its output in a log file."""

    def __init__(self, label, kind, cmd, done, log, after=None):
        self.label, self.kind, self.cmd, self.done, self.log, self.after = label, kind, cmd, done, log, after


def _exists(*parts):
    return lambda: os.path.exists(os.path.join(*parts))


def _cache_complete(cache_dir):
    def done():
        try:
            with open(os.path.join(cache_dir, "manifest.json")) as f:
                return bool(json.load(f).get("complete"))
        except OSError:
            return False
    return done


def chain(out, seeds, methods=METHODS, nproc=2, overrides=None, evaluate_base=True):
    """Every Stage of the demo, in order. overrides: {"sft" | "pref" | "eval": [section.key=value, ...]} added to
    those stages' commands (the slow test's shorter run)."""
    overrides = overrides or {}
    py = sys.executable
    ds = [os.path.join(os.path.dirname(py), "deepspeed"), "--num_gpus", str(nproc)]
    sft_cfg, pref_cfg = os.path.join(REPO, "configs/science_sft.yaml"), os.path.join(REPO, "configs/science.yaml")
    logs = os.path.join(out, "logs")
    start = os.path.join(out, "start")

    def job(script, config, *args):  # a master port per job, chosen when it starts
        return lambda: ds + ["--master_port", str(free_port()), os.path.join(REPO, script), "--config", config,
                             *args]

    stages = [Stage("starting checkpoint (tiny LLaVA, vision tower pretrained on the world's objects)", "start",
                    lambda: [py, "-m", "bpo.demo.world", "model", start], _exists(start, "config.json"),
                    os.path.join(logs, "start.log"))]
    for seed in seeds:
        d = os.path.join(out, f"seed_{seed}")
        world, images = os.path.join(d, "world"), os.path.join(d, "world", "images")
        base = os.path.join(d, "base", "hf_model")
        blind, cache = os.path.join(world, "pref_blind.jsonl"), os.path.join(d, "ref_cache")
        common = [f"data.image_root={images}", f"train.seed={seed}"]
        log = lambda name: os.path.join(logs, f"seed_{seed}_{name}.log")  # noqa: E731
        stages.append(Stage(f"seed {seed}: the world's data", "world",
                            lambda world=world, seed=seed: [py, "-m", "bpo.demo.world", "data", world, "--seed", str(seed)],
                            _exists(world, "test.json"), log("world")))
        stages.append(Stage(f"seed {seed}: SFT base", "sft", job(
            "bpo/train.py", sft_cfg, f"model.path={start}", f"data.train_file={os.path.join(world, 'sft.jsonl')}",
            f"train.output_dir={os.path.join(d, 'base')}", "train.resume=true", *common, *overrides.get("sft", [])),
            _exists(base, "config.json"), log("sft"), after=_export_if_missing(os.path.join(d, "base"))))
        pref = [f"model.path={base}", f"data.train_file={blind}", *common]
        stages.append(Stage(f"seed {seed}: blind responses (the base, image withheld)", "blind", job(
            "bpo/generate_blind.py", pref_cfg, *pref, f"blind.input_file={os.path.join(world, 'pref.jsonl')}",
            f"blind.output_file={blind}"), _exists(blind), log("blind")))
        stages.append(Stage(f"seed {seed}: reference cache (the base)", "cache", job(
            "bpo/ref_logprobs.py", pref_cfg, *pref, f"cache.output_dir={cache}"), _cache_complete(cache),
            log("cache")))
        for method, (loss_type, script, extra) in methods.items():
            run = os.path.join(d, method)
            stages.append(Stage(f"seed {seed}: {NAMES.get(method, method)} training", "pref", job(
                script, pref_cfg, *pref, f"loss.type={loss_type}", f"train.ref_cache={cache}",
                f"train.output_dir={run}", "train.resume=true", *overrides.get("pref", []), *extra),
                _exists(run, "hf_model", "config.json"), log(method), after=_export_if_missing(run)))
        for method in ["base", *methods] if evaluate_base else methods:
            model = base if method == "base" else os.path.join(d, method, "hf_model")
            ev = os.path.join(d, f"eval_{method}")
            stages.append(Stage(f"seed {seed}: evaluation of {NAMES.get(method, method)}", "eval", job(
                "bpo/evaluate.py", pref_cfg, f"model.path={base}", f"eval.model_path={model}",
                f"eval.test_file={os.path.join(world, 'test.json')}", f"eval.image_root={images}",
                f"eval.output_dir={ev}", f"eval.reward_accuracy={method != 'base'}", *common,
                *overrides.get("eval", [])), _exists(ev, "report.json"), log(f"eval_{method}")))
    return stages


def _export_if_missing(run_dir):
    """A training run killed between its last checkpoint and its export resumes as 'already complete' without
    exporting; export that checkpoint then."""
    def after():
        if not os.path.exists(os.path.join(run_dir, "hf_model", "config.json")):
            subprocess.run([sys.executable, "-m", "bpo.export", os.path.join(run_dir, "checkpoints"),
                            os.path.join(run_dir, "hf_model")], check=True, cwd=REPO, env=_env())
    return after


def _env():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key, value in (("DS_ACCELERATOR", "cpu"), ("OMP_NUM_THREADS", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(key, value)
    return env


def _clock(seconds):
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def run_stages(stages, echo=print, timings=None):
    """Run the stages not yet done, in order, with a line per stage giving the elapsed time and an ETA (the mean time
    of the stages of the same kind run so far, else of all). timings: a JSON file that keeps each stage's time
    across reruns (a resumed demo still knows what the whole chain took)."""
    t0, took = time.time(), {}
    kept = {}
    if timings and os.path.exists(timings):
        with open(timings) as f:
            kept = json.load(f)
    for i, stage in enumerate(stages, start=1):
        if stage.done():
            echo(f"== [{i}/{len(stages)}] {stage.label}: done already")
            continue
        left = stages[i - 1:]
        seen = [t for ts in took.values() for t in ts]
        if seen:
            mean = {k: sum(v) / len(v) for k, v in took.items()}
            eta = sum(mean.get(s.kind, sum(seen) / len(seen)) for s in left if not s.done())
            eta_text = f", ETA {_clock(eta)}"
        else:
            eta_text = ""
        echo(f"== [{i}/{len(stages)}] {stage.label} (elapsed {_clock(time.time() - t0)}{eta_text})")
        cmd = stage.cmd()
        echo("   " + " ".join(cmd))
        os.makedirs(os.path.dirname(stage.log), exist_ok=True)
        start = time.time()
        with open(stage.log, "w") as log:
            proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            with open(stage.log) as f:
                tail = f.read()[-4000:]
            raise SystemExit(f"{stage.label} failed ({proc.returncode}); its log is {stage.log}:\n{tail}")
        if stage.after:
            stage.after()
        took.setdefault(stage.kind, []).append(time.time() - start)
        if timings:
            kept[stage.label] = time.time() - start
            write_text(timings, json.dumps(kept, indent=1))
    return time.time() - t0


def report(out, seeds, methods=("base", *METHODS)):
    """Score every evaluation, summarize over seeds, write OUT/science.{json,md,png}; returns (summary, markdown)."""
    from bpo.demo import world_scores

    scores = {m: {s: world_scores.score(os.path.join(out, f"seed_{s}", f"eval_{m}", "results.jsonl"))
                  for s in seeds} for m in methods}
    summary = world_scores.summarize(scores)
    table = world_scores.markdown(summary, NAMES)
    n = scores[methods[0]][seeds[0]]["n"]
    lines = [f"Seeds {', '.join(map(str, seeds))}; mean ± sample standard deviation over seeds, each seed's value "
             f"in brackets. Test set: {n.get('harmful', 0)} harmful and {n.get('benign', 0)} benign pictures, and the "
             f"{n.get('harmful_no_image', 0)} harmful conversations with the picture withheld.", "", table]
    if "bpo" in summary and "dpo" in summary and len(seeds) > 1:
        beyond, diff = world_scores.beyond_spread(summary)
        per_seed = ", ".join(f"{b - d:+.3f}" for b, d in zip(summary["bpo"]["safety"]["values"],
                                                            summary["dpo"]["safety"]["values"]))
        lines.append(f"BPO - DPO safety rate: {diff:+.3f} on average (per seed: {per_seed}); beyond the seed spread "
                     f"(BPO's worst seed above DPO's best): {'yes' if beyond else 'no'}.")
    text = "\n".join(lines) + "\n"
    write_text(os.path.join(out, "science.json"), json.dumps({"scores": scores, "summary": summary}, indent=1))
    write_text(os.path.join(out, "science.md"), text)
    world_scores.plot(summary, os.path.join(out, "science.png"), NAMES)
    return summary, text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m launch.science", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nproc", type=int, default=2, help="ranks per job")
    parser.add_argument("--record", action="store_true",
                        help="also write the table, the machine and the time into BENCHMARKS.md (section science)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    load_before = os.getloadavg()
    timings = os.path.join(out, "timings.json")
    run_stages(chain(out, args.seeds, nproc=args.nproc), timings=timings)
    load_after = os.getloadavg()
    took = "unknown"  # the sum of every stage's own time, whichever run of the demo ran it
    if os.path.exists(timings):
        with open(timings) as f:
            took = _clock(sum(json.load(f).values()))
    _, text = report(out, args.seeds)
    print(f"\n{text}\nchart: {os.path.join(out, 'science.png')}; every score: {os.path.join(out, 'science.json')}; "
          f"chain time {took}")
    if args.record:
        sys.path.insert(0, os.path.join(REPO, "benchmarks"))
        import datetime

        import record

        loads = lambda la: "/".join(f"{x:.1f}" for x in la)  # noqa: E731
        record.replace_section("science", (
            f"## Science demo: BPO vs DPO on bpo.demo.world (launch/science.py)\n\n"
            f"`python -m launch.science --seeds {' '.join(map(str, args.seeds))} --record` (what `make demo` runs, "
            f"plus this record)\n\nMachine: {record.machine()}; {datetime.date.today().isoformat()}. Chain time "
            f"{took}, the sum of its stages' times ({len(args.seeds)} seeds, {args.nproc} ranks per job); "
            f"load average (1/5/15 min) {loads(load_before)} before, {loads(load_after)} after this invocation "
            f"(other work on the cores stretches the time, not the numbers: every job is deterministic on CPU in "
            f"fp32).\n\n{text}"))


if __name__ == "__main__":
    main()
