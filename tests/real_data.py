"""Where the published benchmark files live (../shared/real_data, SOURCES.md there): beside the checkout, as CI lays
it out (tests/jobs.SHARED; BPO_SHARED points elsewhere). A missing file fails the test: these tests exist to read
the files as published, and skipping them would hide that they did not."""

import os

from jobs import SHARED


def real_path(*parts):
    """The path of a published file under ../shared/real_data."""
    path = os.path.join(SHARED, "real_data", *parts)
    assert os.path.exists(path), f"{path}: the published file is not there (set BPO_SHARED to the shared/ folder)"
    return path
