"""The comparison of evaluated runs, from report.json files shaped as bpo/evaluate.py writes them."""

import json

import pytest
from PIL import Image

from bpo.eval.compare import main


def report(fmt, safety, withheld=None, judge="refusal judge", model="runs/base/hf_model", **extra):
    out = {"model": model, "test_file": f"{fmt}.json", "format": fmt, "judge": judge, "n": 10,
           "safety": {"safety_rate": safety, "parsed": 10}, **extra}
    if withheld is not None:
        out["modality_probe"] = {"overall": {"with_image": {"safety_rate": safety},
                                             "image_withheld": {"safety_rate": withheld}, "gap": safety - withheld}}
    return out


def write(tmp_path, name, rep):
    d = tmp_path / name
    d.mkdir()
    (d / "report.json").write_text(json.dumps(rep))
    return str(d)


def test_one_table_per_benchmark_and_a_chart(tmp_path, capsys):
    runs = [write(tmp_path, "base_mmsb", report("mm_safetybench", 0.5, 0.75,
                                                mm_safetybench={"overall": {"asr": 0.5}})),
            write(tmp_path, "bpo_mmsb", report("mm_safetybench", 0.9, 0.8, model="runs/bpo/hf_model",
                                               mm_safetybench={"overall": {"asr": 0.1}})),
            write(tmp_path, "bpo_vlguard", report("vlguard", 0.8, judge="openai judge",
                                                  benign={"with_image": {"helpfulness": 0.7}}))]
    assert main(runs + ["--names", "base,bpo,bpo", "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert md in capsys.readouterr().out
    assert "## mm_safetybench" in md and "## vlguard" in md
    assert "| base | 10 | 50.0% | 50.0% | 75.0% | -25.0 pt |" in md
    assert "| bpo | 10 | 90.0% | 10.0% | 80.0% | +10.0 pt |" in md
    assert "| bpo | 10 | 80.0% | 70.0% | openai judge |" in md  # columns no vlguard run has are left out
    assert "different judges" not in md
    with Image.open(tmp_path / "cmp" / "comparison.png") as im:
        assert im.size[0] > 100


def test_bad_input_names_the_file(tmp_path):
    d = tmp_path / "eval"
    d.mkdir()
    with pytest.raises(SystemExit, match=r"cannot read .*eval/report.json"):
        main([str(d), "--out", str(tmp_path / "o")])
    (d / "report.json").write_text("{}")
    with pytest.raises(SystemExit, match="has no 'format': not a report.json written by bpo/evaluate.py"):
        main([str(d), "--out", str(tmp_path / "o")])
    ok = write(tmp_path, "ok", report("figstep", 0.5))
    with pytest.raises(SystemExit):
        main([ok, "--names", "a,b", "--out", str(tmp_path / "o")])
