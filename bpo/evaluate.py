"""Evaluate a model's harmlessness: generate on a test set, judge each response, write a report.

Single process:  python bpo/evaluate.py --config FILE eval.model_path=RUN/hf_model eval.test_file=test.json
Many GPUs:       deepspeed --num_gpus 8 bpo/evaluate.py --config FILE ...
Test sets:       eval.format=mmsafe_po | mm_safetybench (directory) | spa_vl | figstep (CSV) | vlguard (test.json);
                 a file or a hub dataset folder with eval.split (docs/eval_formats.md)
On a server:     python bpo/evaluate.py --config FILE decode.engine=vllm decode.server_url=http://HOST:8000/v1 ...
Judges:          eval.judge.type=refusal (offline rules) | openai (eval.judge.url, .model, .api_key_env) | hf (.path)

Metrics (the BPO paper's): safety rate = share of responses judged safe; pairwise accuracy = how often the model,
shown the chosen and rejected responses in a seeded random order, names the harmless one; implicit reward accuracy
= share of test pairs where beta-free margin (log pi - log pi_ref)(chosen) > (...)(rejected). MM-SafetyBench reports
attack success rate per scenario and image type, SPA-VL HarmEval its unsafe rate.

Generation is batched, split over ranks and resumable (OUTPUT/generations.parts/); with decode.engine=vllm each prompt
goes to an OpenAI-compatible server as chat messages with the image inline (bpo/engines/server.py), and the local
model directory supplies the tokenizer and chat template the replies are checked against. The judge runs on rank 0, and the
openai judge caches verdicts on disk so a rerun pays nothing twice. Outputs: OUTPUT/results.jsonl (id, prompt,
response, verdict, judge output, pairwise answer), OUTPUT/report.json and OUTPUT/report.md.
"""

import dataclasses
import json
import os
import sys

if not __package__:  # run as a file, as the deepspeed launcher does: put the repo root on the path so `bpo` imports
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bpo import cli
from bpo.runtime import dist
from bpo.runtime.atomic import write_text
from bpo.config import TRANSPORT_KEYS, check_model_dir, load_config
from bpo.data.conversation import Turn
from bpo.data.records import Record, enforce_max_image_pixels
from bpo.engines.server import ServerError, adds_bos, chat_messages, connect
from bpo.runtime.faults import maybe_slow
from bpo.ref_cache.fingerprint import model_fingerprint
from bpo.runtime.digest import digest_of
from bpo.engines.hf import generate, load_generator
from bpo.runtime.shards import TokenRate, check_settings, run_sharded, write_jsonl_atomic
from bpo.eval import adapters, metrics
from bpo.eval.metrics import WITHHELD
from bpo.data.encode import encode_prompt, render_prompt
from bpo.eval.pairwise import PairwiseItem, pairwise_prompt, score_pairwise
from bpo.data.usable import usable_records
from bpo.data.dataset import PreferenceDataset, split_by_kind
from bpo.data.shared import make_collate
from bpo.model.load import load_model
from bpo.model.scorer import SequenceScorer, choose_layout, model_inputs
from bpo.ops.logprobs import describe_impl, response_mask, sequence_logps
from bpo.ref_cache.store import CachedReference
from bpo.model.reference import LiveReference
from bpo.eval.judges import JudgeItem, RefusalJudge, build_judge
from bpo.data.chat import load_chat


def parse_args(argv=None):
    return cli.parse_job_args(__doc__, argv)


def load_examples(ecfg, image_root, dcfg):
    """The test set's usable examples (bad ones printed and skipped), then, with eval.modality_probe, a copy of each
    one that has an image, asked without it: id "<id>#no_image", meta image_withheld and probe_of."""
    examples, bad = adapters.load_test_set(ecfg.format, ecfg.test_file, image_root, ecfg.split, dcfg.image_cache,
                                           allow_outside_root=dcfg.allow_outside_image_root,
                                           max_image_pixels=dcfg.max_image_pixels)
    for b in bad:
        dist.print0(f"skipping {b}")
    if ecfg.limit:
        examples = examples[:ecfg.limit]
    if not examples:
        raise SystemExit(f"no usable examples in {ecfg.test_file}")
    if ecfg.modality_probe:
        examples = examples + [
            dataclasses.replace(text_only(e), id=f"{e.id}#no_image", image=None, chosen=None, rejected=None,
                                meta=dict(e.meta, **{WITHHELD: True, "probe_of": e.id}))
            for e in examples if e.image is not None]
    return examples


