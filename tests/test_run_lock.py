"""One job per run directory: a second one is refused naming the holder; a dead one's lock is taken over."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from bpo.runtime import run_lock
from bpo.runtime.checkpoint import CheckpointError
from jobs import REPO

HOLD = "import sys, time; from bpo.runtime import run_lock; run_lock.acquire(sys.argv[1]); print('held', flush=True); " \
       "time.sleep(60)"


def test_second_job_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    run_dir = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=f"in use by another job \\(host {socket.gethostname()}, "
                                                  f"pid {holder.pid}, started 20"):
            run_lock.acquire(run_dir)
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without emptying the lock file, as a killed job does
        holder.wait()
    try:
        note = run_lock.acquire(run_dir)
        assert f"took over {run_dir}/.lock left by a job that is no longer running" in note
        assert f"pid {holder.pid}" in note
    finally:
        run_lock.release(run_dir)
    # A job that ended normally empties the file: the next one takes the lock without a word.
    assert open(os.path.join(run_dir, ".lock")).read() == ""
    try:
        assert run_lock.acquire(run_dir) is None
    finally:
        run_lock.release(run_dir)
