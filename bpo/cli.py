"""How every job's entry point ends on an expected error: one line naming the file, record or key and what to do,
not a traceback."""

import sys


def expected_errors():
    from bpo.runtime.checkpoint import CheckpointError
    from bpo.config import ConfigError
    from bpo.data.chat import ChatTemplateError, MissingPackageError
    from bpo.data.records import DataFileError, RecordError
    from bpo.model.lora import PlatformError
    from bpo.ref_cache.store import CacheError
    from bpo.runtime.stop import Diverged

    return (ConfigError, RecordError, DataFileError, CacheError, CheckpointError, ChatTemplateError, PlatformError,
            MissingPackageError, Diverged, FileNotFoundError)


def run(main, argv=None):
    """main(argv); its return value is the exit status (None = 0), an expected error a one-line exit 1."""
    try:
        code = main(argv)
    except expected_errors() as e:
        raise SystemExit(f"error: {e}") from None
    sys.exit(code or 0)
