"""The pretraining data: images -> two MoCo-v2 views each -> this process's share of every global batch.

Two places can draw the views (`--augment-on`), and the workers hand over one of three things (`loader_output`):
- views (workers): DataLoader workers decode and augment each image with PIL/torchvision (`moco_v2_transform`),
  seeded by (seed, epoch, index), so the views do not depend on the number of workers or processes;
- bytes (device, on a GPU): workers read each image's file and hand colour JPEGs over undecoded; the batch is decoded
  on the GPU (nvJPEG) and `DeviceViews` draws both views there with per-image parameters, seeded by (seed, step,
  rank), on a side stream, so decoding and views of batch n + 1 overlap the training step of batch n;
- pixels (device, on a CPU): workers decode (large JPEGs at a reduced scale) and the views are drawn as above.
Workers that decode at all decode a JPEG at the smallest DCT scale whose shorter side still covers the smallest crop
at the output size (`min_decoded_side`), so pre-shrinking never costs resolution a crop needs. No batch is padded.
`pretraining_views`, `PretrainingLoader` and `BatchViews.of` are what the loop, the benches and the tests iterate, so
"the same batches as the loop" holds by construction. Streaming shards (`--streaming`): mochi_hub.data.shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial
from itertools import islice
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from mochi_hub.config import TrainConfig
from mochi_hub.core.seeding import generator
from mochi_hub.data.augment import MEAN, STD, TwoViews, moco_v2_transform
from mochi_hub.data.datasets import DecodedImages, ImageSource, collate_samples, decode_rgb, resolve_dataset
from mochi_hub.data.decode import collate_packed, min_decoded_side, worker_image
from mochi_hub.data.device_augment import DeviceViews
from mochi_hub.data.sampling import GlobalBatches, SeededItems
from mochi_hub.data.shards import ShardStream, StreamingViews, resolve_stream

LoaderOutput = Literal["views", "pixels", "bytes"]


def loader_output(augment_on: str, device: torch.device) -> LoaderOutput:
    """What the workers hand over: finished views (PIL, --augment-on workers); for views on the device, JPEG bytes
    when the device is a GPU that decodes them, decoded pixels on a CPU (decoding in the workers runs in parallel)."""
    if augment_on == "workers":
        return "views"
    return "bytes" if device.type == "cuda" else "pixels"


def open_dataset(config: TrainConfig, split: str = "train") -> ImageSource | ShardStream:
    """--dataset (with --data-root, --streaming) -> a map-style image source, or a stream of shards."""
    if config.streaming:
        return resolve_stream(config.dataset, split, config.data_root)
    return resolve_dataset(config.dataset, split, data_root=config.data_root)


def pretraining_views(
    source: ImageSource | ShardStream, config: TrainConfig, output: LoaderOutput = "views"
) -> Dataset:
    """The first config.max_train_images images (all by default), read on demand: as two seeded MoCo-v2 views
    (views), or as images for `BatchViews` to decode and augment on the device (bytes, pixels)."""
    if output not in ("views", "pixels", "bytes"):
        raise ValueError(f"loader output must be views, pixels or bytes (see loader_output), got {output!r}")
    count = len(source) if config.max_train_images is None else min(len(source), config.max_train_images)
    if isinstance(source, ShardStream):  # --streaming: it reads, decodes and seeds in its own workers
        return source.views(config, output)
    if output == "views":
        images = DecodedImages(
            source,
            TwoViews(moco_v2_transform(config.image_size)),
            decode=partial(decode_rgb, min_side=min_decoded_side(config.image_size)),
            strict=config.strict_data,
            indices=list(range(count)),
        )
        return SeededItems(images, config.seed, "augment")
    return DecodedImages(
        source,
        partial(worker_image, min_side=min_decoded_side(config.image_size), keep_jpeg=output == "bytes"),
        decode=None,
        strict=config.strict_data,
        indices=list(range(count)),
    )


class PretrainingLoader:
    """This process's batches, epoch after epoch, in the seeded order of GlobalBatches, from one DataLoader whose
    workers stay up for the whole run: the epoch reaches them with each index, not by re-forking them.

    A stream (`--streaming`, an IterableDataset) has no indices: its workers are forked for each epoch, which they
    learn, with the batch to start from, from the dataset itself; the epoch ends after len(views) // batch batches."""

    def __init__(self, views: Dataset, config: TrainConfig, *, rank: int = 0, world: int = 1, pin_memory: bool = False):
        views_in_workers = (
            isinstance(views, SeededItems) or isinstance(views, StreamingViews) and views.output == "views"
        )
        collate = collate_samples if views_in_workers else collate_packed
        self.views, self.steps_per_epoch = views, len(views) // config.batch_size
        if isinstance(views, IterableDataset):
            views.rank, views.world = rank, world
            self.batches = None
            self.loader = DataLoader(
                views,
                batch_size=config.batch_size // world,
                num_workers=config.workers,
                collate_fn=collate,
                pin_memory=pin_memory,
            )
            return
        self.batches = GlobalBatches(
            len(views), config.batch_size, seed=config.seed, epoch=0, rank=rank, world=world, tag_epoch=views_in_workers
        )
        self.loader = DataLoader(
            views,
            batch_sampler=self.batches,
            num_workers=config.workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            persistent_workers=config.workers > 0,
        )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of `epoch` from batch `start` on (a resumed run starts mid-epoch)."""
        if self.batches is None:
            self.views.epoch, self.views.start = epoch, start
            first = start % max(1, self.loader.num_workers)  # the workers' round resumes whole: drop its head
            return islice(iter(self.loader), first, first + self.steps_per_epoch - start)
        self.batches.epoch, self.batches.start = epoch, start
        return iter(self.loader)


class BatchViews:
    """A loader batch -> (query views, key views) on the device, whichever path drew them.

    On CUDA the device path runs on its own stream: the decode and views of the next batch overlap the step the
    main stream is running; the main stream waits for them by an event (the host never waits)."""

    def __init__(self, config: TrainConfig, augment_on: str, device: torch.device, memory_format: torch.memory_format):
        self.config, self.augment_on, self.device, self.memory_format = config, augment_on, device, memory_format
        self.device_views = DeviceViews(config.image_size, mean=MEAN, std=STD) if augment_on == "device" else None
        self.side_stream = torch.cuda.Stream(device) if device.type == "cuda" and self.device_views else None

    def of(self, batch: dict[str, Any], step: int, rank: int) -> tuple[Tensor, Tensor]:
        if self.device_views is None:
            return tuple(
                v.to(self.device, non_blocking=True, memory_format=self.memory_format) for v in batch["images"]
            )  # pinned by the loader: no wait
        packed = batch["images"]
        with torch.cuda.stream(self.side_stream) if self.side_stream else nullcontext():
            images, replaced = packed.on(self.device, strict=self.config.strict_data)  # uint8 [3, h, w] each
            draws = generator(self.config.seed, "augment", step, rank)  # on the host: see sample_view_params
            views = tuple(
                v.contiguous(memory_format=self.memory_format) for v in self.device_views(images, packed.sizes, draws)
            )  # [L, 3, S, S] each
        batch["skipped"] += replaced
        if self.side_stream:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.side_stream)
            for view in views:
                view.record_stream(main)  # made on the side stream, used on the main one
        return views
