"""A throwaway two-node Slurm cluster on localhost, for running the real sbatch templates in tests.

    python -m tests.slurm.cluster DIR      # bring one up by hand; prints the SLURM_CONF to export; Ctrl-C stops it

Everything lives under DIR: a private munged (own key and socket, named in slurm.conf's AuthInfo, so the system's
munge is neither used nor touched), slurmctld's state, one spool, pid and log file per slurmd. The two "nodes" n1 and
n2 are two slurmd processes on 127.0.0.1 with distinct ports, each started with `-N`. There is no cgroup use
(proctrack/linuxproc, task/none) and no accounting storage, so `sacct` has nothing: ask `scontrol show job` instead.
`stop()` ends only the daemons this object started, by their pid files.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

from ports import free_port

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol")


class ClusterError(RuntimeError):
    pass


def missing_binaries():
    return [b for b in DAEMONS if shutil.which(b) is None]


def unavailable_reason():
    """Why this machine cannot host the cluster, or None. Installs the packages when root with apt and they lack."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(missing_binaries())} missing) and installing it needs root"
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:  # a stale package list is the usual cause: refresh once and try again
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or missing_binaries():
        return f"could not install {' '.join(PACKAGES)}: {proc.stderr.strip()[-500:]}"
    return None


class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `env` is what a client (sbatch, scontrol, srun) needs."""

    def __init__(self, root, nodes=("n1", "n2"), cpus_per_node=2, partition="debug"):
        self.root = os.path.abspath(root)
        self.nodes = list(nodes)
        self.cpus = cpus_per_node
        self.partition = partition
        self.conf = os.path.join(self.root, "slurm.conf")
        self.socket = os.path.join(self.root, "munge", "munge.socket")
        self.pid_files = []  # in start order; stop() goes in reverse

    @property
    def env(self):
        return dict(os.environ, SLURM_CONF=self.conf)

    def _path(self, *parts):
        return os.path.join(self.root, *parts)

    def write_config(self):
        ctld_port, *node_ports = (free_port() for _ in range(1 + len(self.nodes)))
        for d in ("state", "log", *(f"spool/{n}" for n in self.nodes)):
            os.makedirs(self._path(d), mode=0o700, exist_ok=True)
        # munged insists that everyone may traverse its socket's directory (and no one else may write there).
        os.makedirs(self._path("munge"), exist_ok=True)
        os.chmod(self._path("munge"), 0o755)
        lines = [
            "ClusterName=bpotest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # Our own munged; cred_expire also sets how long a requeued job waits before it may start again.
            f"AuthInfo=socket={self.socket},cred_expire=5",
            f"StateSaveLocation={self._path('state')}",
            f"SlurmdSpoolDir={self._path('spool', '%n')}",
            f"SlurmctldPidFile={self._path('slurmctld.pid')}",
            f"SlurmdPidFile={self._path('slurmd.%n.pid')}",
            f"SlurmctldLogFile={self._path('log', 'slurmctld.log')}",
            f"SlurmdLogFile={self._path('log', 'slurmd.%n.log')}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",  # both "nodes" claim CPUs the one host does not have twice
            "SchedulerType=sched/builtin",
            "SchedulerParameters=batch_sched_delay=0,sched_interval=2",  # requeued jobs restart within seconds
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=600",  # keep finished jobs visible to `scontrol show job` for the test's checks
            "SlurmdTimeout=60",
            "InactiveLimit=0",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname=localhost Port={port} "
                         f"CPUs={self.cpus} State=UNKNOWN")
        lines.append(f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE "
                     f"State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _daemon(self, cmd, pid_file, log_hint):
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        self.pid_files.append(pid_file)
        if proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}\n"
                               f"log: {log_hint}")
        deadline = time.time() + 20
        while not _read_pid(pid_file):
            if time.time() > deadline:
                raise ClusterError(f"{cmd[0]} wrote no pid file {pid_file}; log: {log_hint}\n{_tail(log_hint)}")
            time.sleep(0.1)

    def start(self, timeout=60):
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.write_config()
        key = self._path("munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        munge_log = self._path("log", "munged.log")
        self._daemon(["munged", "--force", f"--socket={self.socket}", f"--key-file={key}", f"--log-file={munge_log}",
                      f"--pid-file={self._path('munge', 'munged.pid')}", f"--seed-file={self._path('munge', 'seed')}"],
                     self._path("munge", "munged.pid"), munge_log)
        self._daemon(["slurmctld", "-f", self.conf, "-c", "-i"], self._path("slurmctld.pid"),
                     self._path("log", "slurmctld.log"))
        for name in self.nodes:
            self._daemon(["slurmd", "-f", self.conf, "-N", name], self._path(f"slurmd.{name}.pid"),
                         self._path("log", f"slurmd.{name}.log"))
        self.wait_idle(timeout)
        return self

    def wait_idle(self, timeout):
        deadline = time.time() + timeout
        while True:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if states and all(states.get(n, "").rstrip("*") == "idle" for n in self.nodes):
                return
            if time.time() > deadline:
                raise ClusterError(f"nodes not idle after {timeout}s: {states}\n"
                                   f"{_tail(self._path('log', 'slurmctld.log'))}")
            time.sleep(0.5)

    def run(self, *cmd, check=True, cwd=None, env=None):
        full_env = self.env
        full_env.update(env or {})
        proc = subprocess.run(list(cmd), env=full_env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def job(self, job_id):
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...); {} once the job is forgotten."""
        return self.jobs(job_id).get(str(job_id), {})

    def jobs(self, job_id=None):
        """{job id: fields} of every job slurmctld still knows (or of one), from a single `scontrol show job`."""
        proc = self.run("scontrol", "show", "job", "-o", *([str(job_id)] if job_id else []), check=False)
        out = {}
        for line in proc.stdout.splitlines():
            fields = {}
            for token in line.split():
                key, sep, value = token.partition("=")
                if sep:
                    fields[key] = value
            if "JobId" in fields:
                out[fields["JobId"]] = fields
        return out

    def stop(self):
        """Cancel what is still queued, then end our daemons (newest first) by pid file: TERM, then KILL."""
        if os.path.exists(self.conf) and self.pid_files:
            self.run("scancel", "--full", "--quiet", "--partition", self.partition, check=False)
        for pid_file in reversed(self.pid_files):
            pid = _read_pid(pid_file)
            if pid:
                _terminate(pid)
        self.pid_files = []


def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _terminate(pid, wait=10):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(path, n=3000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return f"({path} not readable)"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    reason = unavailable_reason()
    if reason:
        raise SystemExit(reason)
    cluster = SlurmCluster(sys.argv[1]).start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
