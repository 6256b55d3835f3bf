"""Write BPO's blind responses: what the reference model says to each conversation with the image withheld.

Single process:  python bpo/generate_blind.py --config FILE [section.key=value ...]
Many GPUs:       deepspeed --num_gpus 8 bpo/generate_blind.py --config FILE blind.output_file=train_blind.jsonl
CPU, 2 ranks:    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bpo/generate_blind.py --config configs/demo.yaml ...

The blinded input x_b is the same conversation rendered with the model's chat template, minus the image: no image
token, no pixel input; text such as "the person in the image" stays. Output: JSONL with every input record unchanged
plus `blind` ("ASSISTANT: ...", the shape of `chosen`) and `blind_meta` (model fingerprint, decoding, seed). A record
that cannot be used (unparsable conversation, empty generation) gets `blind_error` and an empty `blind`, which
training refuses, instead of silently vanishing.

Resumable: results land in OUTPUT.parts/shard_NNNNNN.jsonl, one file per `blind.batches_per_shard` batches, each
written atomically; a restart redoes only missing shards, and rank 0 merges them in input order at the end.
"""

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bpo import dist
from bpo.config import load_config, require
from bpo.faults import maybe_crash
from bpo.fingerprint import digest_of, file_digest, model_fingerprint
from bpo.generate import generate_texts, load_generator

SHARD_FORMAT = "shard_{:06d}.jsonl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args(argv)


