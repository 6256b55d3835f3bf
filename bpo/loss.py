"""The BPO loss: pure functions of per-sequence log-probs and beta. No model, data or torch.distributed here.

Blind Preference Optimization adds a third response per example, the blind response y_b that the reference model
writes when the image is withheld, and asks the policy to prefer the chosen response over it as well:

    L = -[ log s(r(x, y_w) - r(x, y_l)) + w_b * log s(r(x, y_w) - r(x, y_b)) ]
    r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x))

with every response scored on the full input x, image included (the BPO paper's objective; w_b = 1 there). The first
term is DPO's (Rafailov et al. 2023, eq. 7). Examples without a blind response contribute only the first term.

`nll_loss` is supervised fine-tuning's objective on the chosen response, used alone (loss.type=sft) or added to the
preference loss with a weight (loss.sft_weight; TRL's `rpo_alpha` after Pang et al. 2024's DPO+NLL; InternVL's
MPO generation term):

    L_nll = -(1/B) sum_i (1/|y_w,i|) log pi(y_w,i | x_i)
"""

import torch
import torch.nn.functional as F


def bpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    policy_blind_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    ref_blind_logps,
    beta,
    blind_weight=1.0,
    blind_mask=None,
):
    """Mean BPO loss over a batch of B examples, and metrics as sums (see `finalize_metrics`).

    All log-prob arguments are (B,). `policy_blind_logps`/`ref_blind_logps` may be None, which drops the blind term
    everywhere (plain DPO). `blind_mask` (B,) bool marks the examples that have a blind response; None means all do.
    Metrics are returned as per-batch sums with their counts (`count/pairs`, `count/blind`) so that micro-batches and
    ranks can be added up exactly before dividing once per optimizer step.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    margin_rejected = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(margin_rejected)  # (B,)

    metrics = {
        "count/pairs": torch.tensor(float(chosen_rewards.numel())),
        "rewards/chosen": chosen_rewards.detach().sum(),
        "rewards/rejected": rejected_rewards.detach().sum(),
        "margins/rejected": margin_rejected.detach().sum(),
        "accuracies/rejected": (margin_rejected.detach() > 0).float().sum(),
        "logps/chosen": policy_chosen_logps.detach().sum(),
        "logps/rejected": policy_rejected_logps.detach().sum(),
    }

    if policy_blind_logps is not None:
        if blind_mask is None:
            blind_mask = torch.ones_like(policy_blind_logps, dtype=torch.bool)
        # Zero the missing slots with where(), not by multiplying with the mask: a NaN there would survive 0 * NaN,
        # in the loss and in its gradient.
        blind_policy = torch.where(blind_mask, policy_blind_logps, torch.zeros_like(policy_blind_logps))
        blind_ref = torch.where(blind_mask, ref_blind_logps, torch.zeros_like(ref_blind_logps))
        blind_rewards = beta * (blind_policy - blind_ref)
        margin_blind = chosen_rewards - blind_rewards
        blind_losses = torch.where(blind_mask, -F.logsigmoid(margin_blind), torch.zeros_like(margin_blind))
        losses = losses + blind_weight * blind_losses
        present = blind_mask.to(margin_blind.dtype)
        metrics.update({
            "count/blind": present.sum().detach(),
            "rewards/blind": (blind_rewards.detach() * present).sum(),
            "margins/blind": (margin_blind.detach() * present).sum(),
            "accuracies/blind": ((margin_blind.detach() > 0).to(present.dtype) * present).sum(),
            "logps/blind": blind_policy.detach().sum(),
        })

    loss = losses.mean()
    metrics["loss"] = loss.detach() * chosen_rewards.numel()
    return loss, metrics


def nll_loss(policy_chosen_token_mean_logps):
    """Mean over B examples of each chosen response's per-token NLL, and metrics as sums (see `finalize_metrics`).

    `policy_chosen_token_mean_logps` (B,): each chosen response's log-prob divided by its token count (what
    `bpo.ops.logprobs.sequence_logps(..., reduction="mean")` gives). Each example weighs the same whatever its
    length, so the loss of a global batch does not depend on how it is split into micro-batches and ranks (a mean
    over all tokens of a micro-batch would).
    """
    nll = -policy_chosen_token_mean_logps  # (B,)
    loss = nll.mean()
    metrics = {"count/pairs": torch.tensor(float(nll.numel())), "nll/chosen": nll.detach().sum(),
               "loss": loss.detach() * nll.numel()}
    return loss, metrics


def finalize_metrics(sums):
    """Divide summed metrics by their counts: blind metrics by the number of blind responses, the rest by pairs."""
    out = {}
    pairs = float(sums["count/pairs"])
    blind = float(sums.get("count/blind", 0.0))
    for key, value in sums.items():
        if key.startswith("count/"):
            out[key] = float(value)
            continue
        denom = blind if key.endswith("/blind") else pairs
        if denom > 0:
            out[key] = float(value) / denom
    return out
