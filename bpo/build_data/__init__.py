"""MMSafe-PO-style multimodal preference data from text-only preference data (`python -m bpo.build_data`).

An entity in the last user turn is found, an image of it attached, its mentions replaced by a phrase pointing at
the image, and the request rewritten to read naturally without naming it; every intermediate is kept in the record.

Modules: `read` (HH-RLHF transcripts and prompt/chosen/rejected records -> turns), `entity` (stage 1), `images`
(stage 2), `replace` (stage 3, and the leak rule), `rewrite` (stage 4), `pipeline` (one record through the stages
and the final check), `llm` (the OpenAI-compatible client with its answer cache and re-asks), `report` (drops and
per-stage counts), `job` (the command: shards, resume, output, report). The prompts are in `prompts/`, versioned.
"""
