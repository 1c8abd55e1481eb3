"""MoCHi: hard negative mixing for contrastive learning.

Kalantidis, Sariyildiz, Pion, Weinzaepfel, Larlus. NeurIPS 2020, arXiv:2010.01028.

Symbols follow the paper. For each query q (unit norm) and the queue Q of K unit-norm keys:
- N: the number of hardest negatives kept per query (largest q.n), its "hard set";
- s: synthetic negatives h = normalize(alpha n_i + (1 - alpha) n_j), alpha ~ U(0, 1), n_i, n_j from the hard set;
- s': synthetic negatives h' = normalize(beta q~ + (1 - beta) n_j), beta ~ U(0, beta_max), q~ = q without
  gradient, so the query's share stays below a half.

Synthetic points serve their own query's logits only, never enter the queue, and carry no gradient.

Nothing here materialises the B x (s + s') x D mixed vectors. Every n is unit norm, so
    q.h  = (alpha q.n_i + (1 - alpha) q.n_j) / sqrt(alpha^2 + (1 - alpha)^2 + 2 alpha (1 - alpha) n_i.n_j)
    q.h' = (beta q.q~ + (1 - beta) q.n_j) / sqrt(beta^2 |q~|^2 + (1 - beta)^2 + 2 beta (1 - beta) q~.n_j)
The numerators reuse entries of l_neg = q Q^T (which carry q's gradient); the denominators are constants
for backward (n_i.n_j needs one dot product per pair, computed without grad in bounded chunks). The
gradient w.r.t. q is then exactly the mixed point h (or h'), as with the materialised form.

Sampling (indices and coefficients, from a torch.Generator) is kept apart from computing, so the math
can be checked against a slow reference with a fixed plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mochi_hub.config import check_mochi_settings

# Upper bound on the elements of each temporary [rows, D] gather used for the pair dot products on a CPU:
# 2^18 float32 elements are 1 MiB, small enough to stay in cache (larger chunks measured slower there).
# On an accelerator one gather of every pair is fastest: a loop of small kernels would cost a launch each.
PAIR_CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class MixingPlan:
    """The random part of one MoCHi step: which hard negatives to mix, and with which weights.

    Indices are positions in each query's own hard set (0..N-1), not queue rows.
    """

    pair_i: Tensor  # [B, s] long
    pair_j: Tensor  # [B, s] long
    alpha: Tensor  # [B, s] in (0, 1): weight of n_i
    query_j: Tensor  # [B, s'] long
    beta: Tensor  # [B, s'] in (0, beta_max): weight of the query

    @property
    def s(self) -> int:
        return self.pair_i.shape[1]

    @property
    def s_prime(self) -> int:
        return self.query_j.shape[1]

    def to(self, device: torch.device | str) -> MixingPlan:
        return MixingPlan(
            *(t.to(device, non_blocking=True) for t in (self.pair_i, self.pair_j, self.alpha, self.query_j, self.beta))
        )


def hardest_negatives(l_neg: Tensor, n: int) -> Tensor:
    """Per query, the queue indices of the n largest entries of l_neg = q @ queue.T.

    l_neg: [B, K]. Returns [B, n] long, in no particular order (sorting would cost a third more on the CPU).
    """
    if not 0 < n <= l_neg.shape[1]:
        raise ValueError(f"MoCHi N (n_hard) must lie in 1..K = {l_neg.shape[1]}, got {n}")
    return l_neg.detach().topk(n, dim=1, sorted=False).indices  # [B, n]


def sample_plan(
    batch: int, n_hard: int, s: int, s_prime: int, *, beta_max: float = 0.5, generator: torch.Generator | None = None
) -> MixingPlan:
    """Draw the mixing plan for a batch: all randomness comes from `generator` (on its device)."""
    check_mochi_settings(n_hard, s, s_prime, beta_max=beta_max)
    device = generator.device if generator is not None else torch.device("cpu")

    def positions(count: int) -> Tensor:
        return torch.randint(n_hard, (batch, count), generator=generator, device=device)

    pair_i, pair_j = positions(s), positions(s)  # [B, s] each
    alpha = torch.rand(batch, s, generator=generator, device=device)  # [B, s] ~ U(0, 1)
    query_j = positions(s_prime)  # [B, s']
    beta = beta_max * torch.rand(batch, s_prime, generator=generator, device=device)  # [B, s'] ~ U(0, beta_max)
    return MixingPlan(pair_i, pair_j, alpha, query_j, beta)


class NonFiniteError(ValueError):
    """An input of the loss holds NaN or Inf: training decides whether to stop or skip the step."""


def require_finite(name: str, tensor: Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"{name} holds non-finite values (NaN or Inf)")


@torch.no_grad()
def _pair_dots(queue: Tensor, rows_i: Tensor, rows_j: Tensor) -> Tensor:
    """n_i . n_j for each pair of queue rows: [B, s] from rows [B, s], in bounded chunks of pairs.

    `index_select` of flat rows is several times faster on the CPU than advanced indexing with [B, s].
    """
    batch, s = rows_i.shape
    flat_i, flat_j = rows_i.reshape(-1), rows_j.reshape(-1)  # [B * s]
    out = torch.empty(batch * s, dtype=queue.dtype, device=queue.device)
    chunk = max(1, PAIR_CHUNK_ELEMENTS // max(1, queue.shape[1])) if queue.device.type == "cpu" else max(1, batch * s)
    for start in range(0, batch * s, chunk):
        stop = start + chunk
        n_i = queue.index_select(0, flat_i[start:stop])  # [chunk, D]
        n_j = queue.index_select(0, flat_j[start:stop])  # [chunk, D]
        torch.sum(n_i.mul_(n_j), dim=1, out=out[start:stop])  # [chunk]
    return out.view(batch, s)


class _GatherColumns(torch.autograd.Function):
    """l_neg.gather(1, rows), whose backward keeps only `rows`.

    Autograd's own gather saves its whole input for backward: l_neg, [B, K], would stay alive until then.
    """

    @staticmethod
    def forward(ctx, l_neg: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.l_neg_shape = l_neg.shape
        return l_neg.gather(1, rows)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (rows,) = ctx.saved_tensors
        return grad.new_zeros(ctx.l_neg_shape).scatter_add_(1, rows, grad), None


def synthetic_logits(q: Tensor, l_neg: Tensor, queue: Tensor, hard: Tensor, plan: MixingPlan) -> Tensor:
    """Cosine similarity of each query with its s + s' synthetic negatives, pair mixes first.

    q: [B, D] unit-norm queries (with gradient); l_neg: [B, K] = q @ queue.T, computed from this q so
    that it carries q's gradient; queue: [K, D] unit rows; hard: [B, N] queue indices from
    `hardest_negatives`; plan: from `sample_plan`. Returns [B, s + s'] in q's dtype.
    """
    require_finite("q", q)
    return _synthetic_logits(q, l_neg, queue, hard, plan)


def _synthetic_logits(q: Tensor, l_neg: Tensor, queue: Tensor, hard: Tensor, plan: MixingPlan) -> Tensor:
    """synthetic_logits for a caller that has already checked q (each check synchronises a GPU)."""
    queue = queue.detach()
    plan = plan.to(q.device)
    dtype = q.dtype

    s = plan.s
    # One gather of queue rows and one of l_neg for all pair and query mixes: a single [B, K] scatter in backward,
    # and l_neg itself is not kept for backward.
    rows = hard.gather(1, torch.cat([plan.pair_i, plan.pair_j, plan.query_j], dim=1))  # [B, 2s + s'] queue rows
    dots = _GatherColumns.apply(l_neg, rows)  # [B, 2s + s'] q.n, with q's gradient
    rows_i, rows_j = rows[:, :s], rows[:, s : 2 * s]  # [B, s] each
    q_dot_i, q_dot_j, q_dot_n = dots[:, :s], dots[:, s : 2 * s], dots[:, 2 * s :]

    # Pair mixes: h = normalize(alpha n_i + (1 - alpha) n_j).
    alpha = plan.alpha.to(dtype)  # [B, s]
    n_dot = _pair_dots(queue, rows_i, rows_j).to(dtype)  # [B, s] n_i.n_j, no grad
    pair_norm = (alpha.square() + (1 - alpha).square() + 2 * alpha * (1 - alpha) * n_dot).sqrt()  # [B, s]
    pair = (alpha * q_dot_i + (1 - alpha) * q_dot_j) / pair_norm  # [B, s]

    # Query mixes: h' = normalize(beta q~ + (1 - beta) n_j), q~ = q detached.
    beta = plan.beta.to(dtype)  # [B, s']
    q_dot_qt = (q * q.detach()).sum(1, keepdim=True)  # [B, 1] value |q|^2, gradient q~
    qt_sq = q_dot_qt.detach()  # [B, 1] |q~|^2
    qt_dot_n = q_dot_n.detach()  # [B, s'] q~.n_j, no grad
    query_norm = (beta.square() * qt_sq + (1 - beta).square() + 2 * beta * (1 - beta) * qt_dot_n).sqrt()
    query = (beta * q_dot_qt + (1 - beta) * q_dot_n) / query_norm  # [B, s']

    return torch.cat([pair, query], dim=1)  # [B, s + s']