def write_jsonl_atomic(path, rows):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def check_settings(parts_dir, settings):
    """A parts directory belongs to one set of settings; resuming with others would mix two runs in one file."""
    path = os.path.join(parts_dir, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise SystemExit(f"{parts_dir} holds shards made with other settings (differs in: {', '.join(diff)}). "
                             f"Delete it to start over, or choose another blind.output_file.")
    elif dist.is_rank0():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(settings, f, indent=1, sort_keys=True)
        os.replace(tmp, path)


def blinded_prompt(entry, processor, image_root):
    """(prompt_ids, image_inputs) of the conversation without its image, or the reason it cannot be built."""
    from bpo.data.encode import encode_prompt

    record, error = entry
    if record is None:
        return None, error
    prompt_ids, image_inputs = encode_prompt(record, processor, image_root, with_image=False)
    assert not image_inputs, "a blinded prompt must carry no image tensors"
    return prompt_ids, None


def run_shard(shard, items, entries, model, processor, cfg, batch_size, meta_base):
    """Generate every batch of one shard; returns output rows in input order."""
    rows = []
    for start in range(shard.start, shard.stop, batch_size):
        batch = range(start, min(start + batch_size, shard.stop))
        prompts = {i: blinded_prompt(entries[i], processor, cfg.data.image_root) for i in batch}
        usable = [i for i in batch if prompts[i][0] is not None]
        seed = cfg.decode.seed + start // batch_size
        texts = {}
        if usable:
            out, lengths = generate_texts(model, processor.tokenizer, [prompts[i][0] for i in usable],
                                          [{} for _ in usable], cfg.decode, seed, synced=cfg.decode.zero3)
            texts = {i: (t, n) for i, t, n in zip(usable, out, lengths)}
        elif cfg.decode.zero3:
            dummy_decode(model, processor, cfg)
        for i in batch:
            row = dict(items[i])
            error = prompts[i][1]
            if error is None and not texts[i][0]:
                error = "empty generation"
            row["blind"] = "" if error else f"ASSISTANT: {texts[i][0]}"
            meta = dict(meta_base, seed=seed)
            if error is None:
                meta.update(new_tokens=texts[i][1], hit_max_new_tokens=texts[i][1] >= cfg.decode.max_new_tokens)
            row["blind_meta"] = meta
            if error:
                row["blind_error"] = error
            rows.append(row)
    return rows


def dummy_decode(model, processor, cfg):
    """Under ZeRO-3 every rank must run every forward; a rank with nothing left decodes a one-token prompt."""
    generate_texts(model, processor.tokenizer, [[processor.tokenizer.eos_token_id]], [{}], cfg.decode, 0, synced=True)


def main(argv=None):
    from tqdm import tqdm
    from transformers import AutoProcessor

    from bpo.data.records import load_records, read_raw_records

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    input_file = cfg.blind.input_file or cfg.data.train_file
    model_path = cfg.blind.model_path or cfg.model.path
    require(cfg, "blind.output_file")
    if not input_file or not model_path:
        raise SystemExit("set blind.input_file (or data.train_file) and blind.model_path (or model.path)")
    dist.init_distributed()
    world, rank = dist.world_size(), dist.rank()

    items = read_raw_records(input_file)  # [(source, dict)] in file order, every line kept
    records, bad = load_records(input_file, image_root=cfg.data.image_root, check_images=False)
    by_source = {r.source: r for r in records}
    reasons = {b.source: b.reason for b in bad}
    entries = [(by_source.get(src), reasons.get(src, "record could not be read")) for src, _ in items]
    items = [raw for _, raw in items]

    settings = {
        "input": file_digest(input_file), "model": digest_of(model_fingerprint(model_path)),
        "decode": {k: v for k, v in vars(cfg.decode).items() if k != "zero3"},
        "batches_per_shard": cfg.blind.batches_per_shard, "format": 1,
    }
    parts_dir = cfg.blind.output_file + ".parts"
    if rank == 0:
        os.makedirs(parts_dir, exist_ok=True)
    dist.barrier()
    check_settings(parts_dir, settings)
    meta_base = {"model": settings["model"], "model_path": os.path.abspath(model_path), "decode": settings["decode"]}

    bs = cfg.decode.batch_size
    shard_size = bs * cfg.blind.batches_per_shard
    shards = [range(s, min(s + shard_size, len(items))) for s in range(0, len(items), shard_size)]
    done = {i for i in range(len(shards)) if os.path.exists(os.path.join(parts_dir, SHARD_FORMAT.format(i)))}
    pending = [i for i in range(len(shards)) if i not in done]
    dist.print0(f"blind responses for {len(items)} records ({len(bad)} unusable) with {model_path}: "
                f"{len(shards)} shards, {len(done)} already done, {world} rank(s), decoding "
                f"{'greedy' if not cfg.decode.do_sample else 'sampled'}, zero3={cfg.decode.zero3}")

    processor = AutoProcessor.from_pretrained(model_path, local_files_only=True,
                                              trust_remote_code=cfg.model.trust_remote_code)
    processor.tokenizer.padding_side = "left"
    model = load_generator(cfg.model, model_path, cfg.decode.zero3) if pending else None

    bar = tqdm(total=len(items), initial=sum(len(shards[i]) for i in done), unit="rec", desc="blind",
               disable=rank != 0, dynamic_ncols=True)
    t0 = time.time()
    for round_start in range(0, len(pending), world):
        in_round = pending[round_start:round_start + world]
        # Under ZeRO-3 every rank makes as many generate calls as the busiest rank of the round.
        calls = max(-(-len(shards[i]) // bs) for i in in_round)
        if rank < len(in_round):
            mine = in_round[rank]
            rows = run_shard(shards[mine], items, entries, model, processor, cfg, bs, meta_base)
            write_jsonl_atomic(os.path.join(parts_dir, SHARD_FORMAT.format(mine)), rows)
            calls -= -(-len(shards[mine]) // bs)
            maybe_crash("blind_shards", round_start // world + 1)
        if cfg.decode.zero3:
            for _ in range(calls):
                dummy_decode(model, processor, cfg)
        bar.update(sum(len(shards[i]) for i in in_round))
    dist.barrier()

    if rank == 0:
        merged = []
        for i in range(len(shards)):
            with open(os.path.join(parts_dir, SHARD_FORMAT.format(i))) as f:
                merged.extend(json.loads(line) for line in f if line.strip())
        if len(merged) != len(items):
            raise SystemExit(f"merged {len(merged)} rows but the input has {len(items)}; remove {parts_dir}")
        write_jsonl_atomic(cfg.blind.output_file, merged)
        errors = [(r.get("id", f"#{i}"), r["blind_error"]) for i, r in enumerate(merged) if "blind_error" in r]
        bar.close()
        for rid, why in errors:
            print(f"record {rid}: no blind response ({why})", flush=True)
        print(f"wrote {cfg.blind.output_file}: {len(merged)} records, {len(errors)} without a blind response, "
              f"{time.time() - t0:.1f}s", flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
