"""The frozen backbone of an evaluation: fixed, and proven unchanged afterwards.

If a single weight or BatchNorm statistic changed, or a module was left in train mode, the number is not a
frozen-backbone evaluation and `check_frozen` raises.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FrozenBackboneError(RuntimeError):
    """Something other than the classifier changed: the number is not a frozen-backbone evaluation."""


def freeze(backbone: nn.Module) -> nn.Module:
    """BatchNorm (and dropout) in eval mode, no gradients: the backbone is a fixed function."""
    backbone.eval()
    backbone.requires_grad_(False)
    return backbone


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter and buffer (BatchNorm running statistics and counters included)."""
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def check_frozen(before: dict[str, Tensor], module: nn.Module) -> None:
    """Raise FrozenBackboneError, naming the tensors, if any changed since `before` (bit for bit)."""
    after = module.state_dict()
    changed = sorted(set(before) ^ set(after))
    changed += [name for name in sorted(set(before) & set(after)) if not torch.equal(before[name], after[name])]
    training = [name or type(module).__name__ for name, m in module.named_modules() if m.training]
    if changed or training:
        detail = []
        if changed:
            detail.append(f"{len(changed)} tensor(s) changed, e.g. {', '.join(changed[:5])}")
        if training:
            detail.append(f"{len(training)} module(s) left in train mode, e.g. {', '.join(training[:3])}")
        raise FrozenBackboneError(
            "the backbone was not frozen during the probe: " + "; ".join(detail) + ". "
            "Only the linear classifier may change (BatchNorm in eval mode, no optimizer "
            "over backbone weights); this result is not a frozen-backbone evaluation."
        )
