"""bpo.atomic.write_text: a file under its real name is the old one or the whole new one, never a part."""

import os

import pytest

from bpo.atomic import write_text


def test_text_and_lines_are_written_whole(tmp_path):
    path = tmp_path / "a.json"
    write_text(path, "{}\n")
    assert path.read_text() == "{}\n"
    write_text(path, (f"{i}\n" for i in range(3)))
    assert path.read_text() == "0\n1\n2\n"
    assert os.listdir(tmp_path) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_text(path, "old\n")

    def rows():
        yield "new 1\n"
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_text(path, rows())
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["rows.jsonl"]
