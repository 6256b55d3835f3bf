"""What every test-set reader returns: `EvalExample`s and `BadExample`s, and the image checks they share.

The readers (bpo/eval/adapters.py, figstep.py, vlguard.py) import this module; adapters.load_test_set dispatches to
the others, so these pieces live below all of them rather than in adapters.
"""

import os
from dataclasses import dataclass, field

from bpo.data.conversation import format_conversation
from bpo.data.formats import InlineImage
from bpo.data.records import image_name_problem


@dataclass
class EvalExample:
    id: str
    turns: list  # list[Turn], ending with the user turn the model answers
    image: str | None  # path to the image file (root already joined); None for a text-only prompt
    meta: dict = field(default_factory=dict)  # set-specific: scenario, image_type, category, class1 ...
    chosen: str | None = None  # the pair, for sets that have one (MMSafe-PO); None otherwise
    rejected: str | None = None

    @property
    def prompt_text(self):
        """The request as text: the user turn alone for one-turn prompts, else the Vicuna-style transcript."""
        if len(self.turns) == 1:
            return self.turns[0].text
        return format_conversation(self.turns)


@dataclass(frozen=True)
class BadExample:
    source: str
    id: str | None
    reason: str

    def __str__(self):
        return f"{self.source} (id {self.id if self.id is not None else '?'}): {self.reason}"


def check_image(path):
    """None when `path` opens as an image, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except FileNotFoundError:
        return f"image not found: {path}"
    except Exception as e:  # PIL raises many types for corrupt files
        return f"image cannot be decoded: {path} ({type(e).__name__}: {e})"
    return None


def image_under_root(name, image_root, allow_outside_root=False, check=True):
    """(path, None) for an image name a test file gives, or (None, reason): training's image-root rule, then the
    file itself when `check`. An InlineImage (bytes the file carried) names no file and is taken as it is."""
    if isinstance(name, InlineImage):
        return name, None
    if not isinstance(name, str) or not name.strip():
        return None, "field 'image' must be a non-empty file name"
    problem = None if allow_outside_root else image_name_problem(name, image_root or "")
    if problem:
        return None, problem
    path = os.path.join(image_root or "", name)
    problem = check_image(path) if check else None
    return (None, problem) if problem else (path, None)
