"""Replacing an entity's mentions with a phrase that points at the image, and finding names a text still holds.

Mention rule (`mention_pattern`): the entity's words in order, case-insensitive, any whitespace between them, not
joined to a letter, digit or underscore on either side. So quotes, brackets and punctuation around a mention stay
("\\"Elon Musk\\"" -> "\\"the person in the image\\""), a possessive keeps its "'s", and "Obamacare" is not a mention
of "Obama".

Replacement rule (`replace_mentions`), for every mention, left to right:
- an article "the" right before the mention is taken into the replacement when the phrase starts with "the", so
  "visit the Eiffel Tower" becomes "visit the place shown in the image", not "... the the place ...";
- the phrase starts with a capital when the replaced text started a sentence: nothing but quotes, brackets or
  whitespace before it since the start of the text, a newline or a ".", "!" or "?".

Leak rule (`named_in`): a text names the entity when it holds a mention of it, or, for a person, one of its name
parts (a capitalised word of three letters or more, not a particle such as "Van" or "Jr"), matched case-sensitively
as a whole word: "Where does Obama live?" names "Barack Obama". The rule errs towards a leak: "Will the person..."
names "Will Smith", and such a record is re-asked or reported rather than kept.
"""

import re

_SENTENCE_END = ".!?"
_OPENERS = "\"'\u201c\u2018([{\u00ab"
_ARTICLE = re.compile(r"(?i)(?<!\w)(the)\s+$")
_NAME_PARTICLES = {"The", "Of", "And", "Van", "Von", "Der", "Den", "Del", "Della", "Des", "Bin", "Ibn", "Mac",
                   "Mrs", "Dr", "Jr", "Sr", "St", "Saint", "Sir", "Lord", "Lady"}


def mention_pattern(entity):
    words = entity.split()
    if not words:
        raise ValueError("empty entity")
    return re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)", re.IGNORECASE)


def first_mention(text, entity):
    """The first mention of `entity` in `text` as written there, or None."""
    m = mention_pattern(entity).search(text)
    return m.group(0) if m else None


def _starts_sentence(before):
    tail = len(before)
    while tail and (before[tail - 1].isspace() or before[tail - 1] in _OPENERS):
        if before[tail - 1] == "\n":
            return True
        tail -= 1
    return tail == 0 or before[tail - 1] in _SENTENCE_END


def _capitalised(phrase):
    return phrase[:1].upper() + phrase[1:]


def replace_mentions(text, entity, phrase):
    """(text with every mention of `entity` replaced by `phrase`, number of mentions replaced)."""
    out, pos, count = [], 0, 0
    takes_article = phrase[:4].lower() == "the "
    for m in mention_pattern(entity).finditer(text):
        start = m.start()
        article = _ARTICLE.search(text, pos, start) if takes_article else None
        if article and not m.group(0).lower().startswith("the "):
            start = article.start()
        before = text[:start]
        out.append(text[pos:start])
        out.append(_capitalised(phrase) if _starts_sentence(before) else phrase)
        pos = m.end()
        count += 1
    out.append(text[pos:])
    return "".join(out), count


def name_parts(entity, entity_type):
    """The words of a person's name that alone would name them (see the module docstring); none for other types."""
    if entity_type != "person":
        return []
    parts = re.findall(r"[^\W\d_][\w'\u2019.-]*", entity)
    return [p.rstrip(".") for p in parts
            if len(p.rstrip(".")) >= 3 and p[0].isupper() and p.rstrip(".") not in _NAME_PARTICLES]


def named_in(text, entity, entity_type):
    """The name of the entity that `text` holds (the mention or name part as written), or None."""
    found = first_mention(text, entity)
    if found:
        return found
    for part in name_parts(entity, entity_type):
        m = re.search(r"(?<!\w)" + re.escape(part) + r"(?!\w)", text)
        if m:
            return m.group(0)
    return None
