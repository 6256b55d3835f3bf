"""Asking a training run to stop at the next step boundary with a checkpoint: how a Slurm job is requeued without
losing the steps since its last save.

Two ways to ask, either one enough:
- the stop file exists: $BPO_STOP_FILE, else OUTPUT_DIR/stop_requested. slurm/common.sh creates it when the batch
  shell gets USR1 (the time limit is near); no signal has to reach the ranks through torchrun, the deepspeed launcher
  or srun, so it works with every launcher and on every node. Only rank 0 looks, once per step (one stat).
- this process got SIGUSR1 (a launcher that passes signals on, e.g. BPO_LAUNCHER=srun with `scancel -s USR1`).
Each rank's answer rides on the step's metric all-reduce, so all ranks agree on the step without another collective.
Training then saves at that step, removes the file and exits with EXIT_CODE (75, EX_TEMPFAIL: "try again"), which
the batch shell answers by requeueing the job; the rerun resumes from that checkpoint.
"""

import os
import signal
import threading

from bpo.runtime import dist

ENV = "BPO_STOP_FILE"
FILE_NAME = "stop_requested"
EXIT_CODE = 75


class StopRequest:
    def __init__(self, output_dir):
        self.path = os.environ.get(ENV) or os.path.join(output_dir, FILE_NAME)
        self.signalled = False
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signalled = True  # acted on at the next step boundary, never inside a forward

    def flag(self):
        """1.0 when this rank has been asked to stop, else 0.0 (summed over ranks with the step's metrics)."""
        return float(self.signalled or (dist.is_rank0() and os.path.exists(self.path)))

    def clear(self):
        """Called once the checkpoint is written: the rerun must not stop again at its first step."""
        if dist.is_rank0():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


class Diverged(RuntimeError):
    """Training stopped after train.max_bad_steps consecutive steps with a non-finite loss or gradient norm."""
