"""Score every response of a dataset with the frozen reference model once, so training never loads it.

Single process:  python bpo/ref_logprobs.py --config FILE cache.output_dir=DIR
Many GPUs:       deepspeed --num_gpus 8 bpo/ref_logprobs.py --config FILE cache.output_dir=DIR
CPU, 2 ranks:    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bpo/ref_logprobs.py --config configs/smoke.yaml \
                     cache.output_dir=smoke/ref_cache

Scores exactly as training does (same dataset encoding, truncation, image preprocessing, `SequenceScorer` head and
reduction); the model is sharded with ZeRO-3 inference, so a reference larger than one device fits, and examples are
split over ranks shard by shard. Train with `train.ref_cache=DIR`.

Resumable: each shard file is written atomically and carries the digest of the cache's fingerprint, and the
manifest is marked complete only after all exist. A restart checks every shard that is there (readable, the
expected example ids, this fingerprint) and redoes only the missing or damaged ones; a manifest that cannot be read
is written again, since the shards vouch for themselves.

The records scored are the usable ones by bpo.data.usable, the rule training applies: with data.skip_bad=true the
same records are left out here and there.
"""

import os
import sys

if not __package__:  # run as a file, as the deepspeed launcher does: put the repo root on the path so `bpo` imports
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bpo import cli
from bpo.config import check_model_dir, load_config, require
from bpo.data.chat import load_chat
from bpo.data.dataset import PreferenceDataset, split_by_kind
from bpo.data.encode import blank_image_example
from bpo.data.records import RESPONSE_KEYS, drop_cut_blind, enforce_max_image_pixels, load_records
from bpo.data.shared import make_collate
from bpo.data.usable import usable_records
from bpo.model import lora
from bpo.model.load import load_model
from bpo.model.scorer import SequenceScorer, choose_layout, model_inputs
from bpo.ops.logprobs import describe_impl, response_mask, sequence_logps
from bpo.ref_cache import store as ref_cache
from bpo.runtime import dist
from bpo.runtime.digest import digest_of
from bpo.runtime.ds_configs import inference_config
from bpo.runtime.faults import maybe_crash
from bpo.runtime.shards import lockstep


def parse_args(argv=None):
    return cli.parse_job_args(__doc__, argv)


def build_scorer(cfg, blank):
    import deepspeed

    ds = inference_config(cfg.model)  # ds_configs/zero3_inference.json, as ZeRO-3 generation reads it
    # QLoRA's reference is its 4-bit base: the cache holds what training's adapters-off forward would compute.
    model = load_model(cfg.model, path=cfg.train.ref_model_path or cfg.model.path, ds_config=ds,
                       quantize=cfg.model.finetune == "qlora")
    model.requires_grad_(False)
    scorer = SequenceScorer(model, impl=cfg.loss.logprob_impl, chunk_size=cfg.loss.logprob_chunk_size, blank=blank,
                            zero3=True)
    engine, *_ = deepspeed.initialize(model=scorer, config=ds)
    engine.eval()
    return engine


@torch.no_grad()
def score_shard(engine, dataset, indices, batch_size, cfg, collate):
    """Sequence log-probs (n,) for each kind over one shard's examples; blind is NaN where absent."""
    out = {k: [] for k in ref_cache.KINDS}
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start:start + batch_size]])
        inputs = model_inputs(batch, engine.device)
        token_logps = engine(**inputs)  # (R, T-1)
        mask = response_mask(inputs["labels"])  # (R, T-1)
        logps = sequence_logps(token_logps, mask, cfg.loss.reduction).float().cpu()
        chosen, rejected, blind = split_by_kind(logps, batch)
        blind = torch.where(batch["has_blind"], blind, torch.full_like(blind, float("nan")))
        for kind, values in zip(ref_cache.KINDS, (chosen, rejected, blind)):
            out[kind].append(values)
    return {k: torch.cat(v) for k, v in out.items()}


def dummy_forward(engine, dataset, collate):
    """ZeRO-3 needs every rank in every forward; a rank without work scores one example and discards it."""
    with torch.no_grad():
        engine(**model_inputs(collate([dataset[0]]), engine.device))


def prepare_output(out_dir, manifest, shard_ids, fingerprint_digest):
    """Rank 0: create or check the cache directory; returns the shard numbers still to do, each damaged one named."""
    os.makedirs(out_dir, exist_ok=True)
    old = None
    if os.path.exists(os.path.join(out_dir, "manifest.json")):
        try:
            old = ref_cache.read_manifest(out_dir)
        except ref_cache.CacheError as e:
            print(f"warning: {e}\nwriting it again: the shards carry their own fingerprint and are checked one by "
                  f"one", flush=True)
    if old is not None:
        diff = ref_cache.describe_mismatch(old["fingerprint"], manifest["fingerprint"])
        if diff or old["num_shards"] != manifest["num_shards"]:
            raise ref_cache.CacheError(
                f"{out_dir} holds a cache for other settings:\n  "
                + "\n  ".join(diff or [f"num_shards {old['num_shards']} in cache vs {manifest['num_shards']} now"])
                + "\nChoose another cache.output_dir or delete it.")
    pending = []
    for i, ids in enumerate(shard_ids):
        path = os.path.join(out_dir, ref_cache.SHARD_FORMAT.format(i))
        problem = ref_cache.shard_problem(path, ids, fingerprint_digest)
        if problem is not None:
            if problem != "missing":
                print(f"redoing {path}: {problem}", flush=True)
            pending.append(i)
    if old is None or (pending and old.get("complete")):
        ref_cache.write_manifest(out_dir, manifest)  # complete=False until every shard is good again
    return pending


