"""Safety evaluation: test-set adapters, safety judges, pairwise accuracy and per-set metrics.

    examples, bad = adapters.load_mm_safetybench(root)                     # test set -> EvalExample
    ... generate a response per example with the evaluated model ...
    verdicts = judges.build_judge(cfg).judge([JudgeItem(...), ...])        # -> Verdict(id, label, raw)
    adapters.mm_safetybench_asr(examples, verdicts)                        # rates + unparsable counts

Modules: `adapters` (loaders and metrics; layouts in docs/eval_formats.md), `judges` (refusal rules, an
OpenAI-compatible endpoint, a local guard model), `pairwise` (harmless-response choice accuracy).
"""