def as_record(example, turns=None):
    """An EvalExample seen as a training Record (image path already joined), so prompts encode exactly alike."""
    return Record(id=example.id, turns=turns or example.turns, image=example.image, chosen=example.chosen or "",
                  rejected=example.rejected or "", blind=None, meta=example.meta,
                  source=example.meta.get("source", example.id))


def text_only(example):
    """The example with its image marker dropped from the turns: for prompts that quote the conversation as text."""
    return dataclasses.replace(example, turns=[Turn(t.role, t.text, False) for t in example.turns])


def decode_records(model, chat, cfg, records, batch, seed, max_new_tokens):
    """[(text, new tokens, finish reason, error)] for the records' prompts (with their images) from the configured
    engine: `model` is the in-process model (decode.engine=hf) or a bpo.engines.server.ServerEngine."""
    processor = chat.processor
    prompts = [encode_prompt(r, chat, "", with_image=True) for r in records]
    if cfg.decode.engine == "hf":
        decode = type(cfg.decode)(**{**vars(cfg.decode), "max_new_tokens": max_new_tokens})
        out = generate(model, chat, prompts, decode, seed, synced=cfg.decode.zero3)
        return [(g.text, g.new_tokens, "stop" if g.stopped else "length", "") for g in out]
    requests = [(chat_messages(chat.messages(r.turns, with_image=True), r.image), ids,
                 adds_bos(processor.tokenizer, render_prompt(r, chat))) for r, (ids, _, _) in zip(records, prompts)]
    replies = model.chat(requests, seeds=[cfg.decode.seed + i for i in batch],  # per example, not per batch
                         wheres=[f"example {r.id}" for r in records], max_new_tokens=max_new_tokens,
                         template_kwargs=chat.template_kwargs)
    return [(r.text, r.new_tokens, r.finish_reason, r.error) for r in replies]


def generation_rows(batch, examples, model, chat, cfg, seed):
    """Response (and, for pairs, the pairwise answer) of each example in one batch."""
    ecfg = cfg.eval
    exs = [examples[i] for i in batch]
    out = decode_records(model, chat, cfg, [as_record(e) for e in exs], batch, seed, cfg.decode.max_new_tokens)
    rows = []
    for e, (text, n, finish, error) in zip(exs, out):
        rows.append({"id": e.id, "prompt": render_prompt(as_record(e), chat), "image": e.image, "meta": e.meta,
                     "response": text, "new_tokens": n, "finish_reason": finish})
        if error:
            rows[-1]["generation_error"] = error
    paired = [k for k, e in enumerate(exs) if e.chosen is not None]  # the image-withheld copies have no pair
    if ecfg.pairwise and paired:
        queries = [pairwise_prompt(text_only(exs[k]), ecfg.pairwise_seed) for k in paired]
        records = [as_record(exs[k], [Turn("user", q, exs[k].image is not None)])
                   for k, (q, _) in zip(paired, queries)]
        answers = decode_records(model, chat, cfg, records, [batch[k] for k in paired], seed,
                                 ecfg.pairwise_max_new_tokens)
        for k, (_, chosen_first), answer in zip(paired, queries, answers):
            rows[k].update(pairwise_answer=answer[0], pairwise_chosen_first=chosen_first)
    return rows


def reward_examples(examples, cfg, chat):
    """The examples whose pairs can be scored under data.max_length, by the rule every job shares
    (bpo.data.usable): any other stops the run unless data.skip_bad, which leaves it out of reward accuracy only."""
    records, _, _ = usable_records([as_record(e) for e in examples], [], chat, "", cfg.data.max_length,
                                   ("chosen", "rejected"), cfg.data.skip_bad, cfg.eval.test_file)
    keep = {r.id for r in records}
    return [e for e in examples if e.id in keep]


