"""Vicuna-style conversations as MMSafe-PO stores them, parsed into turns and turned into chat-template messages.

A conversation is one string:

    USER: Hi ASSISTANT: Hello! USER: <image>\nWhere does the person in the image live? ASSISTANT:

Parsing rule (what `parse_conversation` accepts):

1. A role marker is `USER:` or `ASSISTANT:` (upper case) that stands at the start of the string or right after
   whitespace or `</s>`, and is followed by whitespace, `<` or the end of the string. Anything else ("USER:x",
   "myUSER:", "user:") is plain text.
2. The conversation is read as markers chosen from those candidates so that roles alternate, the first marker is a
   `USER:` at the very start (leading whitespace allowed), the last is an `ASSISTANT:` followed by nothing (the
   generation prompt), and no turn is empty. Candidates not chosen stay text.
3. Among the readings rule 2 allows, the one with the most turns wins; among those, the one choosing the fewest
   "weak" markers (followed by a lower-case word, as in "the USER: field" or "my ASSISTANT: said"); among those, the
   one that splits earliest. So a mention of the role that is not next ("the USER: field" in a user turn) is always
   text, and a mention of the role that is next loses to a real marker followed by a capital, a digit, punctuation
   or `<image>`.
4. A trailing `</s>` on a turn is dropped (the chat template adds its own end-of-turn marker); turn text is stripped.
5. `<image>` (with one following newline) marks the image. At most one per conversation, only in a user turn; it is
   removed from the text and recorded as `Turn.has_image`. Its position inside the turn is not kept: templates put
   the image first in the turn, which is where MMSafe-PO has it.

Limits: a turn that quotes a whole exchange ("he wrote ASSISTANT: ok USER: fine") is split into extra turns, because
more turns win. Rule 3's tie-break guesses wrong when a real turn starts in lower case and a mention of the same role
followed by a capital sits in the turn before it ("what does ASSISTANT: Yes mean? ASSISTANT: it means ..."). Markers
in lower case or glued to the previous word are never recognised.
"""

import re
from dataclasses import dataclass

IMAGE_MARKER = "<image>"
_END_OF_TURN = "</s>"
_ROLES = {"USER": "user", "ASSISTANT": "assistant"}
_MARKERS = {role: tag for tag, role in _ROLES.items()}
_MARKER_RE = re.compile(r"(?:^|(?<=\s)|(?<=</s>))(USER|ASSISTANT):(?=\s|<|$)")
_IMAGE_RE = re.compile(re.escape(IMAGE_MARKER) + r"\n?")


class ConversationError(ValueError):
    """A conversation string that cannot be read as alternating USER/ASSISTANT turns; the message says why."""


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str  # without the role marker, the image marker or a trailing </s>; stripped
    has_image: bool = False


def parse_conversation(text):
    """Split a Vicuna-style conversation into turns, ending with the user turn the model must answer."""
    if not isinstance(text, str):
        raise ConversationError(f"conversation is {type(text).__name__}, not a string")
    # (start, end, role) of every candidate marker, in order.
    cands = [(m.start(), m.end(), _ROLES[m.group(1)]) for m in _MARKER_RE.finditer(text)]
    if not cands or cands[0][2] != "user" or text[: cands[0][0]].strip():
        raise ConversationError("does not start with 'USER:'")
    last = len(cands) - 1
    if cands[last][2] != "assistant" or text[cands[last][1]:].strip():
        raise ConversationError("does not end with an empty 'ASSISTANT:' (the generation prompt)")

    def body(i, j):  # raw text of the turn opened by candidate i and closed by candidate j
        return text[cands[i][1]: cands[j][0]]

    # best[i]: score of the best reading of the text from candidate i on, as (turns, -weak markers chosen), and the
    # candidate that closes the turn i opens. Filled right to left; None where no reading exists.
    best = [None] * len(cands)
    best[last] = ((0, 0), None)
    for i in range(last - 1, -1, -1):
        for j in range(i + 1, len(cands)):
            if best[j] is None or cands[j][2] == cands[i][2] or not _clean(body(i, j)):
                continue
            (turns, neg_weak), _ = best[j]
            score = (turns + 1, neg_weak - _is_weak(text, cands[j][1]))
            if best[i] is None or score > best[i][0]:  # strict: ties keep the earliest split
                best[i] = (score, j)
    if best[0] is None:
        raise ConversationError("roles do not alternate USER/ASSISTANT with non-empty turns")

    turns, i = [], 0
    while i != last:
        j = best[i][1]
        turns.append(_make_turn(cands[i][2], body(i, j)))
        i = j
    if sum(t.has_image for t in turns) > 1 or sum(t.text.count(IMAGE_MARKER) for t in turns):
        raise ConversationError(f"more than one {IMAGE_MARKER} marker")
    return turns


def _is_weak(text, end):
    """A marker followed by a lower-case word ("the USER: field", "my ASSISTANT: said") reads like a mention."""
    rest = text[end:].lstrip()
    return bool(rest) and rest[0].islower()


def _clean(raw):
    raw = raw.strip()
    if raw.endswith(_END_OF_TURN):
        raw = raw[: -len(_END_OF_TURN)].rstrip()
    return raw


def _make_turn(role, raw):
    raw = _clean(raw)
    has_image = IMAGE_MARKER in raw
    if has_image and role != "user":
        raise ConversationError(f"{IMAGE_MARKER} marker in an assistant turn")
    text = _IMAGE_RE.sub("", raw, count=1).strip() if has_image else raw
    return Turn(role=role, text=text, has_image=has_image)


def format_conversation(turns):
    """Inverse of `parse_conversation`: the Vicuna string with a trailing empty 'ASSISTANT:'."""
    parts = []
    for turn in turns:
        image = IMAGE_MARKER + "\n" if turn.has_image else ""
        parts.append(f"{_MARKERS[turn.role]}: {image}{turn.text}")
    parts.append("ASSISTANT:")
    return " ".join(parts)


def to_messages(turns, with_image=True, text_content="parts"):
    """HF chat-template messages. with_image=False drops the image entry and keeps the text exactly as it is, so
    phrases like "the person in the image" stay: that is BPO's blind input. text_content: how a turn without an image
    gives its text, "parts" ([{"type": "text", "text": ...}]) or "string" (for templates that print content as it is,
    see bpo.data.chat.Chat.text_content); a turn with its image is always a list of parts."""
    if text_content not in ("parts", "string"):
        raise ValueError(f"text_content must be 'parts' or 'string', got {text_content!r}")
    messages = []
    for turn in turns:
        if with_image and turn.has_image:
            content = [{"type": "image"}, {"type": "text", "text": turn.text}]
        elif text_content == "string":
            content = turn.text
        else:
            content = [{"type": "text", "text": turn.text}]
        messages.append({"role": turn.role, "content": content})
    return messages
