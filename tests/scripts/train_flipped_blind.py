"""bpo/train.py with the sign of BPO's blind term flipped: the bug tests/test_science.py exists to catch.

    L = -[ log s(r(x, y_w) - r(x, y_l)) + w_b * log s(r(x, y_b) - r(x, y_w)) ]

(the policy is taught to prefer the blind response over the chosen one). Written here from the paper's formula, not
by calling bpo.loss's blind term, and swapped into bpo.train before its main() runs; launched like bpo/train.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bpo import loss as bpo_loss_module
from bpo import train


def flipped_bpo_loss(pc, pr, pb, rc, rr, rb, beta, blind_weight=1.0, blind_mask=None):
    loss, metrics = bpo_loss_module.bpo_loss(pc, pr, None, rc, rr, None, beta=beta)  # DPO's term, as in bpo
    mask = torch.ones_like(pc, dtype=torch.bool) if blind_mask is None else blind_mask
    r_w, r_b = beta * (pc - rc), beta * (pb - rb)
    blind = torch.where(mask, -F.logsigmoid(r_b - r_w), torch.zeros_like(r_w))  # the flipped sign
    loss = loss + blind_weight * blind.mean()
    metrics["loss"] = loss.detach() * pc.numel()
    return loss, metrics


if __name__ == "__main__":
    train.bpo_loss = flipped_bpo_loss
    train.main()
