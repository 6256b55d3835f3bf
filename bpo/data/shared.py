"""The shared-prompt layout: each example laid out once as [prompt + image][response 1][response 2][response 3].

`bpo.data.dataset.collate` (the "rows" layout, the readable reference) repeats the prompt and its image for every
response; here they are computed once. In the one forward pass:

- a prompt token attends causally within its prompt; a response token attends to its whole prompt and causally to
  its own response, never to a sibling response or another example (`attention_allowed`);
- a response token's position continues from the end of its prompt as if the response stood alone after it
  (`position_ids`: prompt 0..P-1, every response P, P+1, ...); bpo.model.scorer turns these into multimodal rotary
  positions for families that have them;
- the log-prob of a response's first token is read off the prompt's last hidden state, of every later token off the
  token before it (`predictor_index`).

With `max_tokens` > 0 several examples are packed into one sequence (padding-free): examples are taken in order and
a sequence is closed when the next example would take it past max_tokens (an example longer than that gets a
sequence of its own). The result has "virtual rows" in exactly the rows layout's order (all chosen, then rejected,
then blind), so `labels[:, 1:]`, `kind`, `example_index` and `split_by_kind` mean what they mean there, and the
scorer returns log-probs of the same (R, M) shape.

Batch tensors (S packed sequences of width L; R virtual rows with at most M response tokens; E examples):
    input_ids, attention_mask, position_ids, example_of, part_of   (S, L); example_of -1 and part_of -1 on padding,
                                                                     part_of 0 for the prompt, k for response k
    labels (R, M + 1), predictor_index (R, M)                        labels[:, 1:] are the response tokens
    prompt_spans (E, 3)                                              (sequence, start, prompt length) per example
    per-token processor fields (S, L), image inputs once per image, in example order
"""

import torch

from bpo.data.dataset import KIND_IDS, cat_padded, collate
from bpo.data.records import RESPONSE_KEYS
from bpo.ops.logprobs import IGNORE_INDEX

SHARED_KEYS = ("position_ids", "example_of", "part_of", "predictor_index", "prompt_spans")


def pack(lengths, max_tokens):
    """Greedy in-order packing: lists of example indices whose lengths sum to <= max_tokens (0: one per list)."""
    packs, total = [], 0
    for i, n in enumerate(lengths):
        if not packs or max_tokens <= 0 or total + n > max_tokens:
            packs.append([])
            total = 0
        packs[-1].append(i)
        total += n
    return packs


def collate_shared(examples, pad_token_id, max_tokens=0):
    """EncodedExamples -> one shared-prompt batch (see the module docstring)."""
    kinds = [[k for k in RESPONSE_KEYS if k in ex.response_ids] for ex in examples]
    lengths = [len(ex.prompt_ids) + sum(len(ex.response_ids[k]) for k in ks) for ex, ks in zip(examples, kinds)]
    packs = pack(lengths, max_tokens)
    width = max(sum(lengths[i] for i in p) for p in packs)
    shape = (len(packs), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    example_of = torch.full(shape, -1, dtype=torch.long)
    part_of = torch.full(shape, -1, dtype=torch.long)
    field_keys = sorted({k for ex in examples for k in ex.prompt_fields})
    fields = {k: torch.zeros(shape, dtype=torch.long) for k in field_keys}
    prompt_spans = torch.zeros((len(examples), 3), dtype=torch.long)
    responses = {}  # (kind, example) -> (flat positions of its tokens, flat position of its prompt's last token)
    for s, members in enumerate(packs):
        at = 0
        for i in members:
            ex = examples[i]
            p = len(ex.prompt_ids)
            ids = list(ex.prompt_ids)
            prompt_spans[i] = torch.tensor([s, at, p])
            parts, positions = [0] * p, list(range(p))
            for k, kind in enumerate(kinds[i], start=1):
                resp = ex.response_ids[kind]
                responses[(kind, i)] = (s * width + at + len(ids) + torch.arange(len(resp)), s * width + at + p - 1)
                ids += resp
                parts += [k] * len(resp)
                positions += range(p, p + len(resp))
            n = len(ids)
            input_ids[s, at:at + n] = torch.tensor(ids)
            attention_mask[s, at:at + n] = 1
            position_ids[s, at:at + n] = torch.tensor(positions)
            example_of[s, at:at + n] = i
            part_of[s, at:at + n] = torch.tensor(parts)
            for key, values in ex.prompt_fields.items():
                fields[key][s, at:at + n] = values[0]  # the text-token value, for the responses
                fields[key][s, at:at + p] = torch.tensor(values)
            at += n

    rows = [(kind, i) for kind in RESPONSE_KEYS for i, ks in enumerate(kinds) if kind in ks]
    longest = max(len(examples[i].response_ids[kind]) for kind, i in rows)
    labels = torch.full((len(rows), longest + 1), IGNORE_INDEX, dtype=torch.long)  # (R, M + 1)
    predictor_index = torch.zeros((len(rows), longest), dtype=torch.long)  # (R, M)
    for r, (kind, i) in enumerate(rows):
        resp = examples[i].response_ids[kind]
        flat, last_prompt = responses[(kind, i)]
        labels[r, 1:1 + len(resp)] = torch.tensor(resp, dtype=torch.long)
        # Token j is predicted by the hidden state before it: the prompt's last for j = 0, else the response's own.
        predictor_index[r, :len(resp)] = torch.cat([torch.tensor([last_prompt]), flat[:-1]]) if len(resp) else flat

    images = {}
    for ex in examples:
        for key, value in ex.image_inputs.items():
            images.setdefault(key, []).append(value)
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
        "example_of": example_of, "part_of": part_of, "labels": labels, "predictor_index": predictor_index,
        "prompt_spans": prompt_spans,
        "kind": torch.tensor([KIND_IDS[kind] for kind, _ in rows], dtype=torch.long),  # (R,)
        "example_index": torch.tensor([i for _, i in rows], dtype=torch.long),  # (R,)
        "ids": [ex.id for ex in examples],
        "has_blind": torch.tensor([ex.response_ids.get("blind") is not None for ex in examples]),
        **fields, **{key: cat_padded(values) for key, values in images.items()},
    }


