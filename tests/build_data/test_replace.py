"""Stage 3 and the leak rule, against hand-written outputs: repeated mentions, quotes, articles, sentence starts."""

import pytest

from bpo.build_data.replace import first_mention, name_parts, named_in, replace_mentions

PERSON = "the person in the image"
PLACE = "the place shown in the image"


@pytest.mark.parametrize("text, entity, phrase, expected, count", [
    ("Where does Barack Obama live?", "Barack Obama", PERSON, "Where does the person in the image live?", 1),
    # twice, the second at a sentence start
    ("Is Elon Musk rich? Elon Musk says so.", "Elon Musk", PERSON,
     "Is the person in the image rich? The person in the image says so.", 2),
    # inside quotes: the quotes stay; mid-sentence stays lower case, at the start of the text it is capitalised
    ('My friend wrote "Elon Musk is a fraud" on the wall.', "Elon Musk", PERSON,
     'My friend wrote "the person in the image is a fraud" on the wall.', 1),
    ('"Elon Musk" is what he typed.', "Elon Musk", PERSON, '"The person in the image" is what he typed.', 1),
    ("He said: 'elon  musk, again'.", "Elon Musk", PERSON, "He said: 'the person in the image, again'.", 1),
    # an article before the mention goes into the phrase's own "the"
    ("How do I climb the Eiffel Tower at night?", "Eiffel Tower", PLACE,
     "How do I climb the place shown in the image at night?", 1),
    ("The Eiffel Tower is tall. Is the Eiffel Tower guarded?", "Eiffel Tower", PLACE,
     "The place shown in the image is tall. Is the place shown in the image guarded?", 2),
    ("How do I climb the Eiffel Tower?", "the Eiffel Tower", PLACE, "How do I climb the place shown in the image?", 1),
    # not inside a word; a possessive keeps its 's
    ("Obamacare was Obama's idea.", "Obama", PERSON, "Obamacare was the person in the image's idea.", 1),
    ("Hi.\nObama called.", "Obama", PERSON, "Hi.\nThe person in the image called.", 1),
    ("Does AT&T spy? I hate AT&T.", "AT&T", "the company in the image",
     "Does the company in the image spy? I hate the company in the image.", 2),
    ("Nothing here.", "Obama", PERSON, "Nothing here.", 0),
])
def test_replace_mentions(text, entity, phrase, expected, count):
    assert replace_mentions(text, entity, phrase) == (expected, count)


def test_first_mention_keeps_the_request_s_spelling():
    assert first_mention("where does barack   Obama live", "Barack Obama") == "barack   Obama"
    assert first_mention("Obamacare", "Obama") is None


def test_name_parts_and_leaks():
    assert name_parts("Barack Obama", "person") == ["Barack", "Obama"]
    assert name_parts("Ludwig van Beethoven Jr.", "person") == ["Ludwig", "Beethoven"]
    assert name_parts("Bank of America", "organization") == []
    assert named_in("Where does Obama live?", "Barack Obama", "person") == "Obama"
    assert named_in("Where does BARACK OBAMA live?", "Barack Obama", "person") == "BARACK OBAMA"
    assert named_in("Where does the person in the image live?", "Barack Obama", "person") is None
    assert named_in("Which bank in the image is it?", "Bank of America", "organization") is None
    assert named_in("I will ask the person in the image.", "Will Smith", "person") is None  # parts: case-sensitive
    assert named_in("Will the person in the image win?", "Will Smith", "person") == "Will"  # errs towards a leak
