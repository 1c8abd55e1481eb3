"""The MoCo-v2 pair around a timm backbone: query encoder, momentum key encoder, projection head."""

from __future__ import annotations

import copy
import difflib

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_model_name(name: str) -> None:
    """Unknown timm architectures fail with the closest names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ValueError(f"--model: unknown timm architecture {name!r}{hint}")


def create_backbone(name: str, **kwargs) -> nn.Module:
    """timm.create_model(name, num_classes=0): pooled features, no classifier."""
    check_model_name(name)
    return timm.create_model(name, num_classes=0, **kwargs)


class Encoder(nn.Module):
    """Backbone + MoCo-v2's 2-layer MLP head (hidden = backbone width). Returns unit-norm embeddings."""

    def __init__(self, backbone: nn.Module, proj_dim: int = 128):
        super().__init__()
        width = backbone.num_features
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, proj_dim))

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)  # [B, proj_dim]


def make_key_encoder(query: Encoder) -> Encoder:
    """A frozen copy that only follows the query encoder through `momentum_update`."""
    key = copy.deepcopy(query)
    key.requires_grad_(False)
    return key


@torch.no_grad()
def momentum_update(key: nn.Module, query: nn.Module, momentum: float) -> None:
    """key <- m key + (1 - m) query for parameters; BatchNorm statistics are the key encoder's own."""
    key_params = [p for p in key.parameters()]
    query_params = [p.detach() for p in query.parameters()]
    torch._foreach_lerp_(key_params, query_params, 1.0 - momentum)
