"""Session fixtures shared by every test: a tiny LLaVA checkpoint, the synthetic MMSafe-PO sample data, and the vLLM
CPU server (tests/servers.py)."""

import pytest

from servers import (make_scheduler, pytest_collection_finish, pytest_collection_modifyitems,  # noqa: F401
                     pytest_runtest_teardown, served_model_dir, tiny128_dir, vllm_server)
from servers import pytest_configure as configure_servers


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: a plain `pytest` run has no such hook
def pytest_xdist_make_scheduler(config, log):
    return make_scheduler(config, log)


def pytest_configure(config):
    configure_servers(config)  # the vLLM server's marker
    # `make test` runs everything; `pytest -m "not slow"` leaves out the runs that take minutes.
    config.addinivalue_line("markers", "slow: a run of several minutes (the science demo in small)")
    # `make test-latest` runs these on the newest releases: the live-reference chain, one family per processor kind.
    config.addinivalue_line("markers", "latest: in the fast subset checked against the newest releases")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Directory of a tiny random LLaVA (bpo.demo.tiny): loads with AutoProcessor / AutoModelForImageTextToText."""
    from bpo.demo.tiny import write_tiny_llava

    return write_tiny_llava(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory):
    """Directory from bpo.demo.sample_data: train.jsonl (48 records), test.json (16), images/ (the image root)."""
    from bpo.demo.sample_data import write_sample_data

    return write_sample_data(str(tmp_path_factory.mktemp("sample") / "data"))
