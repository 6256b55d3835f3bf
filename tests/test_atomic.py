"""bpo.runtime.atomic.write_text: a file under its real name is the old one or the whole new one, never a part."""

import os

import pytest

from bpo.runtime.atomic import write_text


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


def test_a_replaced_directory_is_renamed_aside_never_deleted_in_place(tmp_path, monkeypatch):
    """A kill while the old directory goes must not leave half of it under its real name: it is renamed aside first,
    and only then deleted; a copy left aside by such a kill is removed by the next replacement."""
    import os
    import shutil

    from bpo.runtime import atomic

    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_text("old")
    seen = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):  # what is deleted, and what out_dir holds at that moment
        seen.append((os.path.basename(path), sorted(os.listdir(out)) if out.exists() else None))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    with atomic.publish_dir(str(out)) as tmp:
        (tmp_path / tmp / "new.bin").write_text("new")
    assert seen == [(".model.replaced", ["new.bin"])]
    assert sorted(os.listdir(tmp_path)) == ["model"]

    (tmp_path / ".model.replaced").mkdir()  # a kill during that deletion
    with atomic.publish_dir(str(out)) as tmp:
        (tmp_path / tmp / "newer.bin").write_text("newer")
    assert sorted(os.listdir(tmp_path)) == ["model"] and os.listdir(out) == ["newer.bin"]
