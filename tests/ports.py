"""Loopback ports for the tests' servers and rendezvous, handed out so that no two callers get the same one.

Binding port 0 and closing the socket, the usual trick, races: between the close and the server's own bind, another
pytest-xdist worker can be handed the same port, or the kernel can give it to any outgoing connection. Ports here
come from outside the kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range), which bind(0) and connect()
never hand out. That set is cut into blocks of BLOCK ports; each process walks its own block with a counter, so one
process never hands out a port twice. A process owns a block by holding an exclusive lock on the block's file (until
it exits): it starts at the block its xdist worker prefers (gw0, gw1, ...; the main process has its own), and takes
the next free one when that is held by another process, a second test session on the same machine included. A port
something else on the machine holds is skipped by a bind check.
"""

import fcntl
import os
import re
import socket
import tempfile
import threading

LOWEST = 10000  # below, well-known services crowd
BLOCK = 200
LOCK_DIR = os.path.join(tempfile.gettempdir(), f"bpo-test-ports-{os.getuid()}")


def ephemeral_range(path="/proc/sys/net/ipv4/ip_local_port_range"):
    """(first, last) of the ports the kernel hands out for bind(0) and outgoing connections, both included."""
    try:
        with open(path) as f:
            first, last = map(int, f.read().split())
        return first, last
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def candidates(ephemeral=None):
    first, last = ephemeral or ephemeral_range()
    return [p for p in range(LOWEST, 65536) if not first <= p <= last]


def worker_index(worker=None):
    """0 for the main process (no xdist), n + 1 for xdist worker gw<n>."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "") if worker is None else worker
    m = re.fullmatch(r"gw(\d+)", worker)
    return int(m.group(1)) + 1 if m else 0


def block(index, ports=None):
    """The ports of block `index` (wrapping around when there are more blocks asked for than ports)."""
    ports = candidates() if ports is None else ports
    n = len(ports) // BLOCK
    start = (index % n) * BLOCK
    return ports[start:start + BLOCK]


def in_use(port):
    with socket.socket() as s:
        try:
            s.bind(("", port))  # every interface: a server on any address counts
        except OSError:
            return True
    return False


class PortPool:
    """Hands out the ports of blocks this process holds, each port once; `first_block` is where it looks first."""

    def __init__(self, first_block, lock_dir=LOCK_DIR):
        self.ports = candidates()
        self.next_block, self.lock_dir = first_block, lock_dir
        self.locks, self.pending = [], iter(())
        self.mutex = threading.Lock()

    def _claim_block(self):
        os.makedirs(self.lock_dir, exist_ok=True)
        for _ in range(len(self.ports) // BLOCK):
            index, self.next_block = self.next_block, self.next_block + 1
            f = open(os.path.join(self.lock_dir, f"block-{index % (len(self.ports) // BLOCK)}.lock"), "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            self.locks.append(f)  # held, open, until this process exits
            return block(index, self.ports)
        raise RuntimeError(f"every block of test ports is held by another process ({self.lock_dir})")

    def take(self):
        with self.mutex:
            while True:
                for port in self.pending:
                    if not in_use(port):
                        return port
                self.pending = iter(self._claim_block())


_pool = None
_pool_lock = threading.Lock()


def free_port():
    """A loopback port no other caller of free_port, in this process or another, has been or will be given, and
    that nothing held a moment ago."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = PortPool(worker_index())
    return _pool.take()
