"""What every job's entry point shares: its arguments (`parse_job_args`), and its end on an expected error: one line
naming the file, record or key and what to do, not a traceback (`run`)."""

import argparse
import sys


def parse_job_args(doc, argv=None, flags=None, launched=True, prog=None):
    """A config-driven job's arguments: `--config FILE` and `section.key=value` overrides, which may come before and
    after flags; `--help` prints the job's docstring `doc`. `flags(parser)` adds the job's own flags. A job started by
    the deepspeed launcher (`launched`) also accepts the `--local_rank` it passes, and ignores it (ranks come from the
    environment). `prog` names a job started with `python -m` in its usage line."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see bpo/config.py for every key and default)")
    if launched:
        parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    if flags:
        flags(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied after the file")
    return parser.parse_intermixed_args(argv)


def expected_errors():
    # Imported here, once a job has failed (start-up time): build_data runs through `run` too and starts without torch,
    # which the model and checkpoint modules these errors live in would load.
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
