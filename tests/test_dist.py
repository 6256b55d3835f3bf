"""bpo.runtime.dist.on_rank0_polled: rank-0 work the other ranks wait for by polling a marker file, never in a collective
(the 2-rank case, an export slower than BPO_DIST_TIMEOUT_S, runs in tests/test_lora.py)."""

import pytest

from bpo.runtime import dist


def test_rank0_runs_the_work_and_leaves_no_marker(tmp_path):
    marker = str(tmp_path / "export")
    (tmp_path / "export.failed").write_text("stale, from an earlier attempt")
    assert dist.on_rank0_polled(lambda: 7, marker, "to export") == 7
    assert list(tmp_path.iterdir()) == []


def test_rank0_failure_is_written_for_the_others(tmp_path):
    def fail():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        dist.on_rank0_polled(fail, str(tmp_path / "export"), "to export")
    assert (tmp_path / "export.failed").read_text() == "OSError: disk full"


def test_other_ranks_wait_for_the_marker_and_raise_rank0s_error(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "is_rank0", lambda: False)
    monkeypatch.setattr(dist, "POLL_S", 0.01)
    ran = []
    (tmp_path / "judge.done").write_text("done\n")
    assert dist.on_rank0_polled(lambda: ran.append(1), str(tmp_path / "judge"), "to judge") is None
    assert ran == []  # only rank 0 works
    (tmp_path / "export.failed").write_text("OSError: disk full")
    with pytest.raises(RuntimeError, match="rank 0 failed to export: OSError: disk full"):
        dist.on_rank0_polled(lambda: None, str(tmp_path / "export"), "to export")
