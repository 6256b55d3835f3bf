"""python -m bpo.plan (bpo/plan/estimate.py says how; bpo/plan/report.py runs it)."""

from bpo.plan.report import main

if __name__ == "__main__":
    raise SystemExit(main())
