"""What a run records about itself: its identity (what its numbers depend on), checked at every resume, and the history
of its starts.

RUN/identity.json holds the training data's sha256 and record count and the value of every math key: each key of the
sections training reads (TRAINING_SECTIONS) except the OPERATIONAL ones, so a key added to those sections later is
compared by default. `--resume` refuses any difference, naming each, unless the key is listed in
train.resume_allow (`--allow-change KEY`; `data.contents` for the training data); an allowed change is applied and
becomes the run's identity from then on.

RUN/history/<UTC time>-start<n>.yaml is written at every start, first, resumed or refused: the command line, the
verdict, the changes allowed, and the whole config. config.yaml stays the config the run uses now: a refused start
never rewrites it.
"""

import datetime
import json
import os
import re
import sys

import yaml

from bpo.runtime.atomic import write_text
from bpo.config import Config, ConfigError, to_dict, with_absolute_paths
from bpo.data.records import read_raw_records
from bpo.ref_cache.fingerprint import data_digest

IDENTITY_NAME = "identity.json"
HISTORY_DIR = "history"
START_RE = re.compile(r"-start(\d+)\.yaml$")
DATA_KEY = "data.contents"  # the training data's bytes and record count, as one key for train.resume_allow

# The config sections train.py reads; decode, blind, cache, eval and build belong to other jobs.
TRAINING_SECTIONS = ("model", "lora", "data", "loss", "optim", "train")
# Keys that change no number of the run: where it writes, how often it saves, whether it resumes, what it
# exports at the end; and the ways of computing the same numbers that the invariance tests hold equal (log-prob head,
# scoring layout, packing, attention kernel, recomputation), which a resume after running out of memory may switch;
# and the split of the global batch into micro-batches, accumulation and ranks (GLOBAL_BATCH is compared instead).
# Every other key of TRAINING_SECTIONS changes the math, a key added later included.
OPERATIONAL = ("train.output_dir", "train.resume", "train.resume_allow", "train.save_every", "train.keep_checkpoints",
               "train.plot", "train.tensorboard", "train.export_16bit", "train.max_bad_steps",
               "lora.export",
               "loss.logprob_impl", "loss.logprob_chunk_size", "loss.scoring", "train.max_tokens_per_sequence",
               "model.attn_implementation", "model.gradient_checkpointing",
               "train.micro_batch_size", "train.grad_accum")
# Compared in place of the batch split: examples per optimizer step. A run may resume on another number of ranks with
# grad_accum changed to keep it (docs/checkpoints.md); the sampler gives each optimizer step the same examples
# whatever the split.
GLOBAL_BATCH = "train.global_batch"


class ResumeRefused(ConfigError):
    pass


def flat_keys(cfg):
    """{"section.key": value} for every key of TRAINING_SECTIONS (paths absolute, as config.yaml holds them)."""
    tree = to_dict(with_absolute_paths(cfg))
    return {f"{section}.{key}": value for section in TRAINING_SECTIONS for key, value in tree[section].items()}


def math_keys():
    """Every key that changes the math, from the config's own fields (a key added later is one by default), and
    GLOBAL_BATCH."""
    return sorted([k for k in flat_keys(Config()) if k not in OPERATIONAL] + [GLOBAL_BATCH])


def data_identity(data):
    """{"sha256", "records"} of the training data (`data`: the config's data section; a file, or a dataset folder's
    split; records: entries read, bad ones included)."""
    records = read_raw_records(data.train_file, data.split, data.image_cache)
    return {"sha256": data_digest(data.train_file, data.split), "records": len(records)}


def identity(cfg, world):
    flat = flat_keys(cfg)
    flat[GLOBAL_BATCH] = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    return {"config": {k: flat[k] for k in math_keys()}, "data": data_identity(cfg.data)}


def check_allow_list(cfg):
    unknown = [k for k in cfg.train.resume_allow if k != DATA_KEY and k not in math_keys()]
    if unknown:
        raise ConfigError(f"train.resume_allow names {unknown}, which are not keys a resume compares: give math keys "
                          f"(e.g. loss.beta) or {DATA_KEY}; operational keys (bpo.run_record.OPERATIONAL) may change "
                          f"freely")


def differences(saved, now):
    """[(key, saved value, value now)] for every math key and the data that differ."""
    out = []
    for key in sorted(set(saved["config"]) | set(now["config"])):
        old, new = saved["config"].get(key, "(not recorded)"), now["config"].get(key, "(not recorded)")
        if old != new:
            out.append((key, old, new))
    if saved["data"] != now["data"]:
        out.append((DATA_KEY, _describe_data(saved["data"]), _describe_data(now["data"])))
    return out


def _describe_data(d):
    return f"{d['records']} records, sha256 {d['sha256'][:16]}"


def read_identity(run_dir):
    try:
        with open(os.path.join(run_dir, IDENTITY_NAME), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def check_resume(cfg, resuming, world):
    """Rank 0, before config.yaml is written: compare this start with the run's identity and record the new one.

    Returns (notes, allowed changes as [(key, old, new)]). Raises ResumeRefused naming each difference not allowed."""
    run_dir = cfg.train.output_dir
    now = identity(cfg, world)
    saved = read_identity(run_dir) if resuming else None
    notes, changes = [], []
    if resuming and saved is None:
        notes.append(f"resume: {run_dir} has no {IDENTITY_NAME} (a run started before bpo recorded one): nothing to "
                     f"compare; this start's config and data become its identity")
    elif saved is not None:
        changes = differences(saved, now)
        refused = [c for c in changes if c[0] not in cfg.train.resume_allow]
        if refused:
            lines = "\n  ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in refused)
            raise ResumeRefused(
                f"refusing to resume {run_dir}: this start differs from the run in what its numbers depend on:\n  "
                f"{lines}\nResume with the run's own settings (config.yaml in the run directory), or accept each "
                f"change with --allow-change KEY (train.resume_allow=[...]); it is recorded in {HISTORY_DIR}/.")
        for k, old, new in changes:
            notes.append(f"resume: {k} changed, allowed by train.resume_allow: {old!r} -> {new!r}")
    write_text(os.path.join(run_dir, IDENTITY_NAME), json.dumps(now, indent=1, sort_keys=True) + "\n")
    return notes, changes


def next_start(run_dir):
    """This start's number: 1 + the highest the history holds."""
    folder = os.path.join(run_dir, HISTORY_DIR)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return 1 + max((int(m.group(1)) for m in map(START_RE.search, names) if m), default=0)


def write_history(cfg, start, verdict, changes=(), argv=None):
    """RUN/history/<UTC time>-start<n>.yaml: this start's command line, verdict, allowed changes and config."""
    run_dir = cfg.train.output_dir
    os.makedirs(os.path.join(run_dir, HISTORY_DIR), exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    entry = {"start": start, "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
             "command": list(sys.argv if argv is None else argv), "verdict": verdict,
             "allowed_changes": [{"key": k, "from": old, "to": new} for k, old, new in changes],
             "config": to_dict(with_absolute_paths(cfg))}
    path = os.path.join(run_dir, HISTORY_DIR, f"{now.strftime('%Y%m%dT%H%M%SZ')}-start{start}.yaml")
    write_text(path, yaml.safe_dump(entry, sort_keys=False))
    return path
