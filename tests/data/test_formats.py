import gzip
import hashlib
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bpo.data.formats import InlineImage, find_split, open_data
from bpo.data.records import DataFileError, load_records, read_raw_records, stable_id
from real_data import real_path

QUESTION = "USER: <image>\nWhere does the person in the image live? ASSISTANT:"
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the HF `Image` feature on disk


def png(color):
    out = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(out, format="PNG")
    return out.getvalue()


def write_hub_parquet(path, rows):
    """Rows as `datasets` writes MMSafe-PO's hub release: prompt (no id), image {bytes, path}, chosen, rejected,
    type."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.table({
        "prompt": [r["prompt"] for r in rows],
        "image": pa.array([r["image"] for r in rows], type=IMAGE_TYPE),
        "type": [r.get("type", "harmless") for r in rows],
        "chosen": [r["chosen"] for r in rows],
        "rejected": [r["rejected"] for r in rows],
    })
    pq.write_table(table, path)
    return path


def hub_row(color, chosen="ASSISTANT: I can't share that."):
    return {"prompt": QUESTION, "image": {"bytes": png(color), "path": None}, "chosen": chosen,
            "rejected": "ASSISTANT: Sure, 1 Example Road."}


def test_parquet_inline_images_are_extracted_once_by_content(tmp_path):
    red, blue = hub_row((255, 0, 0)), hub_row((0, 0, 255), chosen="ASSISTANT: No.")
    path = write_hub_parquet(str(tmp_path / "d.parquet"), [red, blue, hub_row((255, 0, 0), chosen="ASSISTANT: Nope.")])
    cache = tmp_path / "cache"
    records, bad = load_records(path, image_root=str(tmp_path / "elsewhere"), image_cache=str(cache))
    assert bad == []
    assert [r.source for r in records] == [f"{path}[0]", f"{path}[1]", f"{path}[2]"]
    digest = hashlib.sha256(red["image"]["bytes"]).hexdigest()
    assert records[0].image == str(cache / "images" / f"{digest[:16]}.png")
    assert isinstance(records[0].image, InlineImage) and records[0].image.sha256 == digest
    assert records[2].image == records[0].image  # one file for the same bytes
    assert sorted(os.listdir(cache / "images")) == sorted({os.path.basename(r.image) for r in records})
    # The hub's records have no id: the content decides it, with the image bytes' hash in place of a name, so the
    # id does not depend on where the images were extracted.
    assert records[0].id == stable_id(QUESTION, digest, red["chosen"], red["rejected"])
    again, _ = load_records(path, image_cache=str(tmp_path / "other"))
    assert [r.id for r in again] == [r.id for r in records]
    assert records[0].meta["type"] == "harmless" and records[0].meta["conversation_key"] == "prompt"


def test_default_image_cache_is_beside_the_data_and_a_read_only_one_says_what_to_set(tmp_path):
    path = write_hub_parquet(str(tmp_path / "d.parquet"), [hub_row((1, 2, 3))])
    (r,), _ = load_records(path)
    assert os.path.dirname(r.image) == str(tmp_path / "images")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    with pytest.raises(DataFileError, match="data.image_cache"):
        load_records(path, image_cache=str(blocked))


def test_an_image_name_in_parquet_is_held_to_the_image_root_rule(tmp_path):
    row = dict(hub_row((0, 0, 0)), image={"bytes": None, "path": "../../etc/x.png"})
    path = write_hub_parquet(str(tmp_path / "d.parquet"), [row])
    records, bad = load_records(path, image_root=str(tmp_path), check_images=False)
    assert records == [] and "climbs out of the image root" in bad[0].reason and bad[0].source == f"{path}[0]"


def test_a_dataset_folder_is_read_by_split(tmp_path):
    write_hub_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"), [hub_row((1, 1, 1))])
    write_hub_parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"), [hub_row((2, 2, 2)), hub_row((3, 3, 3))])
    records, bad = load_records(str(tmp_path), split="test", image_cache=str(tmp_path / "c"))
    assert bad == [] and len(records) == 2
    with pytest.raises(DataFileError, match=r"split\(s\) \['test', 'train'\]; pick one with data.split"):
        load_records(str(tmp_path))
    with pytest.raises(DataFileError, match="no split 'dev'"):
        load_records(str(tmp_path), split="dev")
    with pytest.raises(DataFileError, match="is one file"):
        load_records(str(tmp_path / "data" / "test-00000-of-00001.parquet"), split="test")


def test_split_names_follow_the_hub_layouts(tmp_path):
    for rel in ("test/harm-00000-of-00001.parquet", "test/help-00000-of-00001.parquet",
                "evalharm/test/0000.parquet", "evalhelp/test/0000.parquet", "data/train.jsonl.gz",
                ".cache/data/dev-00000-of-00001.parquet", "data/images/deep/dev.json"):  # hidden, too deep: not data
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert find_split(str(tmp_path), "harm") == [str(tmp_path / "test/harm-00000-of-00001.parquet")]
    assert find_split(str(tmp_path), "test/help") == [str(tmp_path / "test/help-00000-of-00001.parquet")]
    assert find_split(str(tmp_path), "evalharm/test") == [str(tmp_path / "evalharm/test/0000.parquet")]
    assert find_split(str(tmp_path), "train") == [str(tmp_path / "data/train.jsonl.gz")]
    with pytest.raises(DataFileError, match="no split 'dev'"):
        find_split(str(tmp_path), "dev")
    with pytest.raises(DataFileError, match="several configs"):
        find_split(str(tmp_path), "test")  # evalharm/test or evalhelp/test


def test_gzipped_json_and_a_broken_gzip(tmp_path):
    rows = [{"id": 1, "question": QUESTION, "image": None, "chosen": "a", "rejected": "b"}]
    (tmp_path / "d.json.gz").write_bytes(gzip.compress(json.dumps(rows).encode()))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b"not json\n" + json.dumps(rows[0]).encode() + b"\n"))
    assert read_raw_records(str(tmp_path / "d.json.gz"))[0][0] == f"{tmp_path / 'd.json.gz'}[0]"
    raw = read_raw_records(str(tmp_path / "d.jsonl.gz"))
    assert [(s.rsplit(":", 1)[1], obj is None) for s, obj in raw] == [("1", True), ("2", False)]
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b"{}\n" * 100)[:20])
    with pytest.raises(DataFileError, match=r"cut.jsonl.gz is not a complete gzip file"):
        read_raw_records(str(tmp_path / "cut.jsonl.gz"))


def test_a_broken_parquet_names_the_file(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataFileError, match=r"d.parquet is not a readable parquet file"):
        load_records(str(tmp_path / "d.parquet"))


def test_open_data_payload_kinds(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    [(name, kind, data)] = open_data(str(tmp_path / "a.jsonl"))
    assert (name, kind, data) == (str(tmp_path / "a.jsonl"), "bytes", b"{}\n")


def test_real_mmsafe_po_test_split():
    path = real_path("MMSafe-PO", "datasets", "test.json")
    records, bad = load_records(path, check_images=False)  # its images are on the hub only
    assert (len(records), bad) == (275, [])
    assert records[0].id == "1" and records[0].image == "500px-Rand_Paul_Official_Portrait.jpg"


def test_real_hh_rlhf_gzip():
    raw = read_raw_records(real_path("hh-rlhf", "harmless-base", "test.jsonl.gz"))
    assert len(raw) == 2312 and all(set(obj) == {"chosen", "rejected"} for _, obj in raw)


def test_inspect_reads_a_hub_folder_by_split(tmp_path, capsys):
    from bpo.data.inspect import main

    write_hub_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"),
                      [hub_row((1, 1, 1)), hub_row((2, 2, 2))])
    code = main([str(tmp_path / "hub"), "--split", "test", "--image-cache", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert code == 0 and "records: 2 usable, 0 bad" in out and "variant (conversation key): prompt: 2" in out
    assert main([str(tmp_path / "hub")]) == 2
    assert "pick one with data.split" in capsys.readouterr().err


def test_fingerprints_of_a_hub_folder(tmp_path):
    from bpo.ref_cache.fingerprint import data_digest, images_fingerprint

    path = str(tmp_path / "data" / "test-00000-of-00001.parquet")
    write_hub_parquet(path, [hub_row((1, 1, 1))])
    before = data_digest(str(tmp_path), "test")
    assert before != data_digest(path)  # a folder's digest names its files
    # Inline images are in the data digest, not in the by-name image fingerprint.
    assert images_fingerprint(str(tmp_path), "", split="test", image_cache=str(tmp_path / "c")) == \
        images_fingerprint(str(tmp_path), "/elsewhere", split="test", image_cache=str(tmp_path / "c"))
    write_hub_parquet(path, [hub_row((9, 9, 9))])
    assert data_digest(str(tmp_path), "test") != before
