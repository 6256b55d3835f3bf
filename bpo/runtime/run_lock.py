"""One job per run directory: an exclusive lock on RUN/.lock, held by rank 0 for the life of the job.

Rank 0 takes it before anything else is written to the run directory, and the other ranks wait for its verdict
(bpo.runtime.dist.on_rank0), so ranks on other nodes need no lock of their own. The kernel releases a flock when its holder
dies (a kill, a node lost, a Slurm requeue), so a lock that can be taken is never in use. The file holds the holder
(host, pid, start time) for the messages: who holds it, or, when a job died without emptying it at exit, whose lock
a new job took over.
"""

import atexit
import datetime
import fcntl
import json
import os
import socket

from bpo.runtime.checkpoint import CheckpointError

LOCK_NAME = ".lock"
_held = {}  # run directory -> open file: the lock lives as long as the file stays open, i.e. the process


def _holder():
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _describe(info):
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {info.get('started', '?')}"


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def acquire(run_dir):
    """Lock `run_dir` for this process; returns a line to print when it took over a dead job's lock, else None.

    Raises CheckpointError naming the holder when another job holds it."""
    if run_dir in _held:
        return None
    path = os.path.join(run_dir, LOCK_NAME)
    f = open(path, "a+", encoding="utf-8")  # never truncated before the lock is ours: the holder's info stays
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        info = _read(f)
        f.close()
        raise CheckpointError(f"{run_dir} is in use by another job ({_describe(info)}); two jobs writing one run "
                              f"would corrupt its checkpoints. Wait for it or stop it (touch "
                              f"{run_dir}/stop_requested), "
                              f"or use another train.output_dir") from None
    f.seek(0)
    previous = _read(f)
    note = None
    if previous:  # a job that exits empties the file: this one died (killed, node lost, requeued)
        same_host = previous.get("host") == socket.gethostname()
        state = "is no longer running" if same_host and not _pid_alive(previous.get("pid")) else "ended"
        note = (f"run lock: took over {path} left by a job that {state} without releasing it "
                f"({_describe(previous)})")
    f.seek(0)
    f.truncate()
    f.write(json.dumps(_holder()) + "\n")
    f.flush()
    os.fsync(f.fileno())
    _held[run_dir] = f
    atexit.register(release, run_dir)
    return note


def release(run_dir):
    """Empty the lock file and give the lock up (at exit; a job killed before leaves its holder in the file)."""
    f = _held.pop(run_dir, None)
    if f is not None:
        f.truncate(0)
        f.flush()
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def _read(f):
    try:
        info = json.loads(f.read() or "{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}
