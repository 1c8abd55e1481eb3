"""The probe's math on frozen features: kNN votes, the linear classifier's init and schedule, top-k hits.

Pure torch; no data loading, no processes (mochi_hub.evaluate.probe runs these).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mochi_hub.config import ProbeConfig
from mochi_hub.core.seeding import generator


def lr_at(epoch: int, config: ProbeConfig) -> float:
    """Step schedule: lr x gamma at each milestone epoch already reached (epochs count from 0)."""
    return config.lr * config.lr_gamma ** sum(epoch >= m for m in config.lr_milestones)


def make_classifier(num_features: int, num_classes: int, seed: int) -> nn.Linear:
    """MoCo's linear classifier initialisation: weights N(0, 0.01), bias 0, from the probe's seed."""
    classifier = nn.Linear(num_features, num_classes)
    with torch.no_grad():
        classifier.weight.normal_(0.0, 0.01, generator=generator(seed, "classifier_init"))
        classifier.bias.zero_()
    return classifier


def topk_hits(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """[B, C] scores, [B] labels -> [B, len(ks)] 1.0 where the label is among the top k (k capped at C)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # [B, k]
    match = top == labels[:, None]  # [B, k]
    return torch.stack([match[:, :k].any(dim=1) for k in ks], dim=1).float()


@torch.no_grad()
def knn_scores(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    *,
    k: int,
    temperature: float,
    chunk: int = 512,
) -> Tensor:
    """Weighted kNN votes [Q, C]: per query, the k most cosine-similar bank features each add
    exp(sim / temperature) to their class (InstDisc, Wu et al. 2018; as in MoCo's kNN monitor)."""
    bank = F.normalize(bank.float(), dim=1)  # [N, D]
    k = min(k, bank.shape[0])
    votes = []
    for part in F.normalize(queries.float(), dim=1).split(chunk):  # [q, D]
        sim, index = (part @ bank.T).topk(k, dim=1)  # [q, k]
        weights = (sim / temperature).exp()  # [q, k]
        votes.append(
            torch.zeros(part.shape[0], num_classes, device=part.device).scatter_add_(1, bank_labels[index], weights)
        )  # [q, C]
    return torch.cat(votes)
