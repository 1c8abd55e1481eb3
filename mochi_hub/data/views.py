"""The pretraining data: images -> two MoCo-v2 views each -> this process's share of every global batch.

Two places can draw the views (`--augment-on`):
- workers: DataLoader workers decode and augment each image with PIL/torchvision (`moco_v2_transform`), seeded
  by (seed, epoch, index), so the views do not depend on the number of workers or processes;
- device: workers only decode to uint8 (large images pre-shrunk), and `DeviceViews` draws both views of the whole
  batch on the training device with per-image parameters, seeded by (seed, step, rank). On a GPU this removes
  the CPU bottleneck of MoCo-v2's augmentation (about 40 images/s per core with PIL).
`pretraining_views`, `PretrainingLoader` and `BatchViews.of` are what the loop, the benches and the tests iterate, so
"the same batches as the loop" holds by construction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mochi_hub.config import TrainConfig
from mochi_hub.core.distributed import to_device
from mochi_hub.core.seeding import generator
from mochi_hub.data.augment import MEAN, STD, TwoViews, moco_v2_transform
from mochi_hub.data.datasets import DecodedImages, ImageSource, Sample, collate_samples
from mochi_hub.data.device_augment import DeviceViews, decode_to_uint8, pad_collate
from mochi_hub.data.sampling import GlobalBatches, SeededItems

MIN_CROP_SCALE = 0.2  # MoCo-v2's RandomResizedCrop(scale=(0.2, 1))


def pretraining_views(source: ImageSource, config: TrainConfig, augment_on: str = "workers") -> Dataset:
    """The first config.max_train_images images (all by default), decoded on demand: as two seeded MoCo-v2 views
    (workers), or as uint8 tensors for `device_views` (device)."""
    count = len(source) if config.max_train_images is None else min(len(source), config.max_train_images)
    if augment_on == "device":
        # Pre-shrink only what no crop needs: the smallest crop (scale 0.2) of the shorter side still >= image_size.
        max_side = math.ceil(config.image_size / math.sqrt(MIN_CROP_SCALE))
        return DecodedImages(
            source, partial(decode_to_uint8, max_side=max_side), strict=config.strict_data, indices=list(range(count))
        )
    images = DecodedImages(
        source, TwoViews(moco_v2_transform(config.image_size)), strict=config.strict_data, indices=list(range(count))
    )
    return SeededItems(images, config.seed, "augment")


def collate_canvas(samples: list[Sample]) -> dict[str, Any]:
    """uint8 images of any sizes -> one padded canvas with each image's size (the device path's batches)."""
    canvas, sizes = pad_collate([s.image for s in samples])
    return {
        "images": canvas,
        "sizes": sizes,
        "labels": torch.tensor([s.label for s in samples], dtype=torch.long),
        "skipped": [reason for s in samples for reason in s.skipped],
    }


class PretrainingLoader:
    """This process's batches, epoch after epoch, in the seeded order of GlobalBatches, from one DataLoader whose
    workers stay up for the whole run: the epoch reaches them with each index, not by re-forking them."""

    def __init__(self, views: Dataset, config: TrainConfig, *, rank: int = 0, world: int = 1, pin_memory: bool = False):
        seeded = isinstance(views, SeededItems)  # the worker path's views depend on the epoch
        self.batches = GlobalBatches(
            len(views), config.batch_size, seed=config.seed, epoch=0, rank=rank, world=world, tag_epoch=seeded
        )
        self.loader = DataLoader(
            views,
            batch_sampler=self.batches,
            num_workers=config.workers,
            collate_fn=collate_samples if seeded else collate_canvas,
            pin_memory=pin_memory,
            persistent_workers=config.workers > 0,
        )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of `epoch` from batch `start` on (a resumed run starts mid-epoch)."""
        self.batches.epoch, self.batches.start = epoch, start
        return iter(self.loader)


class BatchViews:
    """A loader batch -> (query views, key views) on the device, whichever path drew them."""

    def __init__(self, config: TrainConfig, augment_on: str, device: torch.device, memory_format: torch.memory_format):
        self.config, self.augment_on, self.device, self.memory_format = config, augment_on, device, memory_format
        self.device_views = DeviceViews(config.image_size, mean=MEAN, std=STD) if augment_on == "device" else None

    def of(self, batch: dict[str, Any], step: int, rank: int) -> tuple[Tensor, Tensor]:
        if self.device_views is None:
            return tuple(
                v.to(self.device, non_blocking=True, memory_format=self.memory_format) for v in batch["images"]
            )  # pinned by the loader: no wait
        canvas = to_device(batch["images"], self.device)  # [L, 3, H, W] uint8
        draws = generator(self.config.seed, "augment", step, rank)  # on the host: see sample_view_params
        return tuple(
            v.contiguous(memory_format=self.memory_format) for v in self.device_views(canvas, batch["sizes"], draws)
        )  # [L, 3, S, S] each
