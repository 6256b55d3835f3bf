"""tests/ports.py: ports for the tests' servers that two pytest-xdist workers, or two callers, never share."""

import os
import socket
import subprocess
import sys

import ports

HERE = os.path.dirname(os.path.abspath(__file__))


def test_blocks_of_two_workers_and_the_main_process_are_disjoint():
    blocks = [set(ports.block(ports.worker_index(w))) for w in ("", "gw0", "gw1", "gw7")]
    assert all(len(b) == ports.BLOCK for b in blocks)
    for i, a in enumerate(blocks):
        for b in blocks[i + 1:]:
            assert not a & b


def test_ports_are_outside_the_ephemeral_range():
    first, last = ports.ephemeral_range()
    assert all(not first <= p <= last for p in ports.candidates())
    assert all(not first <= p <= last for p in (ports.free_port() for _ in range(20)))


def test_ephemeral_range_read_from_the_kernel_file(tmp_path):
    path = tmp_path / "range"
    path.write_text("40000\t50000\n")
    assert ports.ephemeral_range(str(path)) == (40000, 50000)
    assert not any(40000 <= p <= 50000 for p in ports.candidates((40000, 50000)))


def test_no_repeats_and_past_the_end_of_a_block(tmp_path):
    pool = ports.PortPool(0, lock_dir=str(tmp_path))
    got = [pool.take() for _ in range(ports.BLOCK + 10)]  # runs into a second block
    assert len(set(got)) == len(got)


def test_a_port_in_use_is_skipped(tmp_path):
    pool = ports.PortPool(3, lock_dir=str(tmp_path))
    first = ports.block(3)[0]
    with socket.socket() as s:
        if not ports.in_use(first):  # else something else holds it: skipped all the same
            s.bind(("127.0.0.1", first))
            s.listen()
        assert ports.in_use(first) and pool.take() != first


def test_two_processes_preferring_one_block_get_different_blocks(tmp_path):
    """A second test session on the machine (or a worker whose preferred block is held) moves to a free block."""
    code = ("import sys, ports; pool = ports.PortPool(5, lock_dir=sys.argv[1]); print(pool.take(), flush=True); "
            "sys.stdin.read()")
    env = dict(os.environ, PYTHONPATH=HERE)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        got = [int(p.stdout.readline()) for p in procs]  # both hold their block while they wait on stdin
    finally:
        for p in procs:
            p.communicate("")
    assert sorted(next(i for i in (5, 6, 7) if g in ports.block(i)) for g in got) == [5, 6]
