"""Fault injection for the kill-and-resume tests: `BPO_CRASH_AFTER=<point>:<n>[@<rank>]` hard-exits a job at a named
point, on every rank or only on the one named.

The exit is `os._exit`, so no finally-block, atexit hook or buffered write runs: on disk it looks exactly like a
SIGKILL or a node failure at that moment, which is what the resume paths must survive. `BPO_CRASH_SLEEP_S=<s>` makes
the crashing rank wait that long first: a slow write that is then killed, while the other ranks carry on.
`BPO_SLOW=<point>:<s>` makes a job sleep that long at a named point and carry on: rank-0 work (an export, judging)
slower than BPO_DIST_TIMEOUT_S, which the other ranks must wait out without timing out.
`BPO_NAN_LOSS=<first>[-<last>]` makes the loss of those optimizer steps (1-based) NaN: a run that diverges.
"""

import os
import time

ENV = "BPO_CRASH_AFTER"
SLEEP_ENV = "BPO_CRASH_SLEEP_S"
SLOW_ENV = "BPO_SLOW"
NAN_ENV = "BPO_NAN_LOSS"
EXIT_CODE = 17


def maybe_crash(point, count):
    spec = os.environ.get(ENV, "")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    n, _, only_rank = rest.partition("@")
    if only_rank and int(only_rank) != int(os.environ.get("RANK", 0)):
        return
    if name == point and count >= int(n):
        time.sleep(float(os.environ.get(SLEEP_ENV, "0")))
        os._exit(EXIT_CODE)


def maybe_slow(point):
    name, _, seconds = os.environ.get(SLOW_ENV, "").partition(":")
    if name == point:
        time.sleep(float(seconds))


def maybe_poison(loss, step):
    """loss, or NaN in its place at the optimizer steps BPO_NAN_LOSS names (the graph is kept: backward runs)."""
    spec = os.environ.get(NAN_ENV, "")
    if not spec:
        return loss
    first, _, last = spec.partition("-")
    if int(first) <= step <= int(last or 10**12):
        return loss * float("nan")
    return loss
