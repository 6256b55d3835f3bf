"""One preference-training step at LLaVA-1.5's input shape: bpo's rows and shared-prompt layouts, and TRL's DPOTrainer.

    make bench-venv                                  # .venv-bench: bpo's stack plus trl (not a test dependency)
    .venv-bench/bin/python benchmarks/step_bench.py [--steps 5 --rounds 3] [--no-record]

A ~20M-parameter LLaVA (bpo.demo.tiny: 512 wide, 8 layers, a CLIP tower on 336-pixel images in 14-pixel patches, so 576
image tokens per image), and MMSafe-PO-shaped data: multi-turn prompts of ~720 tokens with the image (MMSafe-PO's
test split averages 722), responses of ~50 tokens. fp32, one process, 2 examples per step, live reference model
(TRL's default; bpo's cached reference is faster still, see the reference-cache section). Every configuration runs
`--rounds` times in turn, each a fresh process of `--steps` steps, the first step of each process left out; then
once more with the heap sampler, for the peak heap allocation alone (the sampler slows a step).

Per configuration: median wall time of a step, median CPU time (all threads; steadier than wall time when other work
shares the cores), peak resident memory, peak heap allocation (what was allocated at once, whatever glibc keeps
resident after a free; benchmarks/heap_sampler), and positions computed per example (padding included: what the
forward really runs over; the rows layout runs one padded row per response, TRL two, the shared layout one sequence per
example). bpo runs as users run it (`deepspeed --num_gpus 1 bpo/train.py`, ZeRO-3 on one rank); TRL through its own
`DPOTrainer` defaults on plain PyTorch, which turn gradient checkpointing on, so bpo is also measured with
`model.gradient_checkpointing=true`: the memory comparison is only fair between those rows.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

from jobs import read_metrics, run_job, write_config  # noqa: E402
from record import markdown_table, update_section  # noqa: E402

THREADS = str(os.cpu_count())  # every configuration runs alone with all cores, the same for bpo and TRL
PROMPT_TOKENS, RESPONSE_TOKENS = 722, 51  # MMSafe-PO test split averages, image tokens included in the prompt

BPO_RUNS = {  # name -> overrides
    "bpo BPO, rows (3 rows per example)": ["loss.type=bpo", "loss.scoring=rows"],
    "bpo BPO, shared prompt": ["loss.type=bpo", "loss.scoring=shared"],
    "bpo BPO, shared prompt, packed": ["loss.type=bpo", "loss.scoring=shared", "train.max_tokens_per_sequence=4096"],
    "bpo BPO, shared prompt, gradient checkpointing": ["loss.type=bpo", "loss.scoring=shared",
                                                       "model.gradient_checkpointing=true"],
    "bpo DPO, rows": ["loss.type=dpo", "loss.scoring=rows"],
    "bpo DPO, shared prompt": ["loss.type=dpo", "loss.scoring=shared"],
    "bpo DPO, shared prompt, gradient checkpointing": ["loss.type=dpo", "loss.scoring=shared",
                                                       "model.gradient_checkpointing=true"],
}
TRL_RUN = "TRL DPOTrainer (its defaults: plain PyTorch, gradient checkpointing)"


def grow(text, filler, tokenizer, target):
    """`text` with sentences of `filler` appended until it is `target` tokens long (about)."""
    words = filler.split()
    i = 0
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < target:
        text += " " + words[i % len(words)]
        i += 1
    return text


def write_data(model_dir, data_dir, out, n):
    """n MMSafe-PO-shaped records (question with a history turn, chosen, rejected, blind) at the target lengths."""
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(model_dir).tokenizer
    rows = [json.loads(line) for line in open(os.path.join(data_dir, "train.jsonl"))][:n]
    filler = ("I would like to know more about this, since we talked about it before and I am still not sure what "
              "the best way to go about it is, so please explain it again in some detail.")
    answer = "I can explain that. There are several things to keep in mind here, and I will go through them in turn."
    image_tokens = (336 // 14) ** 2
    with open(out, "w") as f:
        for row in rows:
            question = row["question"].replace("<image>\n", "")
            history = grow("Hello, I have a question.", filler, tok, PROMPT_TOKENS - image_tokens - 60)
            row["question"] = (f"USER: {history} ASSISTANT: {answer} USER: <image>\n{question} ASSISTANT:")
            for key in ("chosen", "rejected"):
                row[key] = "ASSISTANT: " + grow(row[key].removeprefix("ASSISTANT: "), answer, tok, RESPONSE_TOKENS)
            row["blind"] = "ASSISTANT: " + grow("The picture shows it clearly.", answer, tok, RESPONSE_TOKENS)
            f.write(json.dumps(row) + "\n")
    return out


def heap_sampling(root, sample):
    """The environment of one run: with `sample`, every Python process it starts records its peak heap allocation
    in a fresh directory (benchmarks/heap_sampler), which is returned too (else None)."""
    env = {"OMP_NUM_THREADS": THREADS}
    if not sample:
        return None, env
    heap_dir = tempfile.mkdtemp(prefix="heap-", dir=root)
    return heap_dir, dict(env, BPO_BENCH_HEAP_DIR=heap_dir,
                          PYTHONPATH=os.pathsep.join([ROOT, os.path.join(HERE, "heap_sampler")]))


def peak_heap(heap_dir):
    """The largest peak among the processes of one run (the launcher's own is small); None when not sampled."""
    if heap_dir is None:
        return None
    return max(json.load(open(os.path.join(heap_dir, name)))["peak_heap_mb"] for name in os.listdir(heap_dir))


def bpo_run(config, root, name, overrides, steps, sample_heap):
    out = os.path.join(root, "runs", str(len(os.listdir(os.path.join(root, "runs")))))
    heap_dir, env = heap_sampling(root, sample_heap)
    run_job("train.py", config, [f"train.output_dir={out}", f"train.max_steps={steps}", *overrides], nproc=1,
            env=env, timeout=3600)
    rows = read_metrics(out)[1:]
    return {"step": [r["step_time"] for r in rows], "cpu": [r["cpu_time"] for r in rows],
            "rss": max(r["peak_mem_mb"] for r in read_metrics(out)), "heap": peak_heap(heap_dir),
            "positions": statistics.mean(r["positions"] for r in rows) / 2}


def trl_run(model_dir, data_file, image_root, root, steps, sample_heap):
    out = os.path.join(root, "trl.json")
    heap_dir, env = heap_sampling(root, sample_heap)
    subprocess.run([sys.executable, os.path.join(HERE, "trl_step.py"), model_dir, data_file, image_root, out,
                    str(steps)], check=True, env=dict(os.environ, **env))
    return dict(json.load(open(out)), heap=peak_heap(heap_dir))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    try:
        import trl
    except ImportError:
        raise SystemExit("trl is not installed here: run `make bench-venv` and use .venv-bench/bin/python") from None

    from bpo.demo.sample_data import write_sample_data
    from bpo.demo.tiny import write_tiny_llava

    load_before = os.getloadavg()[0]
    root = tempfile.mkdtemp(prefix="stepbench-")
    os.makedirs(os.path.join(root, "runs"))
    model = write_tiny_llava(os.path.join(root, "model"), hidden_size=512, num_layers=8, image_size=336,
                             patch_size=14)
    data_dir = write_sample_data(os.path.join(root, "data"))
    data = write_data(model, data_dir, os.path.join(root, "train.jsonl"), n=2 * (args.steps + 1))
    config = write_config(os.path.join(root, "cfg.yaml"), {
        "model": {"path": model, "dtype": "fp32"},
        "data": {"train_file": data, "image_root": os.path.join(data_dir, "images"), "max_length": 2048},
        "optim": {"lr": 1e-6},
        "train": {"ds_config": os.path.join(ROOT, "ds_configs/zero3_cpu.json"), "micro_batch_size": 2,
                  "grad_accum": 1, "plot": False, "tensorboard": False},
    })
    results = {name: [] for name in [*BPO_RUNS, TRL_RUN]}
    # One more round than asked, with the heap sampler: its thread takes glibc's arena lock every millisecond and
    # slows the step, so that round gives the peak heap allocation only, and the others the times and resident sets.
    for r in range(args.rounds + 1):
        sample = r == args.rounds
        for name, overrides in BPO_RUNS.items():
            results[name].append(bpo_run(config, root, name, overrides, args.steps + 1, sample))
            print(f"round {r + 1}: {name}: {results[name][-1]}", flush=True)
        results[TRL_RUN].append(trl_run(model, data, os.path.join(data_dir, "images"), root, args.steps + 1, sample))
        print(f"round {r + 1}: {TRL_RUN}: {results[TRL_RUN][-1]}", flush=True)

    def summary(runs):
        timed = [run for run in runs if run["heap"] is None]
        return (statistics.median(t for run in timed for t in run["step"]),
                statistics.median(t for run in timed for t in run["cpu"]),
                max(run["rss"] for run in timed), max(run["heap"] for run in runs if run["heap"] is not None),
                statistics.mean(run["positions"] for run in runs))

    stats = {name: summary(runs) for name, runs in results.items()}
    trl_step = stats[TRL_RUN][0]
    rows_step = stats["bpo BPO, rows (3 rows per example)"][0]
    table = markdown_table(
        ["configuration", "step median (s)", "vs TRL DPO", "vs bpo BPO rows", "CPU s / step", "peak RSS (MiB)",
         "peak heap allocated (MiB)", "positions computed per example"],
        [[name, f"{s:.2f}", f"{s / trl_step:.2f}x", f"{s / rows_step:.2f}x", f"{c:.2f}", f"{m:.0f}", f"{h:.0f}",
          f"{p:.0f}"] for name, (s, c, m, h, p) in stats.items()])
    table += (f"\n\n{args.rounds} rounds x {args.steps} measured steps per configuration, interleaved, then one "
              f"round for the peak heap allocation; 2 examples "
              f"per step, fp32, one process with {THREADS} threads, live reference; trl {trl.__version__}. Load "
              f"average at the start {load_before:.1f}, at the end {os.getloadavg()[0]:.1f} (1 min; the benchmark's "
              f"own process counts in the second). Peak RSS: the process's maximum resident set (getrusage), "
              f"freed blocks that glibc keeps included; peak heap allocated: the most bytes malloc had handed out "
              f"at once, sampled every millisecond (benchmarks/heap_sampler), the CPU counterpart of "
              f"torch.cuda.max_memory_allocated.")
    print(table)
    if not args.no_record:
        update_section("step", "Training step: rows vs shared-prompt layout vs TRL (benchmarks/step_bench.py)",
                       ".venv-bench/bin/python benchmarks/step_bench.py", table)
    subprocess.run(["rm", "-rf", root])


if __name__ == "__main__":
    main()
