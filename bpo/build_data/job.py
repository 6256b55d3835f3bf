"""python -m bpo.build_data --config FILE [section.key=value ...]: text-only preference data -> MMSafe-PO records.

    python -m bpo.build_data --config build.yaml build.input_file=hh.jsonl build.output_file=mm/train.jsonl \\
        build.llm.url=http://127.0.0.1:8000/v1 build.llm.model=Qwen/Qwen2.5-7B-Instruct build.image.bank=bank/
    python -m bpo.data.inspect mm/train.jsonl --image-root mm/train_images

Reads build.input_file (bpo.build_data.read), runs every record through the stages (bpo.build_data.pipeline) with
build.llm.workers requests in flight, and writes
- build.output_file: the records that passed every stage, in input order (JSONL, atomic);
- build.image_dir (default OUTPUT_images): their images, the output's image root;
- OUTPUT.report.json: per stage, records in and out and drops by code; every dropped record with its origin,
  stage, reason and the fields it had (also printed, one line per stage);
- OUTPUT.parts/: finished shards (build.batches_per_shard batches of build.batch_size records), so a killed build
  reruns only what is missing; bound to the settings that decide the records (input bytes, stage backends,
  prompts, model, phrases, bank). Changing one needs a new parts directory, and the answer cache
  (build.llm.cache_dir, default OUTPUT.cache) then answers every request already made, so only the changed stage
  asks again.
Exit status 0 when at least one record was written, 1 when none survived (the report says why) or on an error.
"""

import dataclasses
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import yaml

from bpo import cli
from bpo.build_data.entity import build_recognizer
from bpo.build_data.images import build_images
from bpo.build_data.llm import ChatClient, LLMError
from bpo.build_data.pipeline import Builder
from bpo.build_data.read import read_input
from bpo.build_data.report import build_report, summary_lines
from bpo.build_data.rewrite import build_rewriter
from bpo.config import BUILD_TRANSPORT_KEYS, load_config, require_build
from bpo.ref_cache.fingerprint import data_digest
from bpo.runtime.atomic import write_text

FORMAT = 1  # of the parts' rows; bump when they change


def parse_args(argv=None):
    return cli.parse_job_args(__doc__, argv, launched=False, prog="python -m bpo.build_data")


def _in_order(pool, fn, items):
    futures = [pool.submit(fn, item) for item in items]
    try:
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:  # one fatal error (the endpoint is gone): drop what has not started
            f.cancel()
        raise


def main(argv=None):
    # Here, not at the top: bpo.runtime.shards brings torch (bpo.runtime.dist), seconds that --help and a config
    # error need not wait for.
    from bpo.runtime.shards import check_settings, run_sharded, write_jsonl_atomic

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    b = cfg.build
    require_build(b)
    output = b.output_file
    image_dir = b.image_dir or os.path.splitext(output)[0] + "_images"
    cache_dir = b.llm.cache_dir or output + ".cache"
    print(yaml.safe_dump({"build": _as_dict(b)}, sort_keys=False), end="", flush=True)

    sources, read_drops = read_input(b.input_file, b.input_format, b.input_split)
    uses_llm = "llm" in (b.entity.backend, b.rewrite.backend)
    client = ChatClient(b.llm, cache_dir) if uses_llm else None
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    os.makedirs(image_dir, exist_ok=True)
    recognizer, images, rewriter = build_recognizer(b, client), build_images(b, image_dir), build_rewriter(b, client)
    phrases = {k: v for k, v in b.replace.phrases.items() if v}
    for stage in (recognizer, images, rewriter):
        print(stage.describe(), flush=True)
    if client:
        print(f"endpoint: {client.describe()}", flush=True)
    print(f"read {b.input_file}: {len(sources)} records, {len(read_drops)} unreadable or repeated", flush=True)

    settings = {
        "format": FORMAT, "input": data_digest(b.input_file, b.input_split), "input_format": b.input_format,
        "image_dir": os.path.abspath(image_dir), "batch_size": b.batch_size,
        "batches_per_shard": b.batches_per_shard, "phrases": phrases,
        "llm": {k: v for k, v in vars(b.llm).items() if k not in BUILD_TRANSPORT_KEYS} if client else None,
        "entity": recognizer.settings(), "image": images.settings(), "rewrite": rewriter.settings(),
    }
    parts_dir = output + ".parts"
    check_settings(parts_dir, settings)
    builder = Builder(recognizer, images, rewriter, phrases, image_dir)

    def postfix():
        s = dict(client.stats) if client else {}
        return f"{s['requests']} requests, {s['cache_hits']} cached" if s else ""

    with ThreadPoolExecutor(max_workers=b.llm.workers, thread_name_prefix="bpo-build") as pool:
        try:
            rows = run_sharded(parts_dir, len(sources), b.batch_size, b.batches_per_shard,
                               work=lambda k, batch: _in_order(pool, builder.build, [sources[i] for i in batch]),
                               desc="build", crash_point="build_shards", postfix=postfix)
        except LLMError as e:
            raise SystemExit(f"error: {e}") from None
    records = [row["record"] for row in rows if "record" in row]
    write_jsonl_atomic(output, records)
    report = build_report(b.input_file, output, rows, read_drops, dict(client.stats) if client else None)
    report_path = output + ".report.json"
    write_text(report_path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {output}: {len(records)} of {report['records_in']} records; images in {image_dir}; report "
          f"{report_path}", flush=True)
    print("\n".join(summary_lines(report)), flush=True)
    if not records:
        print(f"error: no record passed every stage; {report_path} lists each drop and its reason", file=sys.stderr)
        return 1
    print(f"check it: python -m bpo.data.inspect {output} --image-root {image_dir}", flush=True)
    return 0


def _as_dict(b):
    return dataclasses.asdict(b)
