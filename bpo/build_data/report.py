"""The data builder's per-stage report: how many records entered and left each stage, and every drop with its reason.

A drop is `Drop(code, reason)`, raised by a stage; the builder turns it into a row naming the stage and keeping the
fields the record had by then (its trace). The report is computed from the rows alone, so a resumed build reports
the same as an uninterrupted one.
"""

from collections import Counter

STAGES = ("read", "entity", "image", "replace", "rewrite", "check")


class Drop(Exception):
    """A record leaves the build: `code` is short (the report counts by it), `reason` says what happened."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code, self.reason = code, reason


def stage_counts(rows, read_drops):
    """[{stage, in, out, dropped: {code: n}}] in stage order. rows: the builder's rows (one per record read);
    read_drops: the drop rows of records that could not be read."""
    entered = Counter()
    dropped = {s: Counter() for s in STAGES}
    for row in list(read_drops) + list(rows):
        drop = row.get("dropped")
        last = STAGES.index(drop["stage"]) if drop else len(STAGES) - 1
        for stage in STAGES[:last + 1]:
            entered[stage] += 1
        if drop:
            dropped[drop["stage"]][drop["code"]] += 1
    return [{"stage": s, "in": entered[s], "out": entered[s] - sum(dropped[s].values()),
             "dropped": dict(sorted(dropped[s].items()))} for s in STAGES]


def build_report(input_file, output_file, rows, read_drops, endpoint_stats=None):
    drops = [r for r in list(read_drops) + list(rows) if r.get("dropped")]
    return {
        "input": input_file,
        "output": output_file,
        "records_in": len(read_drops) + len(rows),
        "records_out": len(rows) - sum(1 for r in rows if r.get("dropped")),
        "stages": stage_counts(rows, read_drops),
        "drops": [{"origin": r["origin"], "id": r.get("id"), **r["dropped"], "fields": r.get("fields", {})}
                  for r in drops],
        "endpoint_this_run": endpoint_stats or {},
    }


def summary_lines(report):
    lines = []
    for s in report["stages"]:
        why = ", ".join(f"{code} {n}" for code, n in s["dropped"].items())
        lines.append(f"  {s['stage']:<8} {s['in']:>6} in {s['out']:>6} out" + (f"   dropped: {why}" if why else ""))
    return lines
