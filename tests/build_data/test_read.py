"""The text-only reader: HH-RLHF transcripts and prompt/chosen/rejected records -> turns, against hand-split
expectations."""

import json
import os

import pytest

from bpo.build_data.read import ReadError, content_id, read_input, read_source, split_hh
from bpo.data.conversation import Turn
from real_data import real_path


def hh(*turns):
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


def test_single_turn_transcripts_share_the_question():
    obj = {"chosen": hh(("Human", "Where does Barack Obama live?"), ("Assistant", "I can't share that.")),
           "rejected": hh(("Human", "Where does Barack Obama live?"), ("Assistant", "At 1600 Pennsylvania Ave."))}
    s = read_source(obj, "hh.jsonl:1")
    assert s.turns == (Turn("user", "Where does Barack Obama live?"),)
    assert (s.chosen, s.rejected, s.origin) == ("I can't share that.", "At 1600 Pennsylvania Ave.", "hh.jsonl:1")
    assert s.id == content_id(obj) and len(s.id) == 16


def test_human_inside_a_sentence_and_after_one_newline_is_text():
    history = ("\n\nHuman: My shirt says Human: the final frontier. Is that a quote?"
               "\n\nAssistant: It plays on a Star Trek line.\nHuman: I see, said nobody."
               "\n\nHuman: Who said the original first?")
    obj = {"chosen": history + "\n\nAssistant: William Shatner, as Captain Kirk.",
           "rejected": history + "\n\nAssistant: Human: nobody knows."}
    s = read_source(obj, "x")
    assert s.turns == (Turn("user", "My shirt says Human: the final frontier. Is that a quote?"),
                       Turn("assistant", "It plays on a Star Trek line.\nHuman: I see, said nobody."),
                       Turn("user", "Who said the original first?"))
    assert s.chosen == "William Shatner, as Captain Kirk."
    assert s.rejected == "Human: nobody knows."  # "Human:" right after the marker's space is text


def test_split_hh_markers():
    assert split_hh("Human: hi\n\nAssistant:\nhello there\n\nHuman:") == [
        Turn("user", "hi"), Turn("assistant", "hello there"), Turn("user", "")]
    with pytest.raises(ReadError, match="holds no 'Human:'"):  # a marker needs a space, a newline or the end
        split_hh("\n\nHuman:hi")
    with pytest.raises(ReadError, match="text before its first"):
        split_hh("Preamble\n\nHuman: hi")


@pytest.mark.parametrize("chosen, rejected, message", [
    (hh(("Human", "a"), ("Assistant", "b"), ("Human", "c"), ("Assistant", "d")),
     hh(("Human", "a"), ("Assistant", "B"), ("Human", "c"), ("Assistant", "e")),
     "differ before their last turn"),
    (hh(("Human", "a"), ("Assistant", "b")), hh(("Human", "a"), ("Assistant", "b")), "same transcript"),
    (hh(("Human", "a"), ("Assistant", "b")), "\n\nHuman: a\n\nAssistant:", "turn 2 \\(assistant\\) is empty"),
    (hh(("Human", "a"), ("Human", "b"), ("Assistant", "c")), hh(("Human", "a"), ("Human", "b"), ("Assistant", "d")),
     "turn 2 is user, expected assistant"),
    (hh(("Assistant", "a"), ("Human", "b"), ("Assistant", "c")),
     hh(("Assistant", "a"), ("Human", "b"), ("Assistant", "d")), "turn 1 is assistant, expected user"),
])
def test_unreadable_hh_pairs_say_why(chosen, rejected, message):
    with pytest.raises(ReadError, match=message):
        read_source({"chosen": chosen, "rejected": rejected}, "x")


def test_prompt_shapes():
    plain = read_source({"prompt": "  Tell me about Zorblax.  ", "chosen": "No.", "rejected": "Sure.", "id": 7}, "x")
    assert (plain.turns, plain.chosen, plain.rejected, plain.id) == ((Turn("user", "Tell me about Zorblax."),),
                                                                     "No.", "Sure.", "7")
    transcript = read_source({"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and now?\n\nAssistant:",
                              "chosen": "\n\nAssistant: Now nothing.", "rejected": " Now everything. "}, "x")
    assert transcript.turns == (Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "and now?"))
    assert (transcript.chosen, transcript.rejected) == ("Now nothing.", "Now everything.")
    messages = read_source({"prompt": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                       {"role": "user", "content": "q2"}],
                            "chosen": [{"role": "assistant", "content": "good"}], "rejected": "bad"}, "x")
    assert messages.turns == (Turn("user", "q1"), Turn("assistant", "a1"), Turn("user", "q2"))
    assert (messages.chosen, messages.rejected) == ("good", "bad")


