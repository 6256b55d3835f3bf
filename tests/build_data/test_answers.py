"""Reading the endpoint's answers (stages 1 and 4) and the re-ask loop, offline: answers are given through the
content-hash cache, the way a rerun gets them, with the endpoint pointed at a port nothing listens on (so any
request that reached the network would fail). The HTTP path itself is tested against the real server in
test_server.py."""

import sys
import types

import pytest

from bpo.build_data.entity import GivenRecognizer, LLMRecognizer, SpacyRecognizer, parse_entity_answer
from bpo.build_data.llm import REASK, ChatClient, LLMError, ask_until_valid, find_json_object
from bpo.build_data.read import Source
from bpo.build_data.report import Drop
from bpo.build_data.rewrite import LLMRewriter, parse_rewrite_answer
from bpo.config import ConfigError, from_dict
from jobs import free_port

TYPES = ["person", "organization", "place", "object", "group", "event", "work"]
REQUEST = "Where does barack obama live these days with his dog?"


def build_cfg(url="http://127.0.0.1:9/v1", **build):
    return from_dict({"build": {"llm": {"url": url, "model": "m", "max_attempts": 3}, **build}}).build


@pytest.mark.parametrize("text, expected", [
    ('```json\n{"entity": "X", "type": "person"}\n```', {"entity": "X", "type": "person"}),
    ('Sure! {oops} then {"entity": null} and {"later": 1}', {"entity": None}),
    ('{"entity": "X"', None),
    ("[1, 2]", None),
    ("", None),
])
def test_find_json_object(text, expected):
    assert find_json_object(text) == expected


@pytest.mark.parametrize("answer, value, code", [
    ('{"entity": "Barack Obama", "type": "PER"}', ("barack obama", "person"), None),  # as the request writes it
    ('{"entity": "obama", "type": "Person"}', ("obama", "person"), None),
    ('{"entity": null, "type": null}', (None, None), None),
    ("Barack Obama, a person", None, "not_json"),
    ('{"name": "Barack Obama"}', None, "bad_field"),
    ('{"entity": 3, "type": "person"}', None, "bad_field"),
    ('{"entity": "Michelle Obama", "type": "person"}', None, "not_in_request"),
    ('{"entity": "Barack Obama", "type": "DATE"}', None, "bad_type"),
    # in the request, but 9 words: a phrase, not a name
    ('{"entity": "Where does barack obama live these days with his", "type": "person"}', None, "bad_field"),
])
def test_parse_entity_answer(answer, value, code):
    got, problem = parse_entity_answer(answer, REQUEST, TYPES)
    assert got == value and (problem.code if problem else None) == code


@pytest.mark.parametrize("answer, value, code", [
    ('{"question": " Where does the person in the image live now? "}', "Where does the person in the image live now?",
     None),
    ('{"question": "Where does Obama live now?"}', None, "leak"),
    ('{"question": "USER: <image> where?"}', None, "bad_field"),
    ('{"question": ""}', None, "bad_field"),
    ("Where does the person in the image live?", None, "not_json"),
])
def test_parse_rewrite_answer(answer, value, code):
    got, problem = parse_rewrite_answer(answer, "Barack Obama", "person", "the person in the image")
    assert got == value and (problem.code if problem else None) == code


def test_leaking_rewrite_is_reasked_with_the_problem_and_then_accepted(tmp_path):
    b = build_cfg(url=f"http://127.0.0.1:{free_port()}/v1")
    client = ChatClient(b.llm, str(tmp_path / "cache"))
    rewriter = LLMRewriter(b, client)
    first = rewriter.messages("Where does the person in the image live?", "the person in the image")
    leak = '{"question": "Where does Barack Obama live?"}'
    good = '{"question": "Where is the home of the person in the image?"}'
    reask = first + [{"role": "assistant", "content": leak},
                     {"role": "user", "content": 'That answer cannot be used: it names "Barack Obama"; refer to what '
                                                 'the image shows only as "the person in the image". Answer again '
                                                 'with only the JSON object described above.'}]
    client.cache.put(client.key(first, b.rewrite.max_tokens), {"content": leak})
    client.cache.put(client.key(reask, b.rewrite.max_tokens), {"content": good})
    question, attempts = rewriter.rewrite("Where does the person in the image live?", "Barack Obama", "person",
                                          "the person in the image")
    assert (question, attempts) == ("Where is the home of the person in the image?", 2)
    assert client.stats == {"requests": 0, "retries": 0, "cache_hits": 2}


