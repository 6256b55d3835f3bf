"""Text-only preference records -> (conversation turns, chosen, rejected), the data builder's input.

    sources, drops = read_input(path, input_format, split)  # any file bpo.data.formats reads (JSON, JSONL, either
                                                            # gzipped, parquet, a hub folder with a split)

Three shapes, chosen per record by build.input_format (`auto`: a record with `response_0` is the PKU shape, one with
`prompt` the prompt shape, any other the HH shape):

- **hh** (Anthropic HH-RLHF): `chosen` and `rejected` are whole transcripts, `"\\n\\nHuman: ...\\n\\nAssistant: ..."`.
  Both are split into turns; the turns they share are the conversation, and each must add exactly one Assistant
  turn after it: that turn is the response.
- **prompt**: `prompt` with `chosen` and `rejected` responses. The prompt is an HH transcript (a trailing empty
  `Assistant:` is the generation prompt and is dropped), a list of chat messages (`{"role", "content"}`, roles user
  and assistant), or any other string, which is one user turn. A response is a string (an HH `Assistant:` prefix is
  dropped) or a list holding one assistant message.
- **pku** (PKU-SafeRLHF): `prompt` with two responses `response_0` and `response_1`; `safer_response_id` (0 or 1)
  names the chosen one, the other is rejected. The release's other fields (`better_response_id`,
  `is_response_*_safe`, harm categories, severity) stay in `raw`.

HH turn rule: a turn starts at `Human:` or `Assistant:` at the very start of the transcript or right after a blank
line ("\\n\\n"), followed by a space, a newline or the end. Anywhere else ("the label read Human: ...", a marker
after a single newline) the words are text. Turn text is stripped. Limit: a turn that itself holds a blank line
followed by "Human: " is split there; the transcript cannot say otherwise.

A record that cannot be read this way is reported (`ReadError`, with the reason), never guessed at: roles that do
not alternate, an empty turn, transcripts that differ before their last turn, a conversation that does not end
with a user turn, an empty or identical pair of responses, and an id (its own, or the hash of its content for a
record without one) that an earlier record has.
"""

import hashlib
import json
import re
from dataclasses import dataclass

from bpo.data.conversation import Turn
from bpo.data.records import read_raw_records

_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):(?= |\n|$)")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_CHAT_ROLES = ("user", "assistant")


class ReadError(ValueError):
    pass


@dataclass(frozen=True)
class Source:
    """One text-only preference record, read."""

    id: str  # the record's own `id`, or a hash of its content
    origin: str  # "FILE:LINE" or "FILE[INDEX]"
    turns: tuple  # Turn, ..., ending with the user turn the responses answer
    chosen: str
    rejected: str
    raw: dict  # the input record as it was (the `given` entity backend reads its fields)


def split_hh(transcript, what="transcript"):
    """An HH transcript -> [Turn], in order. Text before the first marker must be blank."""
    if not isinstance(transcript, str):
        raise ReadError(f"{what} is {type(transcript).__name__}, not a string")
    marks = list(_HH_MARKER.finditer(transcript))
    if not marks:
        raise ReadError(f"{what} holds no 'Human:' / 'Assistant:' turn (HH turns start after a blank line)")
    if transcript[:marks[0].start()].strip():
        raise ReadError(f"{what} has text before its first 'Human:' / 'Assistant:' marker")
    turns = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(transcript)
        turns.append(Turn(_HH_ROLES[m.group(1)], transcript[m.end():end].strip()))
    return turns


def _check_alternation(turns, what, last_may_be_empty=False):
    for k, turn in enumerate(turns):
        expected = _CHAT_ROLES[k % 2]
        if turn.role != expected:
            raise ReadError(f"{what}: turn {k + 1} is {turn.role}, expected {expected} (turns must alternate, "
                            f"starting with the user)")
        if not turn.text and not (last_may_be_empty and k == len(turns) - 1):
            raise ReadError(f"{what}: turn {k + 1} ({turn.role}) is empty")


