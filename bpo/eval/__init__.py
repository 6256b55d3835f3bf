"""Safety evaluation: test-set adapters, safety judges, pairwise accuracy and per-set metrics.

    examples, bad = adapters.load_mm_safetybench(root)                     # test set -> EvalExample
    ... generate a response per example with the evaluated model ...
    verdicts = judges.build_judge(cfg).judge([JudgeItem(...), ...])        # -> Verdict(id, label, raw)
    metrics.mm_safetybench_asr(examples, verdicts)                         # rates + unparsable counts

Modules: `examples` (`EvalExample`, `BadExample` and the image checks every loader shares), `adapters` (loaders,
`load_test_set`; layouts in docs/eval_formats.md), `figstep` and `vlguard` (those sets' loaders), `metrics` (per-set
rates, the modality gap, over-refusal), `judges` (refusal rules, an OpenAI-compatible endpoint, a local guard model),
`pairwise` (harmless-response choice accuracy), `compare` (tables and a chart from several runs' reports).
"""
