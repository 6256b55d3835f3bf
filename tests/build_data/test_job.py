"""`python -m bpo.build_data` end to end against the real vLLM CPU server (tests/servers.py), on HH transcripts and
an image bank written here: the records whose endpoint answers the test gives through the answer cache come out as
hand-written MMSafe-PO records that bpo.data.inspect accepts, the rest are reported at the stage that dropped them
(the unreadable, the repeated, the one without a bank image, the one whose history still names the entity, and the
one left to the tiny model's noise, asked for real). A kill after two shards resumes without redoing them, and a
rerun on the same cache asks nothing and writes the same bytes."""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from bpo.build_data.entity import LLMRecognizer
from bpo.build_data.llm import REASK, ChatClient
from bpo.build_data.read import content_id
from bpo.build_data.rewrite import LLMRewriter
from bpo.config import load_config
from jobs import REPO, write_config

pytestmark = pytest.mark.server
PERSON, PLACE = "the person in the image", "the place shown in the image"


def hh(*turns):
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


def pair(history, chosen, rejected):
    return {"chosen": hh(*history, ("Assistant", chosen)), "rejected": hh(*history, ("Assistant", rejected))}


OBAMA = pair([("Human", "Where does Barack Obama live?")], "I can't share where he lives.",
             "He lives at 1600 Pennsylvania Ave.")
EIFFEL = pair([("Human", "I love Paris."), ("Assistant", "It is lovely."),
               ("Human", "How do I climb the Eiffel Tower at night without being seen?")],
              "Please don't; it is dangerous and illegal.", "Wait until the guards leave, then use the stairs.")
ZORBLAX = pair([("Human", "How do I hack into Zorblax Corp's servers?")], "I can't help with that.",
               "Start with a port scan.")
SWIFT = pair([("Human", "Tell me where Taylor Swift will be tomorrow so I can follow her.")], "I won't help.",
             "She will be at the stadium.")
SPLIT = {"chosen": hh(("Human", "a"), ("Assistant", "b"), ("Human", "c"), ("Assistant", "d")),
         "rejected": hh(("Human", "a"), ("Assistant", "B"), ("Human", "c"), ("Assistant", "e"))}
MUSK = pair([("Human", "Is Elon Musk rich?"), ("Assistant", "Musk is very rich."),
             ("Human", "What is Elon Musk's home address?")], "I can't share that.", "It is 1 Rocket Road.")
LINES = [OBAMA, EIFFEL, ZORBLAX, SWIFT, SPLIT, OBAMA, MUSK]


def png(path, color):
    Image.new("RGB", (6, 6), color).save(path)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16] + ".png"


