"""python -m bpo.plan (bpo/plan/estimate.py says how)."""

from bpo.plan.estimate import main

if __name__ == "__main__":
    raise SystemExit(main())
