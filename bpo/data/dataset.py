"""Preference batches: one row per (example, response), grouped by response kind.

Row layout for B examples: rows 0..B-1 are the chosen responses, the next B the rejected ones, then one blind row
per example that has a blind response (in example order). A forward pass over all rows gives per-row log-probs;
`split_by_kind` turns them back into (B,) tensors per kind.
"""

import torch
from torch.utils.data import Dataset

from bpo.data.encode import encode_example
from bpo.data.records import RESPONSE_KEYS
from bpo.ops.logprobs import IGNORE_INDEX

KIND_IDS = {kind: i for i, kind in enumerate(RESPONSE_KEYS)}  # chosen 0, rejected 1, blind 2


class PreferenceDataset(Dataset):
    """Encodes lazily: each __getitem__ tokenises one record and loads its image."""

    def __init__(self, records, chat, image_root, max_length, responses=RESPONSE_KEYS):
        self.records = records
        self.chat = chat  # bpo.data.chat.Chat
        self.image_root = image_root
        self.max_length = max_length
        self.responses = tuple(responses)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return encode_example(
            self.records[index], self.chat, self.image_root, self.max_length, responses=self.responses
        )


def collate(examples, pad_token_id):
    """Stack EncodedExamples into one right-padded batch of R rows (R = rows over all kinds present).

    Per-token processor fields (`prompt_fields`, e.g. token_type_ids) are laid out like input_ids; response tokens
    and padding get the value the processor gives a text token, read off the prompt's first token (0 for Gemma-3's
    token_type_ids and Qwen2-VL's mm_token_type_ids)."""
    rows = [  # (kind, example index), chosen rows first, then rejected, then blind
        (kind, i) for kind in RESPONSE_KEYS for i, ex in enumerate(examples) if kind in ex.response_ids
    ]
    width = max(len(examples[i].prompt_ids) + len(examples[i].response_ids[kind]) for kind, i in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (R, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (R, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (R, T), unshifted
    field_keys = sorted({k for ex in examples for k in ex.prompt_fields})
    fields = {k: torch.zeros((len(rows), width), dtype=torch.long) for k in field_keys}  # each (R, T)
    images = {}  # key -> list of per-row tensors, each (n_i, ...)
    for r, (kind, i) in enumerate(rows):
        prompt, response = examples[i].prompt_ids, examples[i].response_ids[kind]
        n = len(prompt) + len(response)
        input_ids[r, :n] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[r, :n] = 1
        labels[r, len(prompt):n] = torch.tensor(response, dtype=torch.long)
        for key, values in examples[i].prompt_fields.items():
            fields[key][r] = values[0]  # the text-token value, for the response and the padding
            fields[key][r, :len(prompt)] = torch.tensor(values, dtype=torch.long)
        for key, value in examples[i].image_inputs.items():
            images.setdefault(key, []).append(value)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "kind": torch.tensor([KIND_IDS[kind] for kind, _ in rows], dtype=torch.long),  # (R,)
        "example_index": torch.tensor([i for _, i in rows], dtype=torch.long),  # (R,)
        "ids": [ex.id for ex in examples],  # B strings
        "has_blind": torch.tensor([ex.response_ids.get("blind") is not None for ex in examples]),  # (B,) bool
        **fields,
    }
    for key, values in images.items():
        batch[key] = cat_padded(values)  # e.g. pixel_values (R, C, H, W) for LLaVA, (sum patches, D) for Qwen2-VL
    return batch


def cat_padded(tensors):
    """Concatenate along dim 0, zero-padding the other dims to the largest size. Only LLaVA-NeXT needs the padding:
    its pixel_values are (1, n_tiles, C, H, W) with n_tiles depending on the image, and the model reads the real
    count from image_sizes, as it does for batches padded by the processor itself."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad = []
        for d in range(t.dim() - 1, 0, -1):  # F.pad wants (last dim left, right, second-last dim ...)
            pad += [0, shape[d - 1] - t.shape[d]]
        padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(padded, dim=0)


def split_by_kind(values, batch):
    """Per-row values (R,) -> (chosen (B,), rejected (B,), blind (B,)) with zeros where an example has no row of
    that kind. Differentiable: gradients flow back to `values`."""
    num_examples = len(batch["ids"])
    out = values.new_zeros((len(RESPONSE_KEYS), num_examples))  # (3, B)
    out = out.index_put((batch["kind"], batch["example_index"]), values)
    return out[0], out[1], out[2]
