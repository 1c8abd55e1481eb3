"""Named seed streams: every random draw of a run comes from a generator seeded by (seed, stream, parts).

`numpy.random.SeedSequence` mixes the run's seed, the stream's name and the parts (epoch, step, image
index, rank) into independent seeds, so two streams never collide (CPython's `hash((-1,))` equals
`hash((-2,))`, which is why a tuple hash is not used) and a draw depends only on where it happens, not
on what ran before: a resumed run draws what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

# One stream per use; adding a stream never changes the draws of the others.
STREAMS = (
    "data_order",
    "augment",
    "shuffle_bn",
    "mochi_plan",
    "queue_init",
    "model_init",
    "probe_subset",
    "probe_order",
    "probe_augment",
    "classifier_init",
    "detect_order",
    "detect_init",
)


def _stream_id(stream: str) -> int:
    if stream not in STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; known: {', '.join(STREAMS)}")
    return int.from_bytes(hashlib.sha256(stream.encode()).digest()[:4], "little")


def stream_seed(seed: int, stream: str, *parts: int) -> int:
    """A 63-bit seed for `stream` at `parts` (non-negative integers: epoch, step, index, rank...)."""
    if seed < 0 or any(p < 0 for p in parts):
        raise ValueError(f"seeds and stream parts must be >= 0, got seed {seed}, parts {parts}")
    state = np.random.SeedSequence([seed, _stream_id(stream), *parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) | int(state[1]) << 32) & 0x7FFF_FFFF_FFFF_FFFF


def generator(seed: int, stream: str, *parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` (draws on a CUDA generator need `device=` on every call)."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, stream, *parts))
