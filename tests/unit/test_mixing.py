"""The MoCHi math against closed forms and a slow, materialised reference with the same plan."""

import math

import pytest
import torch
import torch.nn.functional as F

from mochi_hub.method.loss import contrastive_logits, info_nce
from mochi_hub.method.mixing import MixingPlan, hardest_negatives, sample_plan, synthetic_logits


def unit(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def reference_logits(q, k, queue, temperature, n_hard, plan):
    """Obviously correct and slow: materialise every synthetic point, one query at a time."""
    rows = []
    # Plan positions index the hard set in the order hardest_negatives returns it (topk, unsorted):
    # take that order, after checking that it holds exactly the N largest scores.
    given = hardest_negatives(q.detach() @ queue.T, n_hard) if n_hard else None
    for b in range(q.shape[0]):
        scores = [float(q[b].detach() @ queue[r]) for r in range(queue.shape[0])]
        order = sorted(range(len(scores)), key=lambda r: -scores[r])[:n_hard]
        if given is not None:
            assert sorted(given[b].tolist()) == sorted(order)
            order = given[b].tolist()
        hard = queue[order]  # [N, D]
        points = []
        for t in range(plan.s):
            a = plan.alpha[b, t].to(q.dtype)
            points.append(F.normalize(a * hard[plan.pair_i[b, t]] + (1 - a) * hard[plan.pair_j[b, t]], dim=0))
        for t in range(plan.s_prime):
            c = plan.beta[b, t].to(q.dtype)
            points.append(F.normalize(c * q[b].detach() + (1 - c) * hard[plan.query_j[b, t]], dim=0))
        negatives = torch.cat([queue, torch.stack(points)]) if points else queue
        rows.append(torch.cat([(q[b] * k[b]).sum().reshape(1), negatives.detach() @ q[b]]))
    return torch.stack(rows) / temperature


SHAPES = [  # B, D, K, N, s, s'
    (1, 8, 16, 4, 3, 2),
    (4, 8, 16, 1, 1, 0),
    (3, 16, 20, 20, 7, 5),  # N = K
    (5, 8, 13, 6, 0, 4),  # K not divisible by B, pair mixes off
    (6, 4, 32, 8, 16, 16),  # s > N: pairs repeat
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,D,K,N,s,sp", SHAPES)
def test_loss_and_gradient_equal_materialised_reference(B, D, K, N, s, sp, dtype):
    q0, k, queue = unit(B, D, dtype=dtype, seed=1), unit(B, D, dtype=dtype, seed=2), unit(K, D, dtype=dtype, seed=3)
    plan = sample_plan(B, N, s, sp, generator=torch.Generator().manual_seed(4))

    q = q0.clone().requires_grad_(True)
    logits, labels = contrastive_logits(q, k, queue, temperature=0.2, n_hard=N, plan=plan)
    info_nce(logits, labels).backward()

    q_ref = q0.double().clone().requires_grad_(True)
    ref = reference_logits(q_ref, k.double(), queue.double(), 0.2, N, plan)
    F.cross_entropy(ref, torch.zeros(B, dtype=torch.long)).backward()

    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert logits.shape == (B, 1 + K + s + sp)
    # The float32 reference differs only by the order of summation; both are checked in float64 too.
    torch.testing.assert_close(logits.double(), ref.detach(), **tol)
    torch.testing.assert_close(q.grad.double(), q_ref.grad, **tol)


def test_plain_moco_is_exactly_mochi_with_nothing_to_mix():
    q, k, queue = unit(4, 8, seed=1), unit(4, 8, seed=2), unit(32, 8, seed=3)
    moco, _ = contrastive_logits(q, k, queue, temperature=0.2)
    empty = sample_plan(4, 16, 0, 0, generator=torch.Generator().manual_seed(0))
    mochi_n00, _ = contrastive_logits(q, k, queue, temperature=0.2, n_hard=16, plan=empty)
    expected = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.2
    assert torch.equal(moco, mochi_n00)
    torch.testing.assert_close(moco, expected, rtol=0, atol=0)


def test_closed_form_collinear_positive_orthogonal_negatives():
    # q = k, every negative orthogonal: logits are (1/tau, 0, ..., 0); loss = log(1 + K e^{-1/tau}).
    D, K, tau = 8, 5, 0.5
    eye = torch.eye(D, dtype=torch.float64)
    q = eye[:1]
    queue = eye[1 : 1 + K]
    logits, labels = contrastive_logits(q, q, queue, temperature=tau)
    loss = info_nce(logits, labels)
    assert math.isclose(loss.item(), math.log(1 + K * math.exp(-1 / tau)), rel_tol=1e-6)


def test_closed_form_synthetic_points_between_orthogonal_negatives():
    # n_i, n_j, q mutually orthogonal: q.h = 0 for pair mixes; a query mix of weight beta has
    # q.h' = beta / sqrt(beta^2 + (1 - beta)^2).
    eye = torch.eye(4, dtype=torch.float64)
    q, queue = eye[:1], eye[1:3]
    plan = MixingPlan(
        pair_i=torch.tensor([[0]]),
        pair_j=torch.tensor([[1]]),
        alpha=torch.tensor([[0.3]]),
        query_j=torch.tensor([[1]]),
        beta=torch.tensor([[0.25]]),
    )
    out = synthetic_logits(q, q @ queue.T, queue, hardest_negatives(q @ queue.T, 2), plan)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.25 / math.sqrt(0.25**2 + 0.75**2)]], dtype=torch.float64))