def read_hh(obj):
    """(conversation turns, chosen, rejected) from an HH-RLHF record."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise ReadError(f"missing field {key!r} (an HH record holds 'chosen' and 'rejected' transcripts)")
    chosen, rejected = split_hh(obj["chosen"], "chosen"), split_hh(obj["rejected"], "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise ReadError("chosen and rejected are the same transcript")
    # The last shared turn may be the response itself when one transcript only adds turns after it: step back so
    # that each transcript keeps its final Assistant turn.
    shared = min(shared, len(chosen) - 1, len(rejected) - 1)
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) != shared + 1:
            raise ReadError(f"chosen and rejected differ before their last turn (first difference at turn "
                            f"{shared + 1} of {key}); expected the same conversation with one different final "
                            f"Assistant turn")
    conversation = chosen[:shared]
    _check_alternation(conversation + [chosen[-1]], "chosen")
    _check_alternation(conversation + [rejected[-1]], "rejected")
    return conversation, chosen[-1].text, rejected[-1].text


def _prompt_turns(prompt):
    if isinstance(prompt, list):
        turns = []
        for k, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in _CHAT_ROLES:
                raise ReadError(f"prompt message {k + 1} must be {{'role': 'user' | 'assistant', 'content': "
                                f"string}}, got {str(m)[:120]}")
            turns.append(Turn(m["role"], m["content"].strip()))
    elif isinstance(prompt, str):
        if _HH_MARKER.search(prompt):
            turns = split_hh(prompt, "prompt")
            if turns and turns[-1].role == "assistant" and not turns[-1].text:
                turns = turns[:-1]  # the generation prompt "\n\nAssistant:"
        else:
            turns = [Turn("user", prompt.strip())]
    else:
        raise ReadError(f"prompt is {type(prompt).__name__}, not a string or a list of messages")
    _check_alternation(turns, "prompt")
    if not turns or turns[-1].role != "user":
        raise ReadError("prompt does not end with a user turn")
    return turns


def _response(value, key):
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant" \
                or not isinstance(value[0].get("content"), str):
            raise ReadError(f"{key} must be a string or a list of one assistant message")
        text = value[0]["content"].strip()
    elif isinstance(value, str):
        text = value.strip()
        if _HH_MARKER.search(value):
            turns = split_hh(value, key)
            if len(turns) != 1 or turns[0].role != "assistant":
                raise ReadError(f"{key} holds HH turns other than one Assistant turn")
            text = turns[0].text
    else:
        raise ReadError(f"{key} is {type(value).__name__}, not a string")
    if not text:
        raise ReadError(f"empty {key} response")
    return text


def read_prompt(obj):
    """(conversation turns, chosen, rejected) from a prompt/chosen/rejected record."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise ReadError(f"missing field {key!r} (the prompt shape holds 'prompt', 'chosen' and 'rejected')")
    turns = _prompt_turns(obj["prompt"])
    chosen, rejected = _response(obj["chosen"], "chosen"), _response(obj["rejected"], "rejected")
    if chosen == rejected:
        raise ReadError("chosen and rejected are the same response")
    return turns, chosen, rejected


def read_pku(obj):
    """(conversation turns, chosen, rejected) from a PKU-SafeRLHF record: the safer response is chosen."""
    for key in ("prompt", "response_0", "response_1", "safer_response_id"):
        if key not in obj:
            raise ReadError(f"missing field {key!r} (a PKU-SafeRLHF record holds 'prompt', 'response_0', "
                            f"'response_1' and 'safer_response_id')")
    safer = obj["safer_response_id"]
    if isinstance(safer, bool) or safer not in (0, 1):
        raise ReadError(f"safer_response_id is {safer!r}; expected 0 or 1")
    turns = _prompt_turns(obj["prompt"])
    chosen = _response(obj[f"response_{safer}"], f"response_{safer}")
    rejected = _response(obj[f"response_{1 - safer}"], f"response_{1 - safer}")
    if chosen == rejected:
        raise ReadError("response_0 and response_1 are the same response")
    return turns, chosen, rejected


_READERS = {"hh": read_hh, "prompt": read_prompt, "pku": read_pku}


def content_id(obj):
    """A record's id when it has none: the first 16 hex digits of sha256 over its JSON (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def read_source(obj, origin, input_format="auto"):
    """A Source from one input record (a JSON value); raises ReadError with the reason it cannot be read."""
    if not isinstance(obj, dict):
        raise ReadError("not a JSON object")
    shape = input_format
    if shape == "auto":
        shape = "pku" if "response_0" in obj else "prompt" if "prompt" in obj else "hh"
    turns, chosen, rejected = _READERS[shape](obj)
    if not turns:
        raise ReadError("no conversation before the responses")
    if "id" in obj and (isinstance(obj["id"], (bool, float, list, dict)) or obj["id"] is None):
        raise ReadError("field 'id' must be a string or an integer")
    rid = str(obj["id"]) if "id" in obj else content_id(obj)
    return Source(rid, origin, tuple(turns), chosen, rejected, obj)


def read_input(path, input_format, split=""):
    """(sources, drop rows of the records that cannot be read or repeat an id), both in file order."""
    sources, drops, first = [], [], {}
    for origin, obj in read_raw_records(path, split):
        try:
            if obj is None:
                raise ReadError("invalid JSON")
            source = read_source(obj, origin, input_format)
            if source.id in first:
                raise ReadError(f"duplicate of {first[source.id]} (same id {source.id})")
        except ReadError as e:
            code = "duplicate" if str(e).startswith("duplicate") else "unreadable"
            rid = obj.get("id") if isinstance(obj, dict) else None
            drops.append({"origin": origin, "id": rid, "dropped": {"stage": "read", "code": code, "reason": str(e)}})
            continue
        first[source.id] = origin
        sources.append(source)
    return sources, drops
