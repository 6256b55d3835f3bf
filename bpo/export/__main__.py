"""python -m bpo.export (bpo/export/job.py says how)."""

from bpo.export.job import main

if __name__ == "__main__":
    raise SystemExit(main())