def test_hard_set_is_per_query_and_rows_are_independent():
    B, D, K, N = 4, 8, 24, 5
    q, queue = unit(B, D, seed=1), unit(K, D, seed=2)
    plan = sample_plan(B, N, 6, 3, generator=torch.Generator().manual_seed(0))
    l_neg = q @ queue.T
    hard = hardest_negatives(l_neg, N)
    # hardest_negatives picks each row's own top N.
    for b in range(B):
        assert sorted(hard[b].tolist()) == sorted(sorted(range(K), key=lambda r: -l_neg[b, r].item())[:N])
    base = synthetic_logits(q, l_neg, queue, hard, plan)
    # Replace query 0 by another vector: its hard set changes, no other row of the output does.
    q2 = q.clone()
    q2[0] = unit(1, D, seed=9)[0]
    l_neg2 = q2 @ queue.T
    hard2 = hardest_negatives(l_neg2, N)
    assert not torch.equal(hard2[0], hard[0])
    changed = synthetic_logits(q2, l_neg2, queue, hard2, plan)
    assert torch.equal(changed[1:], base[1:])
    assert not torch.equal(changed[0], base[0])


def test_query_mix_is_harder_than_the_negative_it_came_from():
    B, D, K, N, sp = 8, 16, 64, 10, 12
    q, queue = unit(B, D, seed=5), unit(K, D, seed=6)
    plan = sample_plan(B, N, 0, sp, generator=torch.Generator().manual_seed(1))
    l_neg = q @ queue.T
    hard = hardest_negatives(l_neg, N)
    mixed = synthetic_logits(q, l_neg, queue, hard, plan)  # [B, s']
    source = l_neg.gather(1, hard.gather(1, plan.query_j))
    assert (source < 1).all()
    assert (mixed > source).all()


def test_no_gradient_reaches_queue_or_key():
    q = unit(3, 8, seed=1).requires_grad_(True)
    k = unit(3, 8, seed=2).requires_grad_(True)
    queue = unit(16, 8, seed=3).requires_grad_(True)
    plan = sample_plan(3, 4, 5, 2, generator=torch.Generator().manual_seed(0))
    logits, labels = contrastive_logits(q, k, queue, temperature=0.2, n_hard=4, plan=plan)
    info_nce(logits, labels).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


def test_sample_plan_is_reproducible_and_in_range():
    a = sample_plan(16, 7, 20, 10, beta_max=0.3, generator=torch.Generator().manual_seed(3))
    b = sample_plan(16, 7, 20, 10, beta_max=0.3, generator=torch.Generator().manual_seed(3))
    for name in ("pair_i", "pair_j", "alpha", "query_j", "beta"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.pair_i.shape == a.alpha.shape == (16, 20) and a.query_j.shape == a.beta.shape == (16, 10)
    assert a.pair_i.dtype == torch.long and a.pair_i.min() >= 0 and a.pair_j.max() < 7 and a.query_j.max() < 7
    assert a.alpha.min() >= 0 and a.alpha.max() < 1 and a.beta.min() >= 0 and a.beta.max() < 0.3


def test_chunked_pair_dots_match_unchunked(monkeypatch):
    import mochi_hub.method.mixing as mixing

    q, queue = unit(9, 8, seed=1), unit(40, 8, seed=2)
    plan = sample_plan(9, 10, 12, 3, generator=torch.Generator().manual_seed(0))
    hard = hardest_negatives(q @ queue.T, 10)
    whole = synthetic_logits(q, q @ queue.T, queue, hard, plan)
    monkeypatch.setattr(mixing, "PAIR_CHUNK_ELEMENTS", 8 * 12 * 2)  # two queries a chunk
    chunked = synthetic_logits(q, q @ queue.T, queue, hard, plan)
    assert torch.equal(whole, chunked)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: hardest_negatives(torch.zeros(2, 8), 9), "N"),
        (lambda: sample_plan(2, 0, 4, 0), "N"),
        (lambda: sample_plan(2, 0, 0, 4), "N"),
        (lambda: sample_plan(2, 4, 4, 4, beta_max=0.0), "beta_max"),
        (lambda: sample_plan(2, 4, 4, 4, beta_max=1.0), "beta_max"),
        (lambda: contrastive_logits(unit(2, 4), unit(2, 4), unit(8, 4), temperature=0.0), "temperature"),
        (lambda: contrastive_logits(unit(2, 4), unit(2, 4), unit(8, 4), temperature=-1.0), "temperature"),
        (lambda: contrastive_logits(torch.full((2, 4), float("nan")), unit(2, 4), unit(8, 4), temperature=0.2), "q"),
        (lambda: contrastive_logits(unit(2, 4), torch.full((2, 4), float("inf")), unit(8, 4), temperature=0.2), "k"),
    ],
)
def test_invalid_settings_raise_value_error_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()