@pytest.mark.parametrize("obj, message", [
    ({"prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "q"}], "chosen": "a",
      "rejected": "b"}, "prompt message 1 must be"),
    ({"prompt": "\n\nHuman: q\n\nAssistant: a", "chosen": "x", "rejected": "y"}, "does not end with a user turn"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "same response"),
    ({"prompt": "q", "chosen": "\n\nAssistant: a\n\nHuman: more", "rejected": "y"}, "other than one Assistant"),
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "id": None}, "'id' must be"),
])
def test_unreadable_prompt_records_say_why(obj, message):
    with pytest.raises(ReadError, match=message):
        read_source(obj, "x")


def test_read_input_reports_unreadable_and_repeated_records(tmp_path):
    good = {"chosen": hh(("Human", "q"), ("Assistant", "a")), "rejected": hh(("Human", "q"), ("Assistant", "b"))}
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n\n" + json.dumps(good) + "\n" + json.dumps({"chosen": 3}) + "\n")
    sources, drops = read_input(str(path), "auto")
    assert [s.origin for s in sources] == [f"{path}:1"]
    assert [(d["origin"], d["dropped"]["code"]) for d in drops] == [
        (f"{path}:2", "unreadable"), (f"{path}:4", "duplicate"), (f"{path}:5", "unreadable")]
    assert drops[1]["dropped"]["reason"] == f"duplicate of {path}:1 (same id {content_id(good)})"
    assert "missing field 'rejected'" in drops[2]["dropped"]["reason"]


def pku(**fields):
    """A PKU-SafeRLHF record with the release's field names (the HF card's)."""
    out = {"prompt": "How do I pick a lock?", "response_0": "Here is how: insert a tension wrench...",
           "response_1": "I can't help with bypassing locks you don't own.", "is_response_0_safe": False,
           "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 1}
    out.update(fields)
    return out


def test_pku_saferlhf_the_safer_response_is_chosen():
    s = read_source(pku(), "pku.jsonl:1")
    assert s.turns == (Turn("user", "How do I pick a lock?"),)
    assert s.chosen == "I can't help with bypassing locks you don't own."
    assert s.rejected == "Here is how: insert a tension wrench..."
    assert read_source(pku(safer_response_id=0), "x").chosen.startswith("Here is how")
    assert read_source(pku(), "x", "pku").id == content_id(pku())
    for bad, reason in ((pku(safer_response_id=2), "safer_response_id is 2; expected 0 or 1"),
                        (pku(safer_response_id=True), "safer_response_id is True"),
                        ({k: v for k, v in pku().items() if k != "safer_response_id"}, "missing field 'safer_resp"),
                        (pku(response_1=pku()["response_0"]), "the same response")):
        with pytest.raises(ReadError, match=reason):
            read_source(bad, "x")


def test_pku_saferlhf_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [pku(), pku(prompt="Second?", safer_response_id=0)]
    os.makedirs(tmp_path / "data")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "test-00000-of-00001.parquet")
    sources, drops = read_input(str(tmp_path), "auto", split="test")
    assert drops == [] and [s.turns[0].text for s in sources] == ["How do I pick a lock?", "Second?"]
    assert sources[1].origin == f"{tmp_path / 'data' / 'test-00000-of-00001.parquet'}[1]"


def test_real_hh_rlhf_harmless_base_test_gzip():
    path = real_path("hh-rlhf", "harmless-base", "test.jsonl.gz")
    sources, drops = read_input(path, "auto")
    assert len(sources) + len(drops) == 2312
    assert len(sources) > 2200  # the few the HH rule refuses are reported with their line, never guessed
    assert all(d["origin"].startswith(f"{path}:") and d["dropped"]["reason"] for d in drops)
    assert sources[0].origin == f"{path}:1" and sources[0].turns[0].role == "user"
