"""Write BPO's blind responses: what the reference model says to each conversation with the image withheld.

Single process:  python bpo/generate_blind.py --config FILE [section.key=value ...]
Many GPUs:       deepspeed --num_gpus 8 bpo/generate_blind.py --config FILE blind.output_file=train_blind.jsonl
CPU, 2 ranks:    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bpo/generate_blind.py --config configs/smoke.yaml ...
On a server:     python bpo/generate_blind.py --config FILE decode.engine=vllm decode.server_url=http://HOST:8000/v1

The blinded input x_b is the same conversation rendered with the model's chat template, minus the image: no image
token, no pixel input; text such as "the person in the image" stays. Output: JSONL with every input record unchanged
plus `blind` ("ASSISTANT: ...", the shape of `chosen`) and `blind_meta` (model fingerprint, engine, decoding, seed,
new tokens and finish reason: "length" marks a response cut at decode.max_new_tokens). A record
that cannot be used (unparsable conversation, empty generation) gets `blind_error` and an empty `blind`, which
training refuses, instead of silently vanishing.

With decode.engine=vllm the prompts (the same rendered text) go to an OpenAI-compatible server instead
(bpo/engines/server.py); the local model directory still supplies the tokenizer and chat template.

Resumable: results land in OUTPUT.parts/shard_NNNNNN.jsonl, one file per `blind.batches_per_shard` batches, each
written atomically; a restart redoes only missing shards, and rank 0 merges them in input order at the end.
"""

import os
import sys
import time

if not __package__:  # run as a file, as the deepspeed launcher does: put the repo root on the path so `bpo` imports
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bpo import cli
from bpo.runtime import dist
from bpo.config import TRANSPORT_KEYS, check_model_dir, load_config, require
from bpo.data.formats import InlineImage
from bpo.engines.server import ServerError, adds_bos, connect
from bpo.ref_cache.fingerprint import data_digest, model_fingerprint
from bpo.runtime.digest import digest_of
from bpo.engines.hf import Generation, generate, load_generator
from bpo.runtime.shards import TokenRate, check_settings, run_sharded, write_jsonl_atomic
from bpo.data.encode import encode_prompt, render_prompt
from bpo.data.chat import load_chat
from bpo.data.records import load_records, read_raw_records


def parse_args(argv=None):
    return cli.parse_job_args(__doc__, argv)


def blinded_prompt(entry, chat, image_root):
    """((prompt_ids, {}, prompt_fields), None) for the conversation without its image, or (None, the reason it
    cannot be built)."""
    from jinja2 import TemplateError

    record, error = entry
    if record is None:
        return None, error
    try:
        prompt = encode_prompt(record, chat, image_root, with_image=False)
    except TemplateError as e:  # the template refuses this conversation (e.g. Gemma-3: roles must alternate)
        return None, f"the chat template cannot render it: {e}"
    assert not prompt[1], "a blinded prompt must carry no image tensors"
    return prompt, None


def decode_blind(model, chat, cfg, usable, prompts, entries, seed):
    """{item: (Generation, error)} from the configured engine; `model` is the in-process model (decode.engine=hf)
    or a bpo.engines.server.ServerEngine, which gets the same prompts as rendered text."""
    if cfg.decode.engine == "hf":
        out = generate(model, chat, [prompts[i][0] for i in usable], cfg.decode, seed, synced=cfg.decode.zero3)
        return {i: (g, "") for i, g in zip(usable, out)}

    processor = chat.processor
    texts = [render_prompt(entries[i][0], chat, with_image=False) for i in usable]
    replies = model.complete([(t, prompts[i][0][0], adds_bos(processor.tokenizer, t)) for t, i in zip(texts, usable)],
                             seeds=[cfg.decode.seed + i for i in usable],  # per record: independent of batching
                             wheres=[f"record {entries[i][0].id} ({entries[i][0].source})" for i in usable])
    return {i: (Generation(r.text, r.token_ids, r.finish_reason == "stop", r.new_tokens), r.error)
            for i, r in zip(usable, replies)}


def blind_rows(batch_index, batch, items, entries, model, chat, cfg, meta_base, rate=None):
    """Output rows of one batch: each input record plus its blind response (or the reason it has none)."""
    prompts = {i: blinded_prompt(entries[i], chat, cfg.data.image_root) for i in batch}
    usable = [i for i in batch if prompts[i][0] is not None]
    seed = cfg.decode.seed + batch_index  # per batch, so sampling does not depend on ranks or restarts
    generations = {}
    if usable:
        generations = decode_blind(model, chat, cfg, usable, prompts, entries, seed)
        if rate is not None:
            rate.add(sum(g.new_tokens for g, _ in generations.values()))
    elif cfg.decode.zero3:
        dummy_decode(model, chat, cfg)  # this call still counts as one of the lockstep forwards
    rows = []
    for i in batch:
        row = dict(items[i])
        g, served_error = generations.get(i, (None, ""))
        error = prompts[i][1] or served_error or None
        if error is None and not g.text:
            error = "empty generation"
        row["blind"] = "" if error else f"ASSISTANT: {g.text}"
        meta = dict(meta_base, seed=seed if cfg.decode.engine == "hf" else cfg.decode.seed + i)
        if error is None:
            # "length": cut at max_new_tokens, never ended (training leaves such responses out unless
            # data.keep_cut_blind). The ids are what the reference model wrote, kept so training scores exactly
            # them (absent when the server returns none).
            finish = "stop" if g.stopped else "length"
            meta.update(new_tokens=g.new_tokens, finish_reason=finish, hit_max_new_tokens=finish == "length")
            if g.token_ids is not None:
                meta["token_ids"] = g.token_ids
        row["blind_meta"] = meta
        if error:
            row["blind_error"] = error
        rows.append(row)
    return rows


