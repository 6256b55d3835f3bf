import json

import pytest
from PIL import Image

from bpo.data.conversation import Turn
from bpo.data.records import (
    DataFileError, RecordError, blind_generation, drop_cut_blind, load_records, raise_if_bad, read_raw_records,
    stable_id,
)

QUESTION = "USER: Hi ASSISTANT: Hello! USER: <image>\nWhere does the person in the image live? ASSISTANT:"
META = {"type": "privacy", "entity": "Jane Doe", "entity_type": "PER", "replacement": "the person in the image",
        "text_prompt": "Where does Jane Doe live?", "mid_prompt": "Where does Jane Doe (PER) live?"}


def rec(**fields):
    """A good record of the `id` + `question` variant; keyword arguments override or (with None) remove fields."""
    out = {"id": 7, "question": QUESTION, "image": "ok.png", "chosen": "ASSISTANT: I can't share private addresses. ",
           "rejected": "ASSISTANT: Sure, it is 1 Example Road. ", **META, "source_set": "unit"}
    out.update(fields)
    return {k: v for k, v in out.items() if v is not None}


@pytest.fixture
def root(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(images / "ok.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_question_variant_keeps_everything(root):
    path = write_jsonl(root / "d.jsonl", [rec()])
    records, bad = load_records(path, image_root=root / "images")
    assert bad == []
    (r,) = records
    assert r.id == "7"
    assert r.turns[-1] == Turn("user", "Where does the person in the image live?", has_image=True)
    assert r.image == "ok.png"
    assert r.chosen == "I can't share private addresses."
    assert r.rejected == "Sure, it is 1 Example Road."
    assert r.blind is None
    assert r.meta == {**META, "source_set": "unit", "conversation_key": "question"}
    assert r.source == f"{path}:1"


def test_prompt_variant_gets_a_stable_content_id(root):
    row = rec(id=None, question=None, prompt=QUESTION)
    other = rec(id=None, question=None, prompt=QUESTION, chosen="ASSISTANT: No.")
    path = str(root / "d.json")
    (root / "d.json").write_text(json.dumps([row, other]))
    records, bad = load_records(path, image_root=root / "images")
    assert bad == []
    expected = stable_id(QUESTION, "ok.png", row["chosen"], row["rejected"])
    assert records[0].id == expected and len(expected) == 16 and int(expected, 16) >= 0
    assert records[1].id != expected
    assert records[0].meta["conversation_key"] == "prompt"
    assert [r.source for r in records] == [f"{path}[0]", f"{path}[1]"]
    # The same content in another file, in the other format, gets the same id.
    copy = write_jsonl(root / "copy.jsonl", [row])
    assert load_records(copy, image_root=root / "images")[0][0].id == expected


def test_format_is_decided_by_content(root):
    array_named_jsonl = root / "array.jsonl"
    array_named_jsonl.write_text(json.dumps([rec()], indent=2))
    lines_named_json = write_jsonl(root / "lines.json", [rec(id=1), rec(id=2)])
    assert [r.id for r in load_records(array_named_jsonl, root / "images")[0]] == ["7"]
    assert [r.id for r in load_records(lines_named_json, root / "images")[0]] == ["1", "2"]


def test_blind_is_read_and_stripped(root):
    path = write_jsonl(root / "d.jsonl", [rec(blind="ASSISTANT: It is a nice house.</s>")])
    (r,) = load_records(path, root / "images")[0]
    assert r.blind == "It is a nice house."


def test_blind_responses_cut_at_max_new_tokens_are_dropped_with_their_count(root):
    meta = {"token_ids": [5, 6, 7], "tokenizer": "t0", "finish_reason": "stop"}
    rows = [rec(id=1, blind="ASSISTANT: Done.", blind_meta=meta),
            rec(id=2, blind="ASSISTANT: It goes on and", blind_meta=dict(meta, finish_reason="length")),
            rec(id=3, blind="ASSISTANT: Written elsewhere."),  # no blind_meta: kept as it is
            rec(id=4)]
    records, _ = load_records(write_jsonl(root / "d.jsonl", rows), root / "images")
    assert [blind_generation(r) for r in records] == [([5, 6, 7], "t0", False), ([5, 6, 7], "t0", True),
                                                      (None, None, False), (None, None, False)]
    kept, dropped = drop_cut_blind(records)
    assert dropped == 1 and [r.blind for r in kept] == ["Done.", None, "Written elsewhere.", None]
    assert [r.chosen for r in kept] == [r.chosen for r in records]  # the pair stays: only the blind term goes
    assert records[1].blind == "It goes on and"  # the input records are not changed


def test_image_without_marker_goes_to_the_last_user_turn(root):
    path = write_jsonl(root / "d.jsonl", [rec(question="USER: Hi ASSISTANT: Hello! USER: Who is it? ASSISTANT:")])
    (r,) = load_records(path, root / "images")[0]
    assert [t.has_image for t in r.turns] == [False, False, True]


def test_every_kind_of_bad_record_is_reported_with_source_and_id(root):
    rows = [
        rec(id=1),
        rec(id=2, chosen=None),
        rec(id=3, question="Hello there ASSISTANT:"),
        rec(id=4, rejected="ASSISTANT:   "),
        rec(id=5, blind=""),
        rec(id=6, image="nowhere.png"),
        rec(id=7, image="corrupt.png"),
        rec(id=1, chosen="ASSISTANT: Another answer."),
        '{"id": 9, "question": ',
        "[1, 2]",
        rec(id=10, question=None),
        rec(id=11, image=None),
        json.dumps({**rec(id=12), "image": None}),
    ]
    path = write_jsonl(root / "d.jsonl", rows)
    records, bad = load_records(path, image_root=root / "images")
    assert [r.id for r in records] == ["1"]
    got = [(b.source, b.id, b.reason) for b in bad]
    expected = [
        (f"{path}:2", "2", "missing field 'chosen'"),
        (f"{path}:3", "3", "unparsable conversation in 'question': does not start with 'USER:'"),
        (f"{path}:4", "4", "empty rejected"),
        (f"{path}:5", "5", "empty blind"),
        (f"{path}:6", "6", "missing image"),
        (f"{path}:7", "7", "undecodable image"),
        (f"{path}:8", "1", f"duplicate id (first at {path}:1)"),
        (f"{path}:9", None, "invalid JSON"),
        (f"{path}:10", None, "not a JSON object"),
        (f"{path}:11", "10", "missing field 'question' (or 'prompt')"),
        (f"{path}:12", "11", "missing field 'image'"),
        (f"{path}:13", "12", "conversation has an <image> marker but 'image' is null"),
    ]
    assert len(got) == len(expected)
    for (source, rid, reason), (e_source, e_id, e_reason) in zip(got, expected):
        assert (source, rid) == (e_source, e_id)
        assert reason.startswith(e_reason), reason
    assert str(root / "images" / "nowhere.png") in bad[4].reason


def test_images_are_not_opened_when_not_checked(root):
    path = write_jsonl(root / "d.jsonl", [rec(id=1, image="nowhere.png"), rec(id=2, image="corrupt.png")])
    records, bad = load_records(path, image_root=root / "images", check_images=False)
    assert [r.id for r in records] == ["1", "2"] and bad == []


def test_raw_records_keep_every_entry_in_order(root):
    path = write_jsonl(root / "d.jsonl", [rec(id=1), "not json", rec(id=3)])
    raw = read_raw_records(path)
    assert [s for s, _ in raw] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert raw[1][1] is None and raw[2][1]["id"] == 3


@pytest.mark.parametrize("content", [None, "", "this is, not json\nnor this\n", "[{\"id\": 1},"])
def test_unreadable_files_raise_naming_the_file(tmp_path, content):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataFileError, match="data.jsonl"):
        load_records(path)


def test_raise_if_bad_lists_every_record_and_the_way_out(root):
    path = write_jsonl(root / "d.jsonl", [rec(id=1, chosen=""), rec(id=2, image="nowhere.png"), "{"])
    _, bad = load_records(path, image_root=root / "images")
    raise_if_bad([], path)  # nothing to report
    with pytest.raises(RecordError) as err:
        raise_if_bad(bad, path)
    message = str(err.value)
    assert f"3 bad record(s) in {path}" in message
    for line, rid, reason in [(1, "1", "empty chosen"), (2, "2", "missing image"), (3, "?", "invalid JSON")]:
        assert f"{path}:{line} (id {rid}): {reason}" in message
    assert "--skip-bad" in message and "data.skip_bad=true" in message


def test_image_paths_outside_the_root_are_refused(root):
    Image.new("RGB", (4, 4)).save(root / "outside.png")  # exists, readable: it must not be read all the same
    rows = [rec(id=1, image="../outside.png"), rec(id=2, image=str(root / "outside.png")),
            rec(id=3, image="./ok.png")]
    path = write_jsonl(root / "d.jsonl", rows)
    for check_images in (True, False):  # a path rule, not an image check: it holds without opening anything
        records, bad = load_records(path, image_root=root / "images", check_images=check_images)
        assert [r.id for r in records] == ["3"]
        assert [(b.source, b.id) for b in bad] == [(f"{path}:1", "1"), (f"{path}:2", "2")]
        assert "'../outside.png' climbs out of the image root" in bad[0].reason
        assert "is absolute" in bad[1].reason
        assert all("data.allow_outside_image_root=true" in b.reason for b in bad)
    records, bad = load_records(path, image_root=root / "images", allow_outside_root=True)
    assert [r.id for r in records] == ["1", "2", "3"] and bad == []


def test_an_image_too_large_is_refused_before_decoding(root):
    from bpo.config import DataConfig

    # 12000 x 12000 = 144M pixels: ~2.4 GB on its way through an image processor. A 1-bit PNG keeps the test cheap.
    Image.new("1", (12000, 12000)).save(root / "images" / "huge.png")
    path = write_jsonl(root / "d.jsonl", [rec(id=1, image="huge.png"), rec(id=2)])
    records, bad = load_records(path, image_root=root / "images")
    assert [r.id for r in records] == ["2"]
    (b,) = bad
    assert b.id == "1" and "huge.png" in b.reason and "12000x12000" in b.reason
    assert f"data.max_image_pixels={DataConfig.max_image_pixels}" in b.reason
    records, bad = load_records(path, image_root=root / "images", max_image_pixels=47)  # ok.png is 8x6 = 48
    assert records == [] and "ok.png has more than data.max_image_pixels=47 pixels (8x6" in bad[1].reason


def test_a_line_that_is_not_utf8_is_a_bad_record(root):
    good = json.dumps(rec(id=1)).encode()
    broken = json.dumps(rec(id=2, chosen="ASSISTANT: caf_")).encode().replace(b"caf_", b"caf\xe9")  # latin-1 'e'
    path = root / "d.jsonl"
    path.write_bytes(good + b"\n" + broken + b"\n" + json.dumps(rec(id=3)).encode() + b"\n")
    records, bad = load_records(str(path), image_root=root / "images")
    assert [r.id for r in records] == ["1", "3"]
    (b,) = bad
    assert b.source == f"{path}:2" and "not UTF-8 (byte 0xe9" in b.reason
    (root / "a.json").write_bytes(b"[\n" + good + b",\n" + broken + b"\n]")
    with pytest.raises(DataFileError, match=r"a.json: line 3 is not UTF-8 \(byte 0xe9"):
        load_records(str(root / "a.json"))


def test_one_object_holding_the_records_is_named(root):
    path = root / "wrapped.json"
    path.write_text(json.dumps({"version": 1, "data": [rec(id=1), rec(id=2)]}, indent=2))
    with pytest.raises(DataFileError, match=r"wrapped.json is one JSON object .*key 'data' holds a list of 2 objects"):
        load_records(str(path))
    single = root / "one.json"  # one record alone on one line is JSONL
    single.write_text(json.dumps(rec(id=5)))
    records, _ = load_records(str(single), image_root=root / "images")
    assert [r.id for r in records] == ["5"]


def test_a_symlink_leading_out_of_the_root_is_refused(root):
    """The root rule holds for the resolved path: a link planted inside the root reads nothing outside it."""
    import os

    Image.new("RGB", (4, 4)).save(root / "outside.png")
    os.symlink(root / "outside.png", root / "images" / "link.png")
    os.symlink(root / "images" / "ok.png", root / "images" / "inside.png")  # stays in the root: fine
    path = write_jsonl(root / "d.jsonl", [rec(id=1, image="link.png"), rec(id=2, image="inside.png")])
    for check_images in (True, False):
        records, bad = load_records(path, image_root=root / "images", check_images=check_images)
        assert [r.id for r in records] == ["2"] and [b.id for b in bad] == ["1"]
        why = bad[0].reason
        assert f"'link.png' resolves through a symlink to {root / 'outside.png'}, outside the image root" in why
    records, bad = load_records(path, image_root=root / "images", allow_outside_root=True)
    assert [r.id for r in records] == ["1", "2"]


def test_a_pair_whose_two_responses_are_the_same_is_a_bad_record(root):
    path = write_jsonl(root / "d.jsonl", [rec(id=1, rejected="ASSISTANT: I can't share private addresses."),
                                          rec(id=2)])
    records, bad = load_records(path, image_root=root / "images")
    assert [r.id for r in records] == ["2"]
    assert (bad[0].id, bad[0].reason) == ("1", "'chosen' and 'rejected' are the same response")