@torch.no_grad()
def reward_margins(examples, cfg, model_path, chat):
    """Per example: (log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected), on this rank's slice.

    Both models are scored exactly as in training (same encoding, head and reduction); the reference comes from
    eval.ref_cache when set (checked against the test file), else from model.path. One replica per rank."""
    records = [as_record(e) for e in examples]
    mine = list(range(dist.rank(), len(records), dist.world_size()))
    dataset = PreferenceDataset(records, chat, "", cfg.data.max_length, responses=("chosen", "rejected"))
    device = dist.device()
    head = dict(impl=cfg.loss.logprob_impl, chunk_size=cfg.loss.logprob_chunk_size)  # scored exactly as in training
    dist.print0(describe_impl(cfg.loss.logprob_impl, cfg.loss.logprob_chunk_size, device))
    policy = SequenceScorer(load_model(cfg.model, path=model_path), **head).to(device).eval()
    if cfg.eval.ref_cache:
        reference = CachedReference(cfg.eval.ref_cache, cfg, chat.processor, data_file=cfg.eval.test_file,
                                    image_root=cfg.eval.image_root or cfg.data.image_root)
        reference.check_ids(records, ("chosen", "rejected"))
    else:
        ref_model = load_model(cfg.model, path=cfg.train.ref_model_path or cfg.model.path)
        reference = LiveReference(SequenceScorer(ref_model, **head).to(device).eval(),
                                  cfg.loss.reduction)
    layout, why = choose_layout(cfg.loss.scoring, policy.model)
    dist.print0(why)
    collate = make_collate(layout, chat.pad_id)
    out = {}
    for i in mine:
        batch = collate([dataset[i]])
        inputs = model_inputs(batch, device)
        logps = sequence_logps(policy(**inputs), response_mask(inputs["labels"]), cfg.loss.reduction)
        ref = reference(batch, inputs)
        pc, pr, _ = split_by_kind(logps - ref, batch)
        out[records[i].id] = float(pc[0] - pr[0])
    return out


def gather_dict(local):
    if not dist.is_initialized():
        return local
    parts = [None] * dist.world_size()
    torch.distributed.all_gather_object(parts, local)
    return {k: v for p in parts for k, v in p.items()}


def build_report(cfg, examples, rows, verdicts, margins, judge_desc):
    """The set's own numbers on the examples as published (with their images; harmful prompts only), then the
    modality probe and, for benign prompts, over-refusal."""
    fmt = cfg.eval.format
    by_id = {v.id: v for v in verdicts}
    shown = [e for e in examples if not e.meta.get(metrics.WITHHELD)]
    harmful = [e for e in shown if not e.meta.get("benign")]
    harmful_verdicts = [by_id[e.id] for e in harmful]
    report = {"model": cfg.eval.model_path or cfg.model.path, "test_file": cfg.eval.test_file,
              "format": fmt, "judge": judge_desc, "n": len(shown), "engine": cfg.decode.engine,
              "safety": metrics.safety_rate(harmful_verdicts)}
    if fmt == "mm_safetybench":
        report["mm_safetybench"] = metrics.mm_safetybench_asr(harmful, harmful_verdicts)
    elif fmt == "spa_vl":
        report["spa_vl"] = metrics.spa_vl_unsafe_rate(harmful, harmful_verdicts)
    elif fmt in ("figstep", "vlguard"):
        key = metrics.CATEGORY_KEY[fmt]
        report[fmt] = {"per_" + key: metrics.grouped(metrics.join_verdicts(harmful, harmful_verdicts), key,
                                                     "safety_rate", "safe")}
    if len(shown) < len(examples):  # harmful prompts only: benign ones have their own numbers below
        probed = [e for e in examples if not e.meta.get("benign")]
        report["modality_probe"] = metrics.modality_gap(probed, [by_id[e.id] for e in probed],
                                                        metrics.CATEGORY_KEY[fmt])
    benign = [e for e in examples if e.meta.get("benign")]
    if benign:
        refusal = RefusalJudge().judge  # the refusal rule reads "answered" here: these prompts should be answered
        text = {r["id"]: r["response"] for r in rows}
        refused = {v.id: v.label == "safe" for v in refusal([JudgeItem(e.id, "", None, text[e.id]) for e in benign])}
        report["benign"] = metrics.benign_rates(benign, refused)
    if any("pairwise_answer" in r for r in rows):
        report["pairwise"] = score_pairwise(PairwiseItem(r["id"], r["pairwise_chosen_first"], r["pairwise_answer"])
                                            for r in rows if "pairwise_answer" in r)
    if margins:
        values = list(margins.values())
        report["implicit_reward"] = {"n": len(values), "accuracy": sum(m > 0 for m in values) / len(values),
                                     "mean_margin": sum(values) / len(values),
                                     # the pairs data.skip_bad left out
                                     "not_scored": sum(e.chosen is not None for e in examples) - len(values)}
    return report


