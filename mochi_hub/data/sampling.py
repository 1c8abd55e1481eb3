"""Seeded order and augmentation: which image a batch holds and how it is augmented depend only on
(seed, epoch, index), never on a running RNG, the number of workers or whether the run was resumed."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from mochi_hub.core.seeding import generator, stream_seed


class GlobalBatches(Sampler[list[int]]):
    """This process's share of each global batch: a seeded permutation per epoch, last partial batch
    dropped (with `wrap`: filled from the start of the permutation, so every image is seen), batches before
    `start` skipped (resume). Rank r takes rows [r*L, (r+1)*L) of every batch. The permutation is drawn from
    (seed, stream, *parts, epoch).

    `epoch` and `start` may be set between iterations (the sampler is iterated in the main process); with
    `tag_epoch`, each index comes as (epoch, index), so a dataset in a persistent worker learns the epoch with it.
    """

    def __init__(
        self,
        size: int,
        global_batch: int,
        *,
        seed: int,
        epoch: int,
        rank: int,
        world: int,
        start: int = 0,
        tag_epoch: bool = False,
        wrap: bool = False,
        stream: str = "data_order",
        parts: tuple[int, ...] = (),
    ):
        self.size, self.global_batch, self.seed, self.epoch = size, global_batch, seed, epoch
        self.rank, self.local = rank, global_batch // world
        self.start, self.tag_epoch = start, tag_epoch
        self.wrap, self.stream, self.parts = wrap, stream, parts
        self.batches = math.ceil(size / global_batch) if wrap else size // global_batch

    def __len__(self) -> int:
        return self.batches - self.start

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=generator(self.seed, self.stream, *self.parts, self.epoch)).tolist()
        if self.wrap:
            order *= math.ceil(self.batches * self.global_batch / self.size)
        for b in range(self.start, self.batches):
            first = b * self.global_batch + self.rank * self.local
            batch = order[first : first + self.local]
            yield [(self.epoch, i) for i in batch] if self.tag_epoch else batch


class EpochShuffle(Sampler[int]):
    """A permutation drawn from (seed, epoch) alone: a resumed run sees the order an uninterrupted one would,
    and training on images and on cached features of the same images visits them in the same order."""

    def __init__(self, size: int, seed: int, epoch: int):
        self.size, self.seed, self.epoch = size, seed, epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.size, generator=generator(self.seed, "probe_order", self.epoch)).tolist())


class SeededItems(Dataset):
    """Item `i` of epoch `e` drawn with torch's CPU generator seeded by (seed, stream, e, i), whatever the
    worker count: torchvision's transforms draw from that global generator, so its state is saved and
    restored around each item (torch.manual_seed or fork_rng would also touch every accelerator's generator,
    about 0.3 ms an image)."""

    def __init__(self, dataset: Dataset, seed: int, stream: str, epoch: int = 0):
        self.dataset, self.seed, self.stream, self.epoch = dataset, seed, stream, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)  # (epoch, index): GlobalBatches' tag
        with seeded_rng(stream_seed(self.seed, self.stream, epoch, index)):
            return self.dataset[index]


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded with `seed` inside the block, its state restored after."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def subset(
    size: int,
    max_images: int | None,
    seed: int,
    split: int,
    *,
    stream: str = "probe_subset",
    parts: tuple[int, ...] = (),
) -> list[int]:
    """All indices, or a seeded random subset of max_images of them (in dataset order), drawn from
    (seed, stream, *parts, split)."""
    if max_images is None or max_images >= size:
        return list(range(size))
    pick = torch.randperm(size, generator=generator(seed, stream, *parts, split))[:max_images]
    return sorted(pick.tolist())
