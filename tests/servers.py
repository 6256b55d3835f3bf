"""A real vLLM server (the CPU build, in .venv-vllm: `make vllm-venv`) serving a tiny LLaVA on a loopback port, shared
by every test that needs one (tests/engines, tests/build_data): `vllm_server` is session-scoped, so it starts once
per run (about a minute on 2 cores). The test files that use it run one after the other (moved, whole, to where the
first of them is collected) and the server is stopped right after the last test that uses it, so it is up only
while it is used: an idle one takes no CPU (measured) but a few GB of memory, and tests/engines/test_slurm_serve.py
starts servers of its own.

The model is bpo.demo.tiny's LLaVA with hidden size 128 (vLLM's CPU attention takes head sizes 32..512, the default tiny
model has 8) and the published weight names (bpo.engines.layout). Both engines read this one directory, so the
comparison is of engines, not of checkpoints. Registers the `server` marker: `pytest -m "not server"` leaves out the
tests that start it. tests/conftest.py imports the fixtures and hooks from here.
"""

import subprocess
import sys
from dataclasses import dataclass

import pytest

from bpo.engines import cpu_server
from engines.vllm_env import VLLM_PYTHON, need_vllm
from jobs import free_port

_STARTED = []  # the server process, while it runs
_LAST_USER = {}  # "nodeid": the last collected test that uses vllm_server


# The test files that use the server. Under `pytest -n 2 --dist loadscope` (make test) they are one scheduling unit,
# so they run on one worker and the session-scoped server starts once (tests/conftest.py: pytest_xdist_make_scheduler).
SERVER_FILES = ("tests/engines/test_server.py", "tests/build_data/test_job.py", "tests/build_data/test_server.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "server: starts a vLLM CPU server on localhost (.venv-vllm, `make vllm-venv`); "
                                       "deselect with -m 'not server'")


def _uses_server(item):
    uses = "vllm_server" in getattr(item, "fixturenames", ())
    assert not uses or item.nodeid.split("::")[0] in SERVER_FILES, (
        f"{item.nodeid} uses vllm_server: add its file to tests/servers.py SERVER_FILES")
    return uses


def make_scheduler(config, log):
    """pytest-xdist's loadscope scheduling (each module on one worker), with SERVER_FILES as a single unit."""
    from xdist.scheduler import LoadScopeScheduling

    class OneServer(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return "vllm-server" if nodeid.split("::")[0] in SERVER_FILES else super()._split_scope(nodeid)

    return OneServer(config, log)


def pytest_collection_modifyitems(session, config, items):
    files = {item.nodeid.split("::")[0] for item in items if _uses_server(item)}
    if not files:
        return
    first = next(k for k, item in enumerate(items) if item.nodeid.split("::")[0] in files)
    grouped = [item for item in items if item.nodeid.split("::")[0] in files]
    rest = [item for item in items if item.nodeid.split("::")[0] not in files]
    items[:] = rest[:first] + grouped + rest[first:]  # whole files, in their order: module fixtures stay put


def pytest_collection_finish(session):
    users = [item.nodeid for item in session.items if _uses_server(item)]
    _LAST_USER["nodeid"] = users[-1] if users else None


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if item.nodeid == _LAST_USER.get("nodeid"):
        while _STARTED:
            cpu_server.stop(_STARTED.pop())


@dataclass
class Served:
    url: str  # API base, http://127.0.0.1:PORT/v1
    model: str  # the model directory, which is also the served name
    log: str
    proc: subprocess.Popen


@pytest.fixture(scope="session")
def tiny128_dir(tmp_path_factory):
    """The tiny LLaVA as bpo.demo.tiny saves it (hidden size 128): vLLM cannot read its vision-tower names."""
    from bpo.demo.tiny import write_tiny_llava

    return write_tiny_llava(str(tmp_path_factory.mktemp("tiny128") / "model"), hidden_size=128)


@pytest.fixture(scope="session")
def served_model_dir(tiny128_dir, tmp_path_factory):
    from bpo.engines.layout import write_served_copy

    return write_served_copy(tiny128_dir, str(tmp_path_factory.mktemp("served") / "model"))


@pytest.fixture(scope="session")
def vllm_server(served_model_dir, tmp_path_factory):
    need_vllm()
    port = free_port()
    log = str(tmp_path_factory.mktemp("vllm") / "server.log")
    proc = cpu_server.start(VLLM_PYTHON, served_model_dir, port, log)
    _STARTED.append(proc)
    try:
        try:
            waited = cpu_server.wait_healthy(proc, port, log)
        except cpu_server.ServerStartError as e:
            pytest.fail(str(e))
        print(f"vLLM server healthy after {waited:.0f}s on port {port}", file=sys.stderr)
        yield Served(f"http://127.0.0.1:{port}/v1", served_model_dir, log, proc)
    finally:
        cpu_server.stop(proc)  # a no-op when the hook above stopped it already
        if proc in _STARTED:
            _STARTED.remove(proc)