def attention_allowed(example_of, part_of, blocks=None):
    """(S, L) example/part ids -> (S, 1, L, L) bool, True where query q may attend to key k: the same example,
    k <= q, and k in the prompt or in q's own response. `blocks` (S, L), from `image_blocks`: tokens of one image
    block also see each other whatever their order (Gemma-3). A padding position attends to itself only, so no
    softmax row is empty."""
    q_ex, k_ex = example_of[:, :, None], example_of[:, None, :]
    q_part, k_part = part_of[:, :, None], part_of[:, None, :]
    length = example_of.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=example_of.device).tril()
    allowed = (q_ex == k_ex) & (q_ex >= 0) & causal & ((k_part == 0) | (k_part == q_part))
    if blocks is not None:
        allowed |= (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    pad = example_of < 0
    allowed |= pad[:, :, None] & torch.eye(length, dtype=torch.bool, device=example_of.device)
    return allowed[:, None]


def within_window(position_ids, window):
    """(S, L) positions -> (S, 1, L, L) bool: key k is fewer than `window` positions before query q, the rule of a
    sliding-window attention layer, measured in each response's own positions (as if it stood alone)."""
    distance = position_ids[:, :, None] - position_ids[:, None, :]
    return (distance < window)[:, None]


def allowed_mask_mod(example_of, part_of, blocks=None, positions=None, window=None):
    """`attention_allowed` (and, with positions and window, `within_window`) as a FlexAttention mask_mod: a function
    of (sequence, head, query index, key index) tensors that FlexAttention evaluates block by block, so the (L, L)
    mask is never materialised. The dense functions above are its readable reference (tests/data/test_shared.py)."""
    def mask_mod(s, h, q, k):
        q_ex, k_ex = example_of[s, q], example_of[s, k]
        q_part, k_part = part_of[s, q], part_of[s, k]
        allowed = (q_ex == k_ex) & (q_ex >= 0) & (k <= q) & ((k_part == 0) | (k_part == q_part))
        if blocks is not None:
            allowed = allowed | ((blocks[s, q] == blocks[s, k]) & (blocks[s, q] >= 0))
        if window is not None:
            allowed = allowed & (positions[s, q] - positions[s, k] < window)
        return allowed | ((q_ex < 0) & (q == k))

    return mask_mod


def image_blocks(token_type_ids, image_types=(1,)):
    """(S, L) token types -> (S, L) block ids: each contiguous run of image tokens (a type in `image_types`) gets its
    own id, every other token -1. Gemma-3's processor marks image tokens 1 in `token_type_ids`; Gemma-4's marks image
    (1) and video (2) tokens in `mm_token_type_ids` (transformers' gemma4 `get_block_sequence_ids_for_mask`)."""
    image = torch.isin(token_type_ids, torch.tensor(image_types, device=token_type_ids.device))
    starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    ids = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(image, ids, torch.full_like(ids, -1))


def make_collate(layout, pad_token_id, max_tokens=0):
    """examples -> batch for `layout` ("shared" or "rows"), as chosen by bpo.model.scorer.choose_layout."""
    if layout == "rows":
        return lambda examples: collate(examples, pad_token_id)
    return lambda examples: collate_shared(examples, pad_token_id, max_tokens)
