"""The shared-prompt layout's bookkeeping (bpo.data.shared), checked by hand on small examples."""

import torch

from bpo.data.dataset import collate, split_by_kind
from bpo.data.encode import EncodedExample
from bpo.data.shared import allowed_mask_mod, attention_allowed, collate_shared, image_blocks, pack, within_window


def examples():
    return [
        EncodedExample("a", [1, 2, 3], {}, {"chosen": [4, 5], "rejected": [6]}),  # no blind
        EncodedExample("b", [7, 8], {}, {"chosen": [9], "rejected": [10, 11, 12], "blind": [13]},
                       prompt_fields={"mm_token_type_ids": [0, 1]}),
    ]


def test_pack_is_greedy_in_order():
    assert pack([5, 4, 3, 9, 2], max_tokens=0) == [[0], [1], [2], [3], [4]]
    assert pack([5, 4, 3, 9, 2], max_tokens=9) == [[0, 1], [2], [3], [4]]
    assert pack([5, 4, 3, 9, 2], max_tokens=12) == [[0, 1, 2], [3, 4]]  # an example never spans two sequences
    assert pack([20, 1], max_tokens=8) == [[0], [1]]  # longer than the budget: a sequence of its own


def test_one_sequence_per_example():
    batch = collate_shared(examples(), pad_token_id=0)
    # a: prompt 1 2 3, chosen 4 5, rejected 6. b: prompt 7 8, chosen 9, rejected 10 11 12, blind 13.
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 0], [7, 8, 9, 10, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0], [1] * 7]
    assert batch["part_of"].tolist() == [[0, 0, 0, 1, 1, 2, -1], [0, 0, 1, 2, 2, 2, 3]]
    assert batch["example_of"].tolist() == [[0, 0, 0, 0, 0, 0, -1], [1] * 7]
    # Each response continues from the end of its prompt as if it stood alone.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0], [0, 1, 2, 2, 3, 4, 2]]
    assert batch["prompt_spans"].tolist() == [[0, 0, 3], [1, 0, 2]]
    # Per-token fields: the prompt's values, the text value (its first token's) elsewhere.
    assert batch["mm_token_type_ids"].tolist() == [[0] * 7, [0, 1, 0, 0, 0, 0, 0]]


def test_virtual_rows_follow_the_rows_layout():
    shared, rows = collate_shared(examples(), 0), collate(examples(), 0)
    for key in ("kind", "example_index", "has_blind"):
        assert torch.equal(shared[key], rows[key])
    # Row order: chosen a, chosen b, rejected a, rejected b, blind b; labels[:, 1:] hold the response tokens.
    assert shared["labels"][:, 1:].tolist() == [[4, 5, -100], [9, -100, -100], [6, -100, -100],
                                                [10, 11, 12], [13, -100, -100]]
    assert (shared["labels"][:, 0] == -100).all()
    # Flat index (sequence * 7 + position) of the state that predicts each token: the prompt's last for the first.
    w = 7
    assert shared["predictor_index"].tolist() == [[2, 3, 0], [w + 1, 0, 0], [2, 0, 0],
                                                  [w + 1, w + 3, w + 4], [w + 1, 0, 0]]
    values = torch.arange(5.0)
    assert [t.tolist() for t in split_by_kind(values, shared)] == [t.tolist() for t in split_by_kind(values, rows)]


def test_packed_sequences_hold_several_examples():
    batch = collate_shared(examples(), pad_token_id=0, max_tokens=100)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert batch["example_of"].tolist() == [[0] * 6 + [1] * 7]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3, 4, 2]]
    assert batch["prompt_spans"].tolist() == [[0, 0, 3], [0, 6, 2]]
    assert batch["predictor_index"][1].tolist() == [7, 0, 0]  # b's chosen is predicted by b's last prompt token


def test_attention_keeps_responses_and_examples_apart():
    batch = collate_shared(examples(), pad_token_id=0, max_tokens=100)
    allowed = attention_allowed(batch["example_of"], batch["part_of"])[0, 0].int()
    expected = torch.tensor([
        # a: prompt (0-2), chosen (3-4), rejected (5); b: prompt (6-7), chosen (8), rejected (9-11), blind (12)
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1],
    ])
    assert torch.equal(allowed, expected)
    padded = collate_shared(examples(), pad_token_id=0)
    pad_row = attention_allowed(padded["example_of"], padded["part_of"])[0, 0, 6]
    assert pad_row.tolist() == [False] * 6 + [True]  # padding sees only itself


def test_image_blocks_and_windows():
    types = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0]])
    assert image_blocks(types).tolist() == [[-1, 0, 0, -1, 1, 1, 1, -1]]
    example_of = torch.zeros(1, 8, dtype=torch.long)
    part_of = torch.zeros(1, 8, dtype=torch.long)
    allowed = attention_allowed(example_of, part_of, image_blocks(types))[0, 0]
    assert allowed[1, 2] and allowed[4, 6] and not allowed[1, 4] and not allowed[3, 4]  # within a block only
    positions = torch.tensor([[0, 1, 2, 3, 2, 3]])  # two responses after a prompt of 2
    # Fewer than 2 positions back, by each token's own position (causality is attention_allowed's business).
    assert within_window(positions, 2)[0, 0].int().tolist() == [
        [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]


def random_layout(seed):
    """Packed shared batches of random examples (odd lengths, some without a blind response), with image blocks."""
    g = torch.Generator().manual_seed(seed)
    n = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    exs = []
    for i in range(5):
        responses = {k: list(range(1, n(1, 9))) for k in ("chosen", "rejected") + (("blind",) if i % 2 else ())}
        prompt = n(3, 40)
        start = n(0, prompt - 2)
        types = [0] * prompt
        image = n(1, prompt - start)
        types[start:start + image] = [1] * image
        exs.append(EncodedExample(str(i), list(range(1, prompt + 1)), {}, responses,
                                  prompt_fields={"token_type_ids": types}))
    return collate_shared(exs, pad_token_id=0, max_tokens=n(40, 120))


def test_flex_block_mask_is_the_dense_rule():
    """FlexAttention's mask_mod, evaluated as FlexAttention does (create_mask: every (q, k) pair through the
    function), equals attention_allowed and within_window, padding and Gemma-3 image blocks included."""
    from torch.nn.attention.flex_attention import create_mask

    for seed in range(4):
        b = random_layout(seed)
        blocks = image_blocks(b["token_type_ids"])
        rows, length = b["input_ids"].shape
        dense = attention_allowed(b["example_of"], b["part_of"], blocks)
        flex = create_mask(allowed_mask_mod(b["example_of"], b["part_of"], blocks), rows, 1, length, length,
                           device="cpu")
        assert torch.equal(flex, dense), seed
        windowed = create_mask(allowed_mask_mod(b["example_of"], b["part_of"], blocks, b["position_ids"], 5),
                               rows, 1, length, length, device="cpu")
        assert torch.equal(windowed, dense & within_window(b["position_ids"], 5)), seed
        assert not torch.equal(windowed, flex)  # the window does cut something here
