"""bpo.runtime.shards.lockstep: the ZeRO-3 round loop that blind generation, evaluation and the reference cache share."""

from bpo.runtime.shards import lockstep


def run_rank(monkeypatch, rank, world, pending, calls):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    log = []  # per round: (shard or None, model calls made)
    made = []

    def work(shard, round_no):
        log.append((round_no, shard))
        made.append(calls(shard))

    rounds = []
    for in_round in lockstep(pending, calls, work, idle=lambda: made.append(1)):
        rounds.append((list(in_round), sum(made)))
        made.clear()
    return log, rounds


def test_every_rank_makes_the_busiest_ranks_calls_each_round(monkeypatch):
    pending = [0, 2, 3, 5, 6, 9, 11]  # the shards left after a restart
    sizes = {0: 3, 2: 1, 3: 2, 5: 3, 6: 1, 9: 2, 11: 1}
    runs = [run_rank(monkeypatch, r, 3, pending, sizes.get) for r in range(3)]
    done = sorted(shard for log, _ in runs for _, shard in log)
    assert done == pending  # each shard once, by one rank
    expected = [([0, 2, 3], 3), ([5, 6, 9], 3), ([11], 1)]
    assert all(rounds == expected for _, rounds in runs)
    assert runs[1][0] == [(1, 2), (2, 6)]  # round-robin, rounds counted from 1
    assert runs[2][0] == [(1, 3), (2, 9)]


def test_without_idle_no_calls_are_made_up(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    rounds = list(lockstep([4], lambda i: 5, lambda shard, n: seen.append(shard)))
    assert rounds == [[4]] and seen == []