def markdown(report):
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    s = report["safety"]
    lines = [f"# Evaluation of {report['model']}", "",
             f"Test set: {report['test_file']} ({report['format']}, {report['n']} examples). Judge: {report['judge']}. "
             f"Generated with the {report['engine']} engine.",
             "", "| metric | value | counts |", "|---|---|---|",
             f"| safety rate | {pct(s['safety_rate'])} | {s['safe']} safe / {s['parsed']} judged, "
             f"{s['unparsable']} unparsable |"]
    if "pairwise" in report:
        p = report["pairwise"]
        lines.append(f"| pairwise accuracy | {pct(p['accuracy'])} | {p['correct']} / {p['parsed']} parsed, "
                     f"{p['unparsable']} unparsable ({pct(p['accuracy_unparsable_wrong'])} counting those wrong) |")
    if "implicit_reward" in report:
        r = report["implicit_reward"]
        skipped = f" ({r['not_scored']} left out by data.skip_bad)" if r.get("not_scored") else ""
        lines.append(f"| implicit reward accuracy | {pct(r['accuracy'])} | {r['n']} pairs{skipped}, mean margin "
                     f"{r['mean_margin']:.3f} |")
    for key, rate in (("mm_safetybench", "asr"), ("spa_vl", "unsafe_rate")):
        if key in report:
            overall = report[key]["overall"]
            lines.append(f"| {key} {rate} | {pct(overall[rate])} | {overall['parsed']} judged, "
                         f"{overall['unparsable']} unparsable |")
            for group, table in report[key].items():
                if group == "overall":
                    continue
                for name, c in table.items():
                    lines.append(f"| &nbsp;&nbsp;{group[4:]} {name} | {pct(c[rate])} | {c['parsed']} judged |")
    for key in ("figstep", "vlguard"):
        for group, table in report.get(key, {}).items():
            for name, c in table.items():
                lines.append(f"| &nbsp;&nbsp;{key} {group[4:]} {name}: safety rate | {pct(c['safety_rate'])} | "
                             f"{c['parsed']} judged, {c['unparsable']} unparsable |")
    for side, b in report.get("benign", {}).items():
        lines.append(f"| benign prompts ({side.replace('_', ' ')}): helpfulness | {pct(b['helpfulness'])} | "
                     f"{b['refused']} of {b['n']} refused (over-refusal {pct(b['over_refusal_rate'])}, refusal rule) |")
    if "modality_probe" in report:
        lines += ["", "Modality probe: safety rate with the image and with it withheld (gap = with - without).", "",
                  "| category | with image | image withheld | gap | judged (with / without) |", "|---|---|---|---|---|"]
        for name, g in report["modality_probe"].items():
            gap = "n/a" if g["gap"] is None else f"{100 * g['gap']:+.1f} pt"
            lines.append(f"| {name} | {pct(g['with_image']['safety_rate'])} | "
                         f"{pct(g['image_withheld']['safety_rate'])} | {gap} | {g['with_image']['parsed']} / "
                         f"{g['image_withheld']['parsed']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    ecfg = cfg.eval
    model_path = ecfg.model_path or cfg.model.path
    if not ecfg.test_file or not model_path:
        raise SystemExit("set eval.test_file and eval.model_path (or model.path)")
    if cfg.decode.zero3:
        raise SystemExit("evaluation keeps one model replica per rank (decode.zero3=false); for a model larger than "
                         "one device, serve it with a tensor-parallel server: decode.engine=vllm "
                         "decode.server_url=... (slurm/vllm_serve.sh)")
    judge = build_judge(ecfg.judge)  # fail on a bad judge config before any model loads
    check_model_dir(model_path, "eval.model_path" if ecfg.model_path else "model.path")
    enforce_max_image_pixels(cfg.data.max_image_pixels)
    chat = load_chat(model_path, cfg.data.chat_template, cfg.model.trust_remote_code,
                     cfg.data.chat_template_kwargs)  # ChatTemplateError: stop here
    dist.init_distributed()
    dist.print0(chat.describe())
    os.makedirs(ecfg.output_dir, exist_ok=True)
    examples = load_examples(ecfg, ecfg.image_root or cfg.data.image_root, cfg.data)
    scored = None  # the examples implicit reward accuracy scores, decided now: not after hours of generation
    if ecfg.reward_accuracy and any(e.chosen is not None for e in examples):
        scored = reward_examples([e for e in examples if e.chosen is not None], cfg, chat)

    parts = os.path.join(ecfg.output_dir, "generations.parts")
    model_digest = dist.on_rank0(lambda: digest_of(model_fingerprint(model_path)))  # one rank reads the weights
    check_settings(parts, {"model": model_digest, "test": [e.id for e in examples],
                           "decode": {k: v for k, v in vars(cfg.decode).items() if k not in TRANSPORT_KEYS},
                           "pairwise": [ecfg.pairwise, ecfg.pairwise_seed, ecfg.pairwise_max_new_tokens],
                           "chat_template": chat.template_digest})
    try:
        if cfg.decode.engine == "hf":
            model = load_generator(cfg.model, model_path, cfg.decode.zero3)
        else:
            model = connect(cfg.decode, model_path, chat.tokenizer, list(chat.stop_ids))
        rate = TokenRate()

        def work(k, batch):
            rows = generation_rows(batch, examples, model, chat, cfg, cfg.decode.seed + k)
            rate.add(sum(r["new_tokens"] for r in rows))
            return rows

        rows = run_sharded(parts, len(examples), cfg.decode.batch_size, 1, work=work, idle=None, desc="generate",
                           crash_point="eval_shards", postfix=rate.postfix)
        model = None  # free the generator before the reward models load
    except ServerError as e:
        raise SystemExit(f"error: {e}") from None

    margins = {}
    if scored:
        margins = gather_dict(reward_margins(scored, cfg, model_path, chat))

    def judge_and_report():  # rank 0 alone; judging every answer (a model or a server) can take hours
        maybe_slow("judge")
        verdicts = judge.judge([JudgeItem(r["id"], text_only(e).prompt_text, e.image, r["response"])
                                for r, e in zip(rows, examples)])
        for row, v in zip(rows, verdicts):
            row.update(verdict=v.label, judge_output=v.raw)
            if row["id"] in margins:
                row["reward_margin"] = margins[row["id"]]
        report = build_report(cfg, examples, rows, verdicts, margins, judge.describe())
        write_jsonl_atomic(os.path.join(ecfg.output_dir, "results.jsonl"), rows)
        for name, text in (("report.json", json.dumps(report, indent=1)), ("report.md", markdown(report))):
            write_text(os.path.join(ecfg.output_dir, name), text)
        print(markdown(report), flush=True)

    # The other ranks poll for rank 0's marker instead of waiting in a barrier that BPO_DIST_TIMEOUT_S would end.
    dist.on_rank0_polled(judge_and_report, os.path.join(ecfg.output_dir, "judge"), "to judge and report")


if __name__ == "__main__":
    cli.run(main)
