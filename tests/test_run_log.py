"""metrics.jsonl on resume: rows past the checkpoint are dropped, and a line torn by a kill does not stop the run."""

import json

from bpo.runtime.run_log import RunLog, read_metrics


def test_resume_drops_a_torn_last_line_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    # A kill in the middle of an append leaves half a line with no newline.
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    log = RunLog(str(tmp_path), tensorboard=False, plot=False)
    log.start(10, initial_step=4)
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:4]
    err = capsys.readouterr().err + capsys.readouterr().out
    assert f"{path}:6" in err and "dropped" in err


def test_read_metrics_names_a_damaged_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\nnot json\n{"step": 3, "loss": 0.2}\n')
    rows, bad = read_metrics(str(path))
    assert [r["step"] for r in rows] == [1, 3] and bad == [2]
