"""Fault injection for the kill-and-resume tests: `BPO_CRASH_AFTER=<point>:<n>` hard-exits a job at a named point.

The exit is `os._exit`, so no finally-block, atexit hook or buffered write runs: on disk it looks exactly like a
SIGKILL or a node failure at that moment, which is what the resume paths must survive.
"""

import os

ENV = "BPO_CRASH_AFTER"
EXIT_CODE = 17


def maybe_crash(point, count):
    spec = os.environ.get(ENV, "")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name == point and count >= int(n):
        os._exit(EXIT_CODE)
