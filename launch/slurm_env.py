"""Turn a Slurm allocation into the torch.distributed environment; optionally start one rank with it.

In a batch script (slurm/common.sh does this):
    eval "$(python launch/slurm_env.py --gpus-per-node 8)"      # export NNODES, MASTER_ADDR, MASTER_PORT, ...
then one of the launch paths (slurm/common.sh `bpo_launch`, chosen by BPO_LAUNCHER):
    torchrun (recommended; works the same in containers):
        srun --ntasks-per-node=1 torchrun --nnodes $NNODES --nproc_per_node $GPUS_PER_NODE --rdzv_backend c10d \\
             --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT --rdzv_id $SLURM_JOB_ID SCRIPT ...
    deepspeed launcher, one per node, no ssh (works in containers too: nothing but srun crosses nodes):
        srun --ntasks-per-node=1 bash -c 'eval "$(python launch/slurm_env.py --write-hostfile)";
             deepspeed --hostfile $BPO_HOSTFILE --no_ssh --node_rank $NODE_RANK --master_addr $MASTER_ADDR \\
             --master_port $MASTER_PORT SCRIPT ...'
    srun, one task per GPU (no launcher process):
        srun --ntasks-per-node=8 python launch/slurm_env.py --srun-ranks --exec -- python SCRIPT ...
Not used: `deepspeed --launcher slurm` (0.19) calls srun itself, so srun and sinfo must exist where the launcher runs
(rarely inside a container), and it starts ranks with no RANK/LOCAL_RANK set, leaving DeepSpeed to discover them
through mpi4py; the default pdsh launcher needs ssh between nodes.

Per rank, `--rank-dir DIR --exec -- CMD ...` writes DIR/<host>-<rank>.json (host, rank, local rank, world size, pid,
job id) and then execs CMD in the same process, so the pid recorded is the rank's own.

Settings (environment; a variable already set wins):
    BPO_MASTER_ADDR  rendezvous host      default: the first node's NodeAddr (`scontrol show node`)
    BPO_MASTER_PORT  rendezvous port      default: 15000 + job id mod 15000 (below the Linux ephemeral range)
    BPO_DIST_TIMEOUT_S  collective timeout in seconds the trainer passes to init_process_group (default 1800), so
                     a hung NCCL/gloo collective ends in a timeout error naming the operation instead of hanging
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (and the older NCCL_ASYNC_ERROR_HANDLING=1): a failed or timed-out NCCL
                     collective tears the process down, so srun's --kill-on-bad-exit ends the whole job step
"""

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys

PORT_BASE, PORT_SPAN = 15000, 15000  # [15000, 30000): clear of well-known ports and of 32768-60999 (ephemeral)
DEFAULTS = {
    "BPO_DIST_TIMEOUT_S": "1800",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_ASYNC_ERROR_HANDLING": "1",
}


class SlurmEnvError(RuntimeError):
    pass


def _scontrol(*args):
    try:
        out = subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True, timeout=60)
    except FileNotFoundError:
        raise SlurmEnvError("scontrol not found: run inside a Slurm job on a node with the Slurm client")
    except subprocess.CalledProcessError as e:
        raise SlurmEnvError(f"scontrol {' '.join(args)} failed: {e.stderr.strip()}")
    return out.stdout


def hostnames(nodelist):
    """Expand a Slurm host list expression (`gpu[01-03,07]`) into host names, in Slurm's order."""
    if not nodelist:
        raise SlurmEnvError("SLURM_JOB_NODELIST is not set: this is not running inside a Slurm job")
    return _scontrol("show", "hostnames", nodelist).split()


def node_addr(host):
    """The address Slurm itself reaches `host` at (NodeAddr); the name when scontrol cannot say."""
    try:
        out = _scontrol("show", "node", "-o", host)
    except SlurmEnvError:
        return host
    for token in out.split():
        if token.startswith("NodeAddr="):
            return token.split("=", 1)[1] or host
    return host


def master_port(job_id):
    return PORT_BASE + int(job_id) % PORT_SPAN


def gpus_per_node(env, requested=None):
    """GPUs (= ranks) per node: the flag, else what Slurm granted (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE as
    `8` or `h100:8`), else 1."""
    if requested:
        return int(requested)
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "")
        if value:
            return int(value.rsplit(":", 1)[-1].split("(")[0])
    return 1


