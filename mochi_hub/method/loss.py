"""MoCo-v2 logits with MoCHi's synthetic negatives appended, and the InfoNCE loss.

The positive sits in column 0, so the label of every query is 0. Logits and loss are computed in
float32 (or float64, if given) whatever the autocast dtype: the temperature divides small differences of cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mochi_hub.method.mixing import MixingPlan, _synthetic_logits, hardest_negatives, require_finite


def contrastive_logits(
    q: Tensor,
    k: Tensor,
    queue: Tensor,
    *,
    temperature: float,
    n_hard: int = 0,
    plan: MixingPlan | None = None,
    check_finite: bool = True,
) -> tuple[Tensor, Tensor]:
    """Logits [B, 1 + K + s + s'] (positive, queue, synthetic) divided by the temperature, and labels [B].

    q: [B, D] unit-norm queries; k: [B, D] unit-norm keys (no gradient); queue: [K, D].
    With plan None, or a plan with s = s' = 0, this is exactly MoCo-v2. `check_finite` raises NonFiniteError on
    a NaN/Inf input; each check synchronises a GPU, so the training step checks the loss instead.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if check_finite:
        require_finite("q", q)
        require_finite("k", k)
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
    q = q.to(dtype)
    k = k.detach().to(dtype)
    queue = queue.detach().to(dtype)

    l_pos = (q * k).sum(1, keepdim=True)  # [B, 1]
    l_neg = q @ queue.T  # [B, K]
    parts = [l_pos, l_neg]
    if plan is not None and plan.s + plan.s_prime > 0:
        if n_hard <= 0:
            raise ValueError(f"MoCHi N (n_hard) must be > 0 to mix s={plan.s}, s'={plan.s_prime}, got {n_hard}")
        hard = hardest_negatives(l_neg, n_hard)  # [B, N]
        parts.append(_synthetic_logits(q, l_neg, queue, hard, plan))  # q checked above  # [B, s + s']
    logits = torch.cat(parts, dim=1) / temperature  # [B, 1 + K + s + s']
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=logits.device)  # [B]
    return logits, labels


def info_nce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy with the positive as the target class."""
    return F.cross_entropy(logits, labels)
