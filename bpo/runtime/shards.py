"""Resumable, rank-split batch work that ends in one JSONL file in input order (blind generation, evaluation).

Items are cut into fixed global batches (batch k = items [k*B, (k+1)*B)) and batches into shards of S batches.
Shards go round-robin to ranks; each finished shard is written atomically to PARTS/shard_NNNNNN.jsonl, so a killed
job redoes only missing shards, and rank 0 concatenates them in order. Because batches are fixed before they are
split, outputs do not depend on the number of ranks or on restarts.

Under ZeRO-3 every forward is a collective, so ranks must make the same number of model calls: in each round a rank
with fewer batches than the busiest one calls `idle()` to make up the difference. That round loop, `lockstep`, also
drives the reference cache (bpo/ref_logprobs.py), which writes shards of its own format.
"""

import json
import os
import threading
import time

from bpo.runtime import dist
from bpo.runtime.atomic import write_text
from bpo.runtime.faults import maybe_crash

SHARD_FORMAT = "shard_{:06d}.jsonl"


def write_jsonl_atomic(path, rows):
    write_text(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_settings(parts_dir, settings):
    """A parts directory belongs to one set of settings; resuming with others would mix two runs in one file."""
    path = os.path.join(parts_dir, "settings.json")
    if dist.is_rank0():
        os.makedirs(parts_dir, exist_ok=True)
        if not os.path.exists(path):
            write_text(path, json.dumps(settings, indent=1, sort_keys=True))
    dist.barrier()
    with open(path) as f:
        old = json.load(f)
    if old != json.loads(json.dumps(settings)):
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise SystemExit(f"{parts_dir} holds shards made with other settings (differs in: {', '.join(diff)}). "
                         f"Delete it to start over, or write to another output file.")


class TokenRate:
    """Generated tokens per second of this process since its first batch, for the progress bar."""

    def __init__(self):
        self.tokens, self._t0, self._lock = 0, None, threading.Lock()

    def add(self, n):
        with self._lock:
            self._t0 = self._t0 or time.time()
            self.tokens += n

    def postfix(self):
        with self._lock:
            if not self._t0:
                return ""
            return f"{self.tokens / max(time.time() - self._t0, 1e-9):.0f} tok/s"


def lockstep(pending, calls, work, idle=None):
    """Deal the `pending` shards round-robin to the ranks, one each per round; yields each round's shards once this
    rank is through it. `work(shard, round)` (rounds count from 1) does this rank's shard, which takes `calls(shard)`
    model calls. Under ZeRO-3 every forward is a collective, so a rank with fewer calls than the busiest rank of the
    round, or with no shard, calls `idle()` to make up the difference (without `idle`, ranks do not wait for each
    other)."""
    world, rank = dist.world_size(), dist.rank()
    for done_rounds, start in enumerate(range(0, len(pending), world), start=1):
        in_round = pending[start:start + world]
        owed = max(calls(i) for i in in_round)
        if rank < len(in_round):
            work(in_round[rank], done_rounds)
            owed -= calls(in_round[rank])
        for _ in range(owed if idle else 0):
            idle()
        yield in_round


def run_sharded(parts_dir, num_items, batch_size, batches_per_shard, work, idle=None, desc="work",
                crash_point=None, postfix=None):
    """Run `work(batch_index, item_range) -> rows` over every batch not already on disk; returns all rows in order
    on rank 0 (None elsewhere). `idle()` is called for each model call a rank must make up under ZeRO-3;
    `postfix()` (e.g. TokenRate.postfix) is shown after the bar and refreshed after every batch."""
    from tqdm import tqdm

    world, rank = dist.world_size(), dist.rank()
    shard_items = batch_size * batches_per_shard
    shards = [range(s, min(s + shard_items, num_items)) for s in range(0, num_items, shard_items)]

    def path(i):
        return os.path.join(parts_dir, SHARD_FORMAT.format(i))

    def n_batches(i):
        return -(-len(shards[i]) // batch_size)

    # Rank 0 decides what is left, once: a rank that looked on its own could see shards another rank has just
    # written in this very run and split the remaining work differently.
    pending = dist.broadcast_object([i for i in range(len(shards)) if not os.path.exists(path(i))])
    dist.print0(f"{desc}: {num_items} items in {len(shards)} shards, {len(shards) - len(pending)} already done, "
                f"{world} rank(s)")
    bar = tqdm(total=num_items, initial=num_items - sum(len(shards[i]) for i in pending), unit="item", desc=desc,
               disable=rank != 0, dynamic_ncols=True)

    def do(mine, done_rounds):
        rows = []
        for b in range(n_batches(mine)):
            first = shards[mine].start + b * batch_size
            batch = range(first, min(first + batch_size, shards[mine].stop))
            rows += work(first // batch_size, batch)
            if world == 1:  # one process sees all the work: move the bar per batch, not per shard
                bar.update(len(batch))
            if postfix:
                bar.set_postfix_str(postfix())
        write_jsonl_atomic(path(mine), rows)
        if crash_point:
            maybe_crash(crash_point, done_rounds)

    for in_round in lockstep(pending, n_batches, do, idle):
        bar.update(sum(len(shards[i]) for i in in_round) - (len(shards[in_round[0]]) if world == 1 else 0))
    bar.close()
    dist.barrier()
    if not dist.is_rank0():
        return None
    rows = [row for i in range(len(shards)) for row in read_jsonl(path(i))]
    if len(rows) != num_items:
        raise SystemExit(f"{parts_dir}: shards hold {len(rows)} rows for {num_items} items; delete it and rerun")
    return rows
