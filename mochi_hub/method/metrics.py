"""What a training step reports: pure functions of embeddings and logits."""

from __future__ import annotations

import torch
from torch import Tensor


def proxy_top1(logits: Tensor) -> float:
    """Share of queries whose positive (column 0) outranks every negative, synthetic ones included."""
    return (logits[:, 0] > logits[:, 1:].max(dim=1).values).float().mean().item()


def alignment(q: Tensor, k: Tensor) -> float:
    """Wang & Isola (2020), alpha = 2: E ||q - k||^2 over positive pairs (lower is better aligned)."""
    return (q.float() - k.float()).square().sum(1).mean().item()


def uniformity(x: Tensor, t: float = 2.0) -> float:
    """Wang & Isola (2020): log E exp(-t ||x_i - x_j||^2) over distinct pairs (lower is more uniform)."""
    return torch.pdist(x.float()).square().mul(-t).exp().mean().log().item()


def false_negative_rate(hard: Tensor, queue_labels: Tensor, labels: Tensor) -> float | None:
    """Share of same-class entries among each query's hardest queue entries (the paper's Fig. 3 analysis).

    hard: [B, N] queue indices; queue_labels: [K] (-1 where unknown); labels: [B]. None without labels.
    """
    hard_labels = queue_labels[hard]  # [B, N]
    known = hard_labels >= 0
    if labels.min() < 0 or not known.any():
        return None
    same = (hard_labels == labels[:, None]) & known  # [B, N]
    return (same.sum() / known.sum()).item()