def job_env(env, hosts, master_addr, gpus):
    """The exports for every launch path, from the Slurm variables in `env` (a dict); pure, for tests."""
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        raise SlurmEnvError("SLURM_JOB_ID is not set: this is not running inside a Slurm job")
    nnodes = len(hosts)
    out = {
        "NNODES": str(nnodes),
        "GPUS_PER_NODE": str(gpus),
        "WORLD_SIZE": str(nnodes * gpus),
        "MASTER_ADDR": env.get("BPO_MASTER_ADDR") or master_addr,
        "MASTER_PORT": env.get("BPO_MASTER_PORT") or str(master_port(job_id)),
        "NODE_RANK": env.get("SLURM_NODEID", "0"),  # meaningful inside a per-node srun task, 0 in the batch shell
    }
    for key, value in DEFAULTS.items():
        out[key] = env.get(key) or value
    return out


def srun_rank_env(env):
    """One rank per srun task: RANK, LOCAL_RANK, WORLD_SIZE from the task's own Slurm variables."""
    try:
        return {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env["SLURM_LOCALID"], "WORLD_SIZE": env["SLURM_NTASKS"]}
    except KeyError as e:
        raise SlurmEnvError(f"--srun-ranks needs {e.args[0]}: start this under `srun`")


def hostfile_text(hosts, gpus):
    """DeepSpeed's MPI-style hostfile: `host slots=N` a line."""
    return "".join(f"{h} slots={gpus}\n" for h in hosts)


def write_hostfile(env, hosts, gpus):
    """Into the node-local temporary directory: each node writes its own copy, nothing shared is needed."""
    tmp = env.get("SLURM_TMPDIR") or env.get("TMPDIR") or "/tmp"
    path = os.path.join(tmp, f"bpo-hostfile-{env['SLURM_JOB_ID']}")
    with open(path + ".tmp", "w") as f:
        f.write(hostfile_text(hosts, gpus))
    os.replace(path + ".tmp", path)
    return path


def write_rank_file(rank_dir, env=None):
    """DIR/<host>-<rank>.json with who this rank is; the training loop and the launchers need nothing from it, it is
    for people finding the process of a hung or slow rank (host + pid)."""
    env = os.environ if env is None else env
    host = socket.gethostname()
    rank = env.get("RANK", "0")
    record = {"host": host, "rank": int(rank), "local_rank": int(env.get("LOCAL_RANK", 0)),
              "world_size": int(env.get("WORLD_SIZE", 1)), "pid": os.getpid(),
              "slurm_job_id": env.get("SLURM_JOB_ID"), "slurm_node": env.get("SLURMD_NODENAME")}
    os.makedirs(rank_dir, exist_ok=True)
    path = os.path.join(rank_dir, f"{host}-{rank}.json")
    with open(path + f".tmp.{os.getpid()}", "w") as f:
        json.dump(record, f)
    os.replace(path + f".tmp.{os.getpid()}", path)
    return path


def exports(values):
    return "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in values.items())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus-per-node", type=int, help="ranks per node (default: what Slurm granted, else 1)")
    parser.add_argument("--write-hostfile", action="store_true",
                        help="write the DeepSpeed hostfile to the node's tmp dir and export BPO_HOSTFILE")
    parser.add_argument("--srun-ranks", action="store_true", help="this srun task is one rank (srun-per-GPU mode)")
    parser.add_argument("--rank-dir", help="write DIR/<host>-<rank>.json before --exec")
    parser.add_argument("--exec", dest="exec_", action="store_true", help="exec the command after `--`")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    argv = sys.argv[1:] if argv is None else list(argv)
    command = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if args.exec_ and not command:
        parser.error("--exec needs a command after `--`")
    args.command = command
    return args


def main(argv=None):
    args = parse_args(argv)
    env = dict(os.environ)
    try:
        if args.exec_ and "RANK" in env and not args.srun_ranks:
            values = {}  # started by torchrun or the deepspeed launcher, which set the rank variables already
        else:
            hosts = hostnames(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
            gpus = gpus_per_node(env, args.gpus_per_node)
            values = job_env(env, hosts, node_addr(hosts[0]), gpus)
            if args.srun_ranks:
                values.update(srun_rank_env(env))
            if args.write_hostfile:
                values["BPO_HOSTFILE"] = write_hostfile(env, hosts, gpus)
    except SlurmEnvError as e:
        raise SystemExit(f"slurm_env: {e}")
    if not args.exec_:
        sys.stdout.write(exports(values))
        return
    os.environ.update(values)
    if args.rank_dir:
        write_rank_file(args.rank_dir)
    sys.stdout.flush()
    os.execvp(args.command[0], args.command)


if __name__ == "__main__":
    main()
