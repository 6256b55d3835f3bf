"""Per-set metrics, the modality gap and over-refusal."""

import pytest

from bpo.eval.examples import EvalExample
from bpo.eval.judges import Verdict
from bpo.eval.metrics import (WITHHELD, benign_rates, modality_gap, mm_safetybench_asr, safety_rate,
                              spa_vl_unsafe_rate)


def ex(i, **meta):
    return EvalExample(i, [], None, meta)


def test_safety_rate_counts_unparsable():
    verdicts = [Verdict("1", "safe", ""), Verdict("2", "unsafe", ""), Verdict("3", None, "??"),
                Verdict("4", "safe", "")]
    assert safety_rate(verdicts) == {"n": 4, "parsed": 3, "unparsable": 1, "safe": 2, "unsafe": 1,
                                     "safety_rate": 2 / 3}
    assert safety_rate([Verdict("1", None, "")])["safety_rate"] is None


def test_mm_safetybench_asr_per_scenario_and_image_type():
    examples = [ex("a", scenario="01-Illegal_Activitiy", image_type="SD"),
                ex("b", scenario="01-Illegal_Activitiy", image_type="TYPO"),
                ex("c", scenario="02-HateSpeech", image_type="SD"),
                ex("d", scenario="02-HateSpeech", image_type="TYPO")]
    verdicts = [Verdict("d", None, ""), Verdict("c", "safe", ""), Verdict("b", "unsafe", ""),
                Verdict("a", "unsafe", "")]
    out = mm_safetybench_asr(examples, verdicts)
    assert out["overall"]["asr"] == 2 / 3 and out["overall"]["unparsable"] == 1
    assert out["per_scenario"]["01-Illegal_Activitiy"]["asr"] == 1.0
    assert out["per_scenario"]["02-HateSpeech"] == {"n": 2, "parsed": 1, "unparsable": 1, "safe": 1, "unsafe": 0,
                                                    "asr": 0.0}
    assert out["per_image_type"]["SD"]["asr"] == 0.5 and out["per_image_type"]["TYPO"]["asr"] == 1.0
    with pytest.raises(ValueError, match="do not match"):
        mm_safetybench_asr(examples, verdicts[:3])


def test_spa_vl_unsafe_rate():
    examples = [ex("x", class1="Malicious Use"), ex("y", class1="Malicious Use"), ex("z", class1="Privacy")]
    out = spa_vl_unsafe_rate(examples, [Verdict("x", "unsafe", ""), Verdict("y", "safe", ""), Verdict("z", None, "")])
    assert out["overall"]["unsafe_rate"] == 0.5 and out["overall"]["unparsable"] == 1
    assert out["per_class1"]["Malicious Use"]["unsafe_rate"] == 0.5
    assert out["per_class1"]["Privacy"]["unsafe_rate"] is None


def test_modality_gap_per_category():
    examples = [ex("a", scenario="s1"), ex("b", scenario="s1"), ex("c", scenario="s2"), ex("text-only", scenario="s2")]
    examples += [ex(f"{e}#no_image", scenario="ignored", **{WITHHELD: True, "probe_of": e}) for e in "abc"]
    verdicts = [Verdict("a", "unsafe", ""), Verdict("b", "safe", ""), Verdict("c", None, ""),
                Verdict("text-only", "safe", ""), Verdict("a#no_image", "safe", ""), Verdict("b#no_image", "safe", ""),
                Verdict("c#no_image", "safe", "")]
    out = modality_gap(examples, verdicts, "scenario")
    assert list(out) == ["overall", "s1", "s2"]  # categories of the example shown the image
    assert out["s1"]["with_image"]["safety_rate"] == 0.5 and out["s1"]["image_withheld"]["safety_rate"] == 1.0
    assert out["s1"]["gap"] == -0.5
    assert out["s2"]["gap"] is None and out["s2"]["with_image"]["unparsable"] == 1
    assert out["overall"]["with_image"]["n"] == 3 and out["overall"]["gap"] == 0.5 - 1.0


def test_benign_rates():
    examples = [ex("a", benign=True), ex("b", benign=True), ex("h"), ex("a#no_image", benign=True, **{WITHHELD: True})]
    out = benign_rates(examples, {"a": True, "b": False, "a#no_image": False})
    assert out == {"with_image": {"n": 2, "refused": 1, "over_refusal_rate": 0.5, "helpfulness": 0.5},
                   "image_withheld": {"n": 1, "refused": 0, "over_refusal_rate": 0.0, "helpfulness": 1.0}}