@pytest.fixture(scope="module")
def setup(vllm_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    (root / "bank").mkdir()
    images = {name: png(str(root / "bank" / f"{name}.png"), color) for name, color in
              [("Barack_Obama", (200, 10, 10)), ("Eiffel_Tower", (10, 200, 10)), ("Elon_Musk", (10, 10, 200))]}
    data = root / "hh.jsonl"
    data.write_text("".join(json.dumps(obj) + "\n" for obj in LINES))
    config = write_config(root / "build.yaml", {"build": {
        "input_file": str(data), "image": {"bank": str(root / "bank")}, "batch_size": 1, "batches_per_shard": 1,
        "llm": {"url": vllm_server.url, "model": vllm_server.model, "cache_dir": str(root / "cache"),
                "max_attempts": 3, "workers": 2},
        "entity": {"max_tokens": 16}, "rewrite": {"max_tokens": 16}}})
    give_answers(config)
    return root, config, images, str(data)


def give_answers(config):
    """The endpoint's answers for every record but SWIFT, written into the cache the way a rerun would find them."""
    b = load_config(config).build
    client = ChatClient(b.llm, b.llm.cache_dir)
    entity, rewrite = LLMRecognizer(b, client), LLMRewriter(b, client)

    def answer(messages, max_tokens, content):
        client.cache.put(client.key(messages, max_tokens), {"content": content, "finish_reason": "stop"})

    for request, found in [("Where does Barack Obama live?", '{"entity": "Barack Obama", "type": "person"}'),
                           ("How do I climb the Eiffel Tower at night without being seen?",
                            'Here you go: {"entity": "Eiffel Tower", "type": "GPE"}'),
                           ("How do I hack into Zorblax Corp's servers?", '{"entity": "Zorblax Corp", "type": "ORG"}'),
                           ("What is Elon Musk's home address?", '{"entity": "Elon Musk", "type": "PER"}')]:
        answer(entity.messages(request), 16, found)
    answer(rewrite.messages("Where does the person in the image live?", PERSON), 16,
           '{"question": "Where is the home of the person in the image?"}')
    first = rewrite.messages("How do I climb the place shown in the image at night without being seen?", PLACE)
    leak = '{"question": "How can I climb the Eiffel Tower at night unseen?"}'
    answer(first, 16, leak)
    answer(first + [{"role": "assistant", "content": leak},
                    {"role": "user", "content": REASK.format(problem=f'it names "Eiffel Tower"; refer to what the '
                                                                     f'image shows only as "{PLACE}"')}], 16,
           '{"question": "How can I climb the place shown in the image at night without being seen?"}')


def build(config, out, env=None, check=True):
    full_env = dict(os.environ, PYTHONPATH=REPO, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "bpo.build_data", "--config", config, f"build.output_file={out}"],
                          cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"build failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def expected_records(data, images):
    return [
        {"id": content_id(OBAMA), "question": "USER: <image>\nWhere is the home of the person in the image? ASSISTANT:",
         "image": images["Barack_Obama"], "chosen": "ASSISTANT: I can't share where he lives.",
         "rejected": "ASSISTANT: He lives at 1600 Pennsylvania Ave.", "text_prompt": "Where does Barack Obama live?",
         "entity": "Barack Obama", "entity_type": "person",
         "image_source": {"bank": "Barack_Obama", "file": "Barack_Obama.png", "similarity": 1.0},
         "replacement": PERSON, "mid_prompt": "Where does the person in the image live?", "origin": f"{data}:1",
         "trace": {"entity_attempts": 1, "mentions_replaced": 1, "rewrite_attempts": 1}},
        {"id": content_id(EIFFEL),
         "question": "USER: I love Paris. ASSISTANT: It is lovely. USER: <image>\nHow can I climb the place shown in "
                     "the image at night without being seen? ASSISTANT:",
         "image": images["Eiffel_Tower"], "chosen": "ASSISTANT: Please don't; it is dangerous and illegal.",
         "rejected": "ASSISTANT: Wait until the guards leave, then use the stairs.",
         "text_prompt": "How do I climb the Eiffel Tower at night without being seen?", "entity": "Eiffel Tower",
         "entity_type": "place",
         "image_source": {"bank": "Eiffel_Tower", "file": "Eiffel_Tower.png", "similarity": 1.0},
         "replacement": PLACE, "mid_prompt": "How do I climb the place shown in the image at night without being seen?",
         "origin": f"{data}:2", "trace": {"entity_attempts": 1, "mentions_replaced": 1, "rewrite_attempts": 2}},
    ]


def test_build_resumes_reports_every_drop_and_inspect_accepts_it(setup, capsys):
    from bpo.build_data.job import main
    from bpo.data.inspect import main as inspect

    root, config, images, data = setup
    out = str(root / "out" / "train.jsonl")
    killed = build(config, out, env={"BPO_CRASH_AFTER": "build_shards:2"}, check=False)
    assert killed.returncode == 17 and not os.path.exists(out)
    proc = build(config, out)
    assert "5 items in 5 shards, 2 already done" in proc.stdout
    assert re.search(r"build: +\d+%.*\[\d\d:\d\d<\d\d:\d\d", proc.stderr)  # the bar, elapsed<left
    rows = [json.loads(line) for line in open(out)]
    assert rows == expected_records(data, images)

    report = json.load(open(out + ".report.json"))
    assert [(s["stage"], s["in"], s["out"]) for s in report["stages"]] == [
        ("read", 7, 5), ("entity", 5, 4), ("image", 4, 3), ("replace", 3, 2), ("rewrite", 2, 2), ("check", 2, 2)]
    drops = {d["origin"].rsplit(":", 1)[1]: (d["stage"], d["code"]) for d in report["drops"]}
    assert {k: v for k, v in drops.items() if k != "4"} == {
        "3": ("image", "no_image"), "5": ("read", "unreadable"), "6": ("read", "duplicate"), "7": ("replace", "leak")}
    assert drops["4"][0] == "entity" and drops["4"][1] in {"not_json", "bad_field", "not_in_request", "bad_type"}
    by_line = {d["origin"].rsplit(":", 1)[1]: d for d in report["drops"]}
    assert by_line["7"]["reason"].startswith("turn 2 (assistant) still names 'Musk' after replacement")
    assert by_line["7"]["fields"]["mid_prompt"] == "What is the person in the image's home address?"
    assert by_line["3"]["fields"] == {"text_prompt": "How do I hack into Zorblax Corp's servers?",
                                      "entity": "Zorblax Corp", "entity_type": "organization",
                                      "trace": {"entity_attempts": 1}}
    # the Swift record (shard 4, after the kill) was the only one asked for real: three attempts
    assert report["endpoint_this_run"]["requests"] == 3
    # images of the records written, none of the Musk record dropped after its image was found
    assert sorted(os.listdir(root / "out" / "train_images")) == sorted([images["Barack_Obama"],
                                                                        images["Eiffel_Tower"]])

    assert inspect([out, "--image-root", str(root / "out" / "train_images")]) == 0
    assert "records: 2 usable, 0 bad" in capsys.readouterr().out

    # Same answers, same records: a build into a new output on the same cache asks nothing.
    again = str(root / "again" / "train.jsonl")
    assert main(["--config", config, f"build.output_file={again}"]) == 0
    assert open(again).read() == open(out).read()
    assert json.load(open(again + ".report.json"))["endpoint_this_run"]["requests"] == 0
