"""The MoCo negative queue: K unit-norm keys as rows, a write pointer, and (optionally) their labels.

Contents, pointer and labels are buffers, so they travel with `state_dict` and checkpoints. The caller
gathers keys from all processes first, so that every rank writes the same keys in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NegativeQueue(nn.Module):
    keys: Tensor  # [K, D] float32, unit rows
    labels: Tensor  # [K] long, -1 where unknown (labels only feed the false-negative analysis)
    ptr: Tensor  # [] long, the next row to write

    def __init__(self, size: int, dim: int, *, generator: torch.Generator | None = None):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size K and dim must be > 0, got K={size}, dim={dim}")
        # Random unit keys until real ones arrive, as in MoCo.
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor | None = None) -> None:
        """Write keys [n, D] (already gathered from all processes) over the oldest rows, wrapping around."""
        n = keys.shape[0]
        if n > self.size:
            raise ValueError(
                f"cannot enqueue {n} keys into a queue of K = {self.size}: K must be at least the global batch size"
            )
        rows = (self.ptr + torch.arange(n, device=self.keys.device)) % self.size  # [n]
        self.keys[rows] = keys.detach().to(self.keys.dtype)
        self.labels[rows] = -1 if labels is None else labels.long()  # on the queue's device, as the keys
        self.ptr.copy_((self.ptr + n) % self.size)