def as_file_row(raw, record, image_root, source):
    """The input record as an output row. An image stored inline (parquet) becomes the name of its extracted file
    under data.image_root, so the output trains like any JSONL file, and a record without an id keeps the id its
    image bytes gave it (the file name would give another). SystemExit when the extracted file is outside the root."""
    image = raw.get("image")
    if not isinstance(image, InlineImage):
        return raw
    name = os.path.relpath(image, os.path.abspath(image_root or "."))
    if name.split(os.sep)[0] == "..":
        raise SystemExit(f"{source}: the input's images are stored inline and were extracted to "
                         f"{os.path.dirname(image)}, outside data.image_root ({image_root or 'the current directory'});"
                         f" the output names them as files read under data.image_root: set data.image_cache to "
                         f"data.image_root (or a folder under it)")
    row = dict(raw, image=name)
    return {"id": record.id, **row} if record is not None and "id" not in row else row


def dummy_decode(model, chat, cfg):
    """Under ZeRO-3 every rank must run every forward; a rank with nothing left decodes a one-token prompt."""
    generate(model, chat, [([chat.eos_id], {}, {})], cfg.decode, 0, synced=True)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    input_file = cfg.blind.input_file or cfg.data.train_file
    model_path = cfg.blind.model_path or cfg.model.path
    require(cfg, "blind.output_file")
    if not input_file or not model_path:
        raise SystemExit("set blind.input_file (or data.train_file) and blind.model_path (or model.path)")
    check_model_dir(model_path, "blind.model_path" if cfg.blind.model_path else "model.path")
    # Before any weights load: a checkpoint without a usable chat template is a config error (ChatTemplateError).
    chat = load_chat(model_path, cfg.data.chat_template, cfg.model.trust_remote_code,
                     cfg.data.chat_template_kwargs)
    dist.init_distributed()
    dist.print0(chat.describe())

    split, image_cache = (cfg.data.split, cfg.data.image_cache) if input_file == cfg.data.train_file else ("", "")
    items = read_raw_records(input_file, split, image_cache)  # [(source, dict)] in file order, every line kept
    records, bad = load_records(input_file, image_root=cfg.data.image_root, check_images=False,
                                allow_outside_root=cfg.data.allow_outside_image_root, split=split,
                                image_cache=image_cache)
    by_source = {r.source: r for r in records}
    reasons = {b.source: b.reason for b in bad}
    entries = [(by_source.get(src), reasons.get(src, "record could not be read")) for src, _ in items]
    # A line that is not a JSON object cannot be copied through; its row says where it was and why it has no blind.
    items = [as_file_row(raw, by_source.get(src), cfg.data.image_root, src) if isinstance(raw, dict)
             else {"source": src} for src, raw in items]

    settings = {
        # Hashed by rank 0 alone: every rank reading the model's weights at once multiplies the I/O by the ranks.
        **dist.on_rank0(lambda: {"input": data_digest(input_file, split),
                                 "model": digest_of(model_fingerprint(model_path))}),
        "decode": {k: v for k, v in vars(cfg.decode).items() if k not in TRANSPORT_KEYS},
        "batches_per_shard": cfg.blind.batches_per_shard, "format": 1,
        "chat_template": chat.template_digest,
    }
    parts_dir = cfg.blind.output_file + ".parts"
    check_settings(parts_dir, settings)
    meta_base = {"model": settings["model"], "model_path": os.path.abspath(model_path), "engine": cfg.decode.engine,
                 "decode": settings["decode"], "tokenizer": chat.tokenizer_digest}
    dist.print0(f"blind responses with {model_path}: {len(bad)} unusable records, decoding "
                f"{'sampled' if cfg.decode.do_sample else 'greedy'}, engine {cfg.decode.engine}, "
                f"zero3={cfg.decode.zero3}")

    try:
        if cfg.decode.engine == "hf":
            model = load_generator(cfg.model, model_path, cfg.decode.zero3)
        else:
            model = connect(cfg.decode, model_path, chat.tokenizer, list(chat.stop_ids))
            meta_base["server_model"] = model.served_name
        rate = TokenRate()
        t0 = time.time()
        rows = run_sharded(
            parts_dir, len(items), cfg.decode.batch_size, cfg.blind.batches_per_shard,
            work=lambda k, batch: blind_rows(k, batch, items, entries, model, chat, cfg, meta_base, rate),
            idle=(lambda: dummy_decode(model, chat, cfg)) if cfg.decode.zero3 else None,
            desc="blind", crash_point="blind_shards", postfix=rate.postfix)
    except ServerError as e:
        raise SystemExit(f"error: {e}") from None
    if rows is not None:
        write_jsonl_atomic(cfg.blind.output_file, rows)
        errors = [(r.get("id", r.get("source", f"#{i}")), r["blind_error"]) for i, r in enumerate(rows)
                  if "blind_error" in r]
        for rid, why in errors:
            print(f"record {rid}: no blind response ({why})", flush=True)
        print(f"wrote {cfg.blind.output_file}: {len(rows)} records, {len(errors)} without a blind response, "
              f"{time.time() - t0:.1f}s", flush=True)
    dist.barrier()


if __name__ == "__main__":
    cli.run(main)
