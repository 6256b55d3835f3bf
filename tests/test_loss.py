"""The BPO loss against a readable per-example reference and against numbers worked out by hand."""

import math

import pytest
import torch

from bpo.loss import bpo_loss, finalize_metrics, nll_loss
from bpo.ops.logprobs import sequence_logps


def reference_loss(pc, pr, pb, rc, rr, rb, beta, blind_weight, has_blind):
    """Straight from the paper's formula, one example at a time, in float64."""
    total = 0.0
    for i in range(len(pc)):
        r_w = beta * (pc[i] - rc[i])
        r_l = beta * (pr[i] - rr[i])
        term = -math.log(1 / (1 + math.exp(-(r_w - r_l))))
        if has_blind[i]:
            r_b = beta * (pb[i] - rb[i])
            term += blind_weight * -math.log(1 / (1 + math.exp(-(r_w - r_b))))
        total += term
    return total / len(pc)


def test_policy_equal_to_reference_gives_two_ln2():
    # Step 0 of a run: policy == reference, every reward is 0, each term is -log s(0) = ln 2.
    x = torch.tensor([-12.0, -3.5, -40.0])
    loss, m = bpo_loss(x, x - 1, x - 2, x, x - 1, x - 2, beta=0.1)
    assert loss.item() == pytest.approx(2 * math.log(2), abs=1e-7)
    out = finalize_metrics(m)
    assert out["rewards/chosen"] == 0 and out["margins/blind"] == 0


def test_hand_computed_values():
    # r_w = 0.1*(−1 − −2) = 0.1; r_l = 0.1*(−3 − −2) = −0.1; r_b = 0.1*(−2 − −2) = 0
    pc, pr, pb = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0])
    ref = torch.tensor([-2.0])
    loss, m = bpo_loss(pc, pr, pb, ref, ref, ref, beta=0.1)
    expected = math.log(1 + math.exp(-0.2)) + math.log(1 + math.exp(-0.1))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    out = finalize_metrics(m)
    assert out["rewards/chosen"] == pytest.approx(0.1)
    assert out["rewards/rejected"] == pytest.approx(-0.1)
    assert out["rewards/blind"] == pytest.approx(0.0)
    assert out["margins/rejected"] == pytest.approx(0.2)
    assert out["margins/blind"] == pytest.approx(0.1)
    assert out["accuracies/rejected"] == 1.0 and out["accuracies/blind"] == 1.0


@pytest.mark.parametrize("blind_weight", [1.0, 0.5])
def test_matches_reference_with_missing_blind(blind_weight):
    g = torch.Generator().manual_seed(0)
    vals = [-20 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(6)]
    has_blind = torch.tensor([True, False, True, True, False, True])
    vals[2] = torch.where(has_blind, vals[2], torch.full_like(vals[2], float("nan")))  # garbage where absent
    vals[2].requires_grad_(True)
    vals[0].requires_grad_(True)
    loss, m = bpo_loss(*vals, beta=0.3, blind_weight=blind_weight, blind_mask=has_blind)
    loss.backward()
    assert torch.isfinite(vals[0].grad).all() and (vals[2].grad[~has_blind] == 0).all()
    expected = reference_loss(*[v.tolist() for v in vals], 0.3, blind_weight, has_blind.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    out = finalize_metrics(m)
    assert out["count/blind"] == 4 and out["count/pairs"] == 6
    assert not math.isnan(out["rewards/blind"])


def test_dpo_when_blind_is_none():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
    loss, m = bpo_loss(pc, pr, None, rc, rr, None, beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)
    assert "rewards/blind" not in m


def test_gradients_match_reference_direction():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    pb = torch.tensor([-5.0], requires_grad=True)
    ref = torch.tensor([-5.0])
    loss, _ = bpo_loss(pc, pr, pb, ref, ref, ref, beta=0.1)
    loss.backward()
    # d/dx of -log s(beta*x) at 0 is -beta/2 per term: chosen appears in both terms.
    assert pc.grad.item() == pytest.approx(-0.1, abs=1e-7)
    assert pr.grad.item() == pytest.approx(0.05, abs=1e-7)
    assert pb.grad.item() == pytest.approx(0.05, abs=1e-7)


def test_metric_sums_add_up_across_splits():
    g = torch.Generator().manual_seed(1)
    vals = [-10 * torch.rand(8, generator=g) for _ in range(6)]
    mask = torch.tensor([True, True, False, True, False, False, True, True])
    _, whole = bpo_loss(*vals, beta=0.1, blind_mask=mask)
    halves = [bpo_loss(*[v[s] for v in vals], beta=0.1, blind_mask=mask[s])[1] for s in (slice(0, 3), slice(3, 8))]
    summed = {k: halves[0][k] + halves[1][k] for k in whole}
    a, b = finalize_metrics(whole), finalize_metrics(summed)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_nll_is_the_mean_of_per_token_means():
    # Two chosen responses: 2 tokens with log-probs -1, -3 and 1 token with -4 -> per-token NLL 2 and 4, mean 3.
    tok = torch.tensor([[-1.0, -3.0], [-4.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    loss, m = nll_loss(sequence_logps(tok, mask, "mean"))
    assert loss.item() == pytest.approx(3.0)
    out = finalize_metrics(m)
    assert out["nll/chosen"] == pytest.approx(3.0) and out["loss"] == pytest.approx(3.0) and out["count/pairs"] == 2
    loss.backward()
    # d loss / d logp: -1/(B * |y|) on each response token, 0 on padding: every example weighs the same.
    assert tok.grad.tolist() == [[-0.25, -0.25], [-0.5, 0.0]]


def test_nll_metric_sums_add_up_across_splits():
    means = -5 * torch.rand(6, generator=torch.Generator().manual_seed(2))
    whole = finalize_metrics(nll_loss(means)[1])
    halves = [nll_loss(means[s])[1] for s in (slice(0, 2), slice(2, 6))]
    summed = finalize_metrics({k: halves[0][k] + halves[1][k] for k in halves[0]})
    assert summed == pytest.approx(whole)
