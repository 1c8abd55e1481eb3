"""One MoCo-v2 + MoCHi training step (MoCo's Algorithm 1 with MoCHi's synthetic negatives, Sec. 4 of the paper):

    two views -> query encoder (grads) and key encoder (momentum copy, shuffle-BN) -> l_pos, l_neg, MoCHi
    synthetic logits -> InfoNCE -> SGD step -> momentum update -> enqueue the keys of every process.

No host synchronisation: the loss's finiteness stays on the device for the loop to check when it logs or
saves; only `skip_nonfinite` reads it every step, because it must decide whether to update (and fp16's
GradScaler, chosen with --mixed-precision fp16, reads its overflow flag every step by design).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from mochi_hub.config import TrainConfig
from mochi_hub.core.distributed import all_ranks_true, shuffled_keys
from mochi_hub.core.seeding import generator
from mochi_hub.method.loss import contrastive_logits, info_nce
from mochi_hub.method.mixing import sample_plan
from mochi_hub.method.model import Encoder, momentum_update
from mochi_hub.method.queue import NegativeQueue


@dataclass(frozen=True)
class StepSettings:
    """The few settings a step reads (`StepSettings.of(config)`)."""

    temperature: float
    key_momentum: float
    mochi: tuple[int, int, int]  # (N, s, s')
    beta_max: float
    seed: int  # of the shuffle-BN permutation and the MoCHi plan, drawn at (seed, step)
    skip_nonfinite: bool  # skip a step whose loss is not finite (reads it every step) instead of stopping later

    @classmethod
    def of(cls, config: TrainConfig) -> StepSettings:
        return cls(
            temperature=config.temperature,
            key_momentum=config.key_momentum,
            mochi=tuple(config.mochi),
            beta_max=config.beta_max,
            seed=config.seed,
            skip_nonfinite=config.on_nonfinite == "skip",
        )


@dataclass
class StepOutput:
    loss: Tensor  # [] float32, on the device
    logits: Tensor  # [L, 1 + K + s + s'] / temperature
    q: Tensor  # [L, D] this process's queries
    k: Tensor  # [L, D] this process's keys
    finite: Tensor  # [] bool on the device: this process's loss was finite
    applied: bool  # False only when skip_nonfinite skipped the step: then nothing was updated


def training_step(
    query: nn.Module,
    key: Encoder,
    queue: NegativeQueue,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    images_q: Tensor,
    images_k: Tensor,
    labels: Tensor,
    *,
    step: int,
    mixing: bool,
    settings: StepSettings,
    bn_splits: int = 1,
) -> StepOutput:
    n_hard, s, s_prime = settings.mochi
    saved_buffers = (
        [b.clone() for b in _buffers(query, key)] if settings.skip_nonfinite else None
    )  # BatchNorm statistics move in the forward
    with accelerator.autocast():
        q = query(images_q, splits=bn_splits)  # [L, D]
        # On the host, so every rank draws the same permutation whatever its GPU (see shuffled_keys).
        shuffle = generator(settings.seed, "shuffle_bn", step)
        k, keys_all = shuffled_keys(key, images_k, accelerator, shuffle, splits=bn_splits)  # [L, D], [G, D]
    plan = (
        sample_plan(
            q.shape[0],
            n_hard,
            s,
            s_prime,
            beta_max=settings.beta_max,
            generator=generator(settings.seed, "mochi_plan", step, accelerator.process_index, device=q.device),
        )
        if mixing
        else None
    )
    logits, targets = contrastive_logits(
        q, k, queue.keys, temperature=settings.temperature, n_hard=n_hard, plan=plan, check_finite=False
    )  # [L, 1 + K + s + s']
    loss = info_nce(logits, targets)
    finite = torch.isfinite(loss.detach())  # [] bool
    # Every process must take the same branch, or the gradient all-reduce waits forever.
    if settings.skip_nonfinite and not bool(all_ranks_true(finite, accelerator)):
        for buffer, value in zip(_buffers(query, key), saved_buffers):
            buffer.copy_(value)
        return StepOutput(loss, logits, q, k, finite, applied=False)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    momentum_update(key, accelerator.unwrap_model(query), settings.key_momentum)
    labels_all = accelerator.gather(labels) if accelerator.num_processes > 1 else labels  # [G]
    queue.enqueue(keys_all.float(), labels_all)
    return StepOutput(loss, logits, q, k, finite, applied=True)


def _buffers(*modules: nn.Module) -> list[Tensor]:
    return [b for m in modules for b in m.buffers()]


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """MoCo-v2's cosine schedule, per step: base_lr at step 0 (after an optional linear warm-up), 0 at the end."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (min(step, total_steps) - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
