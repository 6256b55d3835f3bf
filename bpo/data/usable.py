"""Which records a job scores: one rule for training, the reference cache job and evaluation.

A record is unusable when `load_records` rejects it (broken JSON, a missing field, an image that is missing,
undecodable, too large or outside the image root) or when it cannot be encoded for scoring: its prompt (image tokens
included) leaves no room for a response under data.max_length (prompts are never cut), the chat template cannot
separate a response, or its image fails to load. With data.skip_bad=false any unusable record stops the job with the
whole list (file, line, id, reason); with data.skip_bad=true each one is reported and left out.

Every job applies this rule to the same file with the same settings, so they agree on the set: a reference cache
holds exactly the records training (or evaluation) scores.
"""

from bpo.runtime import dist
from bpo.data.records import BadRecord, raise_if_bad
from bpo.data.encode import PromptTooLong, encode_example


def _encode_error(record, error):
    if isinstance(error, PromptTooLong):
        return (f"prompt too long: {error.prompt_len} tokens (image tokens included), data.max_length "
                f"{error.max_length}; no room for a response")
    return f"cannot encode: {type(error).__name__}: {error}"


def usable_records(records, bad, chat, image_root, max_length, responses, skip_bad, data_file,
                   report=dist.print0):
    """(usable records, number with a response cut to max_length, every bad record). Collective: each rank encodes
    its share of the records once, and all ranks get the same answer.

    `bad` holds what load_records already rejected; raises RecordError listing all of them unless skip_bad."""
    from PIL import Image

    unusable, truncated = [], 0
    for i in range(dist.rank(), len(records), dist.world_size()):
        record = records[i]
        try:
            example = encode_example(record, chat, image_root, max_length, responses=responses)
        # PromptTooLong and TemplateError are ValueErrors; an image over the pixel limit raises PIL's bomb error or
        # its warning (made an error by records.enforce_max_image_pixels).
        except (ValueError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            unusable.append(BadRecord(record.source, record.id, _encode_error(record, e)))
            continue
        truncated += any(example.truncated.values())
    parts = dist.all_gather_object((unusable, truncated))
    order = {r.id: i for i, r in enumerate(records)}
    unusable = sorted((b for part in parts for b in part[0]), key=lambda b: order[b.id])  # file order
    truncated = sum(part[1] for part in parts)
    bad = list(bad) + unusable
    if bad and not skip_bad:
        raise_if_bad(bad, data_file)
    for b in bad:
        report(f"skipping {b}")
    drop = {b.id for b in unusable}
    return [r for r in records if r.id not in drop], truncated, bad