def test_an_answer_that_never_becomes_usable_drops_the_record_after_max_attempts(tmp_path):
    b = build_cfg(url=f"http://127.0.0.1:{free_port()}/v1")
    client = ChatClient(b.llm, str(tmp_path / "cache"))
    recognizer = LLMRecognizer(b, client)
    request = "Where does Barack Obama live?"
    base = recognizer.messages(request)
    assert "one of: person, organization, place, object, group, event, work" in base[0]["content"]
    assert base[0]["content"].endswith("Request: Where does Barack Obama live?\n")
    messages, answers = base, ["no idea", '{"entity": "Michelle"}', '{"entity": "Obama", "type": "planet"}']
    problems = ["it holds no JSON object",
                '"Michelle" does not occur in the request; copy the name exactly as the request writes it']
    for k, answer in enumerate(answers):
        client.cache.put(client.key(messages, b.entity.max_tokens), {"content": answer, "finish_reason": "stop"})
        if k < len(problems):  # only the last failed exchange is kept
            messages = base + [{"role": "assistant", "content": answer},
                               {"role": "user", "content": REASK.format(problem=problems[k])}]
    with pytest.raises(Drop) as e:
        recognizer.recognize(request, None)
    assert e.value.code == "bad_type"
    assert e.value.reason.startswith("no usable answer in 3 attempt(s); last: \"type\" must be one of: person, ")
    assert client.stats["cache_hits"] == 3 and client.stats["requests"] == 0


def test_unreachable_endpoint_stops_the_job_after_its_retries(tmp_path):
    port = free_port()
    b = build_cfg(url=f"http://127.0.0.1:{port}/v1")
    b.llm.max_retries = 2
    client = ChatClient(b.llm, str(tmp_path / "cache"), sleep=lambda s: None)
    with pytest.raises(LLMError, match=f"127.0.0.1:{port}/v1/chat/completions did not answer \\(3 attempts"):
        ask_until_valid(client, [{"role": "user", "content": "hi"}], 8, lambda c: (c, None), 3)
    assert client.stats == {"requests": 3, "retries": 2, "cache_hits": 0}


def test_a_remote_endpoint_needs_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("BPO_TEST_KEY", raising=False)
    b = build_cfg(url="https://api.example.com/v1")
    b.llm.api_key_env = "BPO_TEST_KEY"
    with pytest.raises(ConfigError, match="needs an API key: set the environment variable BPO_TEST_KEY"):
        ChatClient(b.llm, str(tmp_path / "cache"))


def test_given_and_spacy_backends(monkeypatch):
    b = build_cfg()
    source = Source("1", "x", (), "a", "b", {"entity": "Barack Obama", "entity_type": "PERSON"})
    assert GivenRecognizer(b).recognize("Is barack obama tall?", source) == ("barack obama", "person", 0)
    with pytest.raises(Drop, match="does not occur in the request"):
        GivenRecognizer(b).recognize("Is he tall?", source)

    ents = [types.SimpleNamespace(text="2009", label_="DATE"), types.SimpleNamespace(text="NASA", label_="ORG"),
            types.SimpleNamespace(text="Paris", label_="GPE")]
    loaded = []

    def load(name):
        loaded.append(name)
        return lambda text: types.SimpleNamespace(ents=ents if "NASA" in text else [])

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load, __version__="3.8"))
    b.entity.backend, b.entity.spacy_model = "spacy", "en_core_web_sm"
    spacy = SpacyRecognizer(b)
    assert spacy.recognize("In 2009 NASA went to Paris.", None) == ("NASA", "organization", 0)
    with pytest.raises(Drop, match="spaCy found no entity") as e:
        spacy.recognize("nothing here", None)
    assert e.value.code == "no_entity" and loaded == ["en_core_web_sm"]
