import pytest

from bpo.data.conversation import ConversationError, Turn, format_conversation, parse_conversation, to_messages


def test_single_turn_with_image():
    turns = parse_conversation("USER: <image>\nWhere does the person in the image live? ASSISTANT:")
    assert turns == [Turn("user", "Where does the person in the image live?", has_image=True)]


def test_multi_turn_keeps_history_and_image_in_last_turn():
    text = "USER: Hi ASSISTANT: Hello! USER: <image>\nWhere does the person in the image live? ASSISTANT:"
    assert parse_conversation(text) == [
        Turn("user", "Hi"),
        Turn("assistant", "Hello!"),
        Turn("user", "Where does the person in the image live?", has_image=True),
    ]


def test_image_marker_in_a_non_last_turn():
    text = "USER: <image>\nWhat is this? ASSISTANT: A drawing. USER: Who made it? ASSISTANT:"
    turns = parse_conversation(text)
    assert [t.has_image for t in turns] == [True, False, False]
    assert turns[0].text == "What is this?"


def test_end_of_turn_separators_are_dropped():
    text = "USER: Hi ASSISTANT: Hello!</s>USER: <image>\nAnd now? ASSISTANT:"
    assert [t.text for t in parse_conversation(text)] == ["Hi", "Hello!", "And now?"]


def test_role_words_inside_turns_stay_text():
    text = (
        "USER: What does the USER: field mean? ASSISTANT: It marks the user; the ASSISTANT: field marks the reply. "
        "USER: Earlier my ASSISTANT: said something odd. ASSISTANT: Sorry about that. "
        "USER: <image>\nAnd my ASSISTANT: was wrong? ASSISTANT:"
    )
    assert [(t.role, t.text) for t in parse_conversation(text)] == [
        ("user", "What does the USER: field mean?"),
        ("assistant", "It marks the user; the ASSISTANT: field marks the reply."),
        ("user", "Earlier my ASSISTANT: said something odd."),
        ("assistant", "Sorry about that."),
        ("user", "And my ASSISTANT: was wrong?"),
    ]


def test_lower_case_turns_still_split():
    # Weak markers (followed by a lower-case word) are still used when no strong one competes for the turn.
    text = "USER: hi ASSISTANT: hello USER: where ASSISTANT:"
    assert [t.text for t in parse_conversation(text)] == ["hi", "hello", "where"]


def test_glued_or_lower_case_markers_are_text():
    turns = parse_conversation("USER: Is myUSER: a tag, or user: or ASSISTANT:x? ASSISTANT:")
    assert turns == [Turn("user", "Is myUSER: a tag, or user: or ASSISTANT:x?")]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Hi ASSISTANT:", "does not start with 'USER:'"),
        ("ASSISTANT: Hi USER: x ASSISTANT:", "does not start with 'USER:'"),
        ("USER: Hi ASSISTANT: Hello!", "does not end with an empty 'ASSISTANT:'"),
        ("USER: Hi", "does not end with an empty 'ASSISTANT:'"),
        ("USER: ASSISTANT:", "roles do not alternate"),
        ("USER: <image>\nA USER: <image>\nB ASSISTANT:", "more than one <image>"),
        ("USER: Hi ASSISTANT: <image>\nLook USER: Ok ASSISTANT:", "<image> marker in an assistant turn"),
        (None, "not a string"),
    ],
)
def test_unparsable_conversations(text, reason):
    with pytest.raises(ConversationError, match=reason):
        parse_conversation(text)


def test_format_is_the_inverse_of_parse():
    text = "USER: Hi ASSISTANT: Hello! USER: <image>\nWhere? ASSISTANT:"
    assert format_conversation(parse_conversation(text)) == text


def test_to_messages_with_and_without_image():
    turns = parse_conversation("USER: Hi ASSISTANT: Hello! USER: <image>\nWho is the person in the image? ASSISTANT:")
    assert to_messages(turns) == [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is the person in the image?"}]},
    ]
    blind = to_messages(turns, with_image=False)
    # The blind input keeps the text exactly, "the person in the image" included; only the image entry goes.
    assert blind[2] == {"role": "user", "content": [{"type": "text", "text": "Who is the person in the image?"}]}
    assert blind[:2] == to_messages(turns)[:2]


def test_to_messages_with_string_text_keeps_the_image_turn_a_list():
    turns = parse_conversation("USER: Hi ASSISTANT: Hello! USER: <image>\nWho is the person in the image? ASSISTANT:")
    assert to_messages(turns, text_content="string") == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is the person in the image?"}]},
    ]
    # Blind, the image turn holds only text: a string too.
    assert to_messages(turns, with_image=False, text_content="string")[2] == {
        "role": "user", "content": "Who is the person in the image?"}
    with pytest.raises(ValueError, match="text_content"):
        to_messages(turns, text_content="list")
