"""bpo.plan's report and command line: the estimate as a table with a verdict (`python -m bpo.plan`; the formulas and
the flags are in bpo/plan/estimate.py's docstring, which is also the command's --help)."""

import argparse
from dataclasses import replace

from bpo.config import load_config
from bpo.engines.estimate import engine_advice
from bpo.plan import estimate as plan_estimate
from bpo.plan.catalog import BUILTIN, load_dims
from bpo.plan.estimate import (GiB, Setup, checkpoint_bytes, chosen, estimate, load_bytes, references,
                               setup_from_config, total_bytes, trainable_params)


def _fmt_count(x):
    return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.1f}M"


def report(dims, setup, markdown=False):
    """The table as text: one row per component, chosen rows marked, total, verdict, the other choices' totals."""
    rows, host_node = estimate(dims, setup)
    picked = {r[0] for r in chosen(rows, setup)}
    total = sum(r[2] for r in rows if r[0] in picked)
    pt = trainable_params(dims, setup)
    peak = max(total, load_bytes(dims, setup))
    if setup.adapters:
        where = "decoder + projector" + (" + vision" if setup.train_vision_tower else "")
        trained = (f"trained Pt = {_fmt_count(pt)} LoRA parameters (r={setup.lora_r} on every Linear of the "
                   f"{where}); base frozen" + (", decoder Linear weights in NF4" if setup.finetune == "qlora" else ""))
    else:
        trained = f"trained Pt = {_fmt_count(pt)}"
    lines = [
        f"{dims.name}: {_fmt_count(dims.total_params)} parameters (LLM {_fmt_count(dims.llm_params)}, vision "
        f"{_fmt_count(dims.vision_params)} {'trained' if setup.train_vision_tower else 'frozen'}, projector "
        f"{_fmt_count(dims.projector_params)}); {trained}",
        f"{setup.nodes} node(s) x {setup.gpus_per_node} GPUs = N {setup.ranks}; ZeRO-{setup.zero}, offload "
        f"{setup.offload}; {setup.micro_batch} x {setup.responses} responses, T = {setup.seq_len}, scoring "
        f"{setup.scoring}{f' (R = {setup.response_len})' if setup.scoring == 'shared' else ''}: S T = {setup.tokens} "
        f"tokens per forward; "
        f"gradient checkpointing {'on' if setup.grad_ckpt else 'off'}; optimizer {setup.optim}",
        "",
    ]
    if markdown:
        lines += ["| component | GiB per GPU | formula (bytes) |", "|---|---:|---|"]
    else:
        lines.append(f"  {'component':<58} {'GiB/GPU':>8}  formula (bytes)")
    for key, label, value, formula in rows:
        mark = "" if key in picked else " (alternative)"
        if markdown:
            lines.append(f"| {label}{mark} | {value / GiB:.2f} | {formula} |")
        else:
            lines.append(f"  {label + mark:<58} {value / GiB:>8.2f}  {formula}")
    verdict = (f"fits in {setup.gpu_mem_gib:g} GiB ({setup.gpu_mem_gib - peak / GiB:.1f} GiB spare)"
               if peak <= setup.gpu_mem_gib * GiB else
               f"DOES NOT FIT in {setup.gpu_mem_gib:g} GiB (short by {peak / GiB - setup.gpu_mem_gib:.1f} GiB)")
    if markdown:
        lines.append(f"| **total ({setup.head} head, {setup.reference} reference)** | **{total / GiB:.2f}** | "
                     f"{verdict} |")
    else:
        lines.append(f"  {'total (' + setup.head + ' head, ' + setup.reference + ' reference)':<58} "
                     f"{total / GiB:>8.2f}  {verdict}")
    others = []
    for head in ("fused", "naive"):
        for ref in references(setup):
            if (head, ref) != (setup.head, setup.reference):
                other = total_bytes(dims, replace(setup, head=head, reference=ref)) / GiB
                fits = "fits" if other <= setup.gpu_mem_gib else "does not fit"
                others.append(f"{head} head + {ref} reference {other:.1f} GiB ({fits})")
    lines += ["", "other choices: " + "; ".join(others)]
    if setup.finetune == "qlora":
        lines.append(f"loading: the whole NF4 model sits on every GPU until ZeRO-3 partitions it: "
                     f"{load_bytes(dims, setup) / GiB:.1f} GiB with the allowance (the verdict counts it)")
    if setup.offload != "none":
        lines.append(f"host memory for offloaded state: {host_node / GiB:.1f} GiB per node")
    lines.append(f"one checkpoint on disk: {checkpoint_bytes(dims, setup) / GiB:.0f} GiB")
    lines.append(engine_advice(dims, setup.gpus_per_node, setup.gpu_mem_gib))
    return "\n".join(lines), peak <= setup.gpu_mem_gib * GiB


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bpo.plan", description=plan_estimate.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="config.json, a directory with one, or " + ", ".join(BUILTIN)
                        + " (with --config: model.path when left out)")
    parser.add_argument("--config", help="a training config (YAML): every setting it decides is read from it, and "
                                         "the flags for those are refused; nodes, GPUs, GPU memory and the response "
                                         "length stay flags")
    parser.add_argument("overrides", nargs="*", help="with --config: section.key=value, applied after the file")
    parser.add_argument("--nodes", type=int, default=Setup.nodes)
    parser.add_argument("--gpus-per-node", type=int, default=Setup.gpus_per_node)
    parser.add_argument("--zero", type=int, default=Setup.zero, choices=(1, 2, 3))
    parser.add_argument("--offload", default=Setup.offload, choices=("none", "optimizer", "param"))
    parser.add_argument("--seq-len", type=int, default=Setup.seq_len, help="tokens per sequence, image tokens included")
    parser.add_argument("--micro-batch", type=int, default=Setup.micro_batch, help="examples per GPU per forward")
    parser.add_argument("--responses", type=int, default=Setup.responses, help="3 for BPO, 2 for DPO")
    parser.add_argument("--scoring", default=Setup.scoring, choices=("shared", "rows"), help="loss.scoring")
    parser.add_argument("--response-len", type=int, default=Setup.response_len,
                        help="tokens of one response (the shared layout computes the prompt once)")
    parser.add_argument("--chunk-size", type=int, default=Setup.chunk_size, help="loss.logprob_chunk_size")
    parser.add_argument("--head", default=Setup.head, choices=("fused", "naive"), help="loss.logprob_impl")
    parser.add_argument("--reference", default=Setup.reference, choices=("cached", "live", "adapters_off"),
                        help="cached = train.ref_cache set; adapters_off = LoRA's default without a cache")
    parser.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    parser.add_argument("--train-vision-tower", action="store_true")
    parser.add_argument("--optim", default=Setup.optim, choices=("adamw", "adamw_8bit", "paged_adamw_8bit"),
                        help="optim.name")
    parser.add_argument("--finetune", default=Setup.finetune, choices=("full", "lora", "qlora"),
                        help="model.finetune")
    parser.add_argument("--lora-r", type=int, default=Setup.lora_r, help="lora.r")
    parser.add_argument("--gpu-mem-gb", type=float, default=Setup.gpu_mem_gib,
                        help="usable memory per GPU in GiB (an H100 80GB reports 79.6 GiB)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_intermixed_args(argv)
    if not args.model and not args.config:
        parser.error("--model is required without --config")
    if args.overrides and not args.config:
        parser.error(f"overrides {args.overrides} need --config")
    if args.config:
        given = [d for d in CONFIG_DECIDES if getattr(args, d) != parser.get_default(d)]
        if given:
            parser.error(f"--config decides {', '.join(given)}: set them in the config or as section.key=value "
                         f"overrides")
    return args


# The Setup fields a training config decides (setup_from_config), named as parse_args names them.
CONFIG_DECIDES = ("zero", "offload", "seq_len", "micro_batch", "responses", "chunk_size", "head", "reference",
                  "grad_ckpt", "train_vision_tower", "optim", "finetune", "lora_r", "scoring")


def build_setup(args):
    """(model, Setup) from the command line: from --config and its overrides when given, else from the flags."""
    cluster = dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem_gb)
    if args.config:
        cfg = load_config(args.config, args.overrides)
        return args.model or cfg.model.path, setup_from_config(cfg, response_len=args.response_len, **cluster)
    return args.model, Setup(zero=args.zero, offload=args.offload,
                             seq_len=args.seq_len, micro_batch=args.micro_batch, responses=args.responses,
                             chunk_size=args.chunk_size, head=args.head, reference=args.reference,
                             grad_ckpt=args.grad_ckpt, train_vision_tower=args.train_vision_tower, optim=args.optim,
                             finetune=args.finetune, lora_r=args.lora_r, scoring=args.scoring,
                             response_len=args.response_len, **cluster)


def main(argv=None):
    args = parse_args(argv)
    model, setup = build_setup(args)
    try:
        text, fits = report(load_dims(model), setup, markdown=args.markdown)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(text)
    return 0 if fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