def main(argv=None):
    from tqdm import tqdm

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    require(cfg, "model.path", "data.train_file", "cache.output_dir")
    lora.require_platform(cfg.model)  # QLoRA, FlexAttention: CUDA only: say so before anything starts
    model_path = cfg.train.ref_model_path or cfg.model.path
    check_model_dir(model_path, "train.ref_model_path" if cfg.train.ref_model_path else "model.path")
    enforce_max_image_pixels(cfg.data.max_image_pixels)
    # Before any process group or weights: a checkpoint without a usable chat template is a config error.
    chat = load_chat(model_path, cfg.data.chat_template, cfg.model.trust_remote_code,
                     cfg.data.chat_template_kwargs)
    dist.init_distributed()
    world, rank = dist.world_size(), dist.rank()
    out_dir = cfg.cache.output_dir
    dist.print0(chat.describe())
    dist.print0(describe_impl(cfg.loss.logprob_impl, cfg.loss.logprob_chunk_size, dist.device()))
    processor, pad_id = chat.processor, chat.pad_id
    records, bad = load_records(cfg.data.train_file, image_root=cfg.data.image_root,
                                check_images=cfg.data.check_images,
                                allow_outside_root=cfg.data.allow_outside_image_root,
                                max_image_pixels=cfg.data.max_image_pixels, split=cfg.data.split,
                                image_cache=cfg.data.image_cache)
    if not cfg.data.keep_cut_blind:  # exactly what training scores
        records, _ = drop_cut_blind(records)
    records, _, bad = usable_records(records, bad, chat, cfg.data.image_root, cfg.data.max_length, RESPONSE_KEYS,
                                     cfg.data.skip_bad, cfg.data.train_file)
    if not records:
        raise SystemExit(f"no usable records in {cfg.data.train_file}")
    dataset = PreferenceDataset(records, chat, cfg.data.image_root, cfg.data.max_length)

    fp = ref_cache.fingerprint(cfg, processor, cfg.data.train_file, model_path)
    shard_size = cfg.cache.shard_size
    shards = [list(range(s, min(s + shard_size, len(records)))) for s in range(0, len(records), shard_size)]
    shard_ids = [[records[j].id for j in shard] for shard in shards]
    manifest = {"format": ref_cache.FORMAT_VERSION, "complete": False, "fingerprint": fp,
                "num_shards": len(shards), "num_examples": len(records)}

    def shard_path(i):
        return os.path.join(out_dir, ref_cache.SHARD_FORMAT.format(i))

    # Decided once by rank 0: a rank looking on its own could count shards written moments ago in this same run.
    pending = dist.on_rank0(lambda: prepare_output(out_dir, manifest, shard_ids, digest_of(fp)))
    dist.print0(f"reference cache {out_dir}: {len(records)} examples in {len(shards)} shards, "
                f"{len(shards) - len(pending)} already done, {world} rank(s)")
    engine = build_scorer(cfg, blank_image_example(chat)) if pending else None
    if engine is not None:
        layout, why = choose_layout(cfg.loss.scoring, engine.module.model)
        dist.print0(why)
        collate = make_collate(layout, pad_id, cfg.train.max_tokens_per_sequence)
    bar = tqdm(total=len(records), initial=len(records) - sum(len(shards[i]) for i in pending), unit="ex",
               desc="ref logprobs", disable=rank != 0, dynamic_ncols=True)
    bs = cfg.cache.batch_size

    def forwards(i):
        return -(-len(shards[i]) // bs)

    def do(i, written):  # the rank's `written`-th shard: one per round
        values = score_shard(engine, dataset, shards[i], bs, cfg, collate)
        ref_cache.write_shard(shard_path(i), shard_ids[i], values, fingerprint_digest=digest_of(fp))
        maybe_crash("ref_shards", written)

    for in_round in lockstep(pending, forwards, do, idle=lambda: dummy_forward(engine, dataset, collate)):
        bar.update(sum(len(shards[i]) for i in in_round))
    bar.close()
    dist.barrier()
    if rank == 0:
        missing = [i for i in range(len(shards)) if not os.path.exists(shard_path(i))]
        if missing:
            raise SystemExit(f"shards {missing} are missing after the run; rerun to finish them")
        manifest.update(complete=True, shards_done=len(shards))
        ref_cache.write_manifest(out_dir, manifest)
        print(f"reference cache complete: {out_dir}", flush=True)
    dist.barrier()


if __name__ == "__main__":
    cli.run(main)
