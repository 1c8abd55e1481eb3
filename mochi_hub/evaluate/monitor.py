"""The kNN monitor: is the backbone learning, while it trains?

At intervals (8 points over a run by default), the weighted kNN top-1 (k 200, T 0.07, as MoCo's monitor and `mochi probe --protocol knn`) of the
query encoder's backbone in evaluation mode: the bank a seeded subset of the training split, the queries one of the
validation split, both through the probe's centre crop at the training size. The same subsets and the same vote as
`mochi probe SOURCE --protocol knn --max-images N --split val`, so the monitor's last point is that probe's number.
Once, at step 0, of the untrained backbone: the reference a claim of learning must beat (the loss alone can fall
while the features get worse). A monitor, not a probe result: it goes to metrics.jsonl, the progress line, the
training curves and the card's training section, never to the model-index.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from mochi_hub.config import TrainConfig
from mochi_hub.data.augment import eval_transform
from mochi_hub.data.datasets import DecodedImages, num_classes, train_and_val
from mochi_hub.data.sampling import subset
from mochi_hub.errors import OptionError
from mochi_hub.evaluate.classify import knn_scores, topk_hits
from mochi_hub.evaluate.features import extract

log = logging.getLogger(__name__)

K, TEMPERATURE = 200, 0.07  # InstDisc / MoCo's monitor, and ProbeConfig's defaults
SEED = 0  # ProbeConfig's default seed: the probe with --max-images N draws these same subsets
DEFAULT_POINTS = 8  # points over a run by default: about 2.5 % of the fashion-mnist preset's time (2,000 + 2,000)


@dataclass
class KnnMonitor:
    bank: DecodedImages  # a seeded subset of the training split
    queries: DecodedImages  # a seeded subset of the validation split
    num_classes: int
    every: int  # steps between measurements
    batch_size: int
    workers: int

    @classmethod
    def for_run(cls, config: TrainConfig, last_step: int) -> tuple[KnnMonitor | None, str]:
        """The monitor a run's config asks for, or None, and one line saying which and why."""
        if config.knn_monitor_every == 0:
            return None, "kNN monitor off (--knn-monitor-every 0)"
        if config.streaming:  # the monitor picks images by index: it would download a stream whole
            if config.knn_monitor_every is not None:
                raise OptionError(
                    "--knn-monitor-every: the monitor reads images by index, not from a --streaming source"
                )
            return None, "kNN monitor off: --streaming (the monitor reads images by index)"
        try:
            train, val = train_and_val(config.dataset, config.data_root)
        except ValueError as error:
            if config.knn_monitor_every is not None:
                raise OptionError(f"--knn-monitor-every: the monitor needs a labelled val split ({error})") from None
            return None, "kNN monitor off: the dataset has no val split"
        every = config.knn_monitor_every or max(1, math.ceil(last_step / DEFAULT_POINTS))
        n = config.knn_monitor_images
        transform = eval_transform(config.image_size)
        monitor = cls(
            bank=DecodedImages(train, transform, indices=subset(len(train), n, SEED, 0)),
            queries=DecodedImages(val, transform, indices=subset(len(val), n, SEED, 1)),
            num_classes=num_classes(train),
            every=every,
            batch_size=256,
            workers=min(config.workers or 0, 4),
        )
        return monitor, (
            f"kNN monitor every {every} step(s): {len(monitor.bank)} training images as the bank, "
            f"{len(monitor.queries)} val images as queries (k {K}, T {TEMPERATURE})"
        )

    def due(self, step: int, last_step: int) -> bool:
        return step % self.every == 0 or step == last_step

    @torch.no_grad()
    def top1(self, backbone: nn.Module, accelerator: Accelerator) -> dict[str, Any]:
        """kNN top-1 (%) of `backbone` (put in evaluation mode, then back), and the seconds it took."""
        start, training = time.perf_counter(), backbone.training
        backbone.eval()
        try:
            features = [
                extract(backbone, images, accelerator=accelerator, batch_size=self.batch_size, workers=self.workers)
                for images in (self.bank, self.queries)
            ]  # (features [N, D], labels [N], skipped) each
        finally:
            backbone.train(training)
        (bank, bank_labels, _), (queries, query_labels, _) = features
        device = accelerator.device
        scores = knn_scores(
            bank.to(device), bank_labels.to(device), queries.to(device), self.num_classes, k=K, temperature=TEMPERATURE
        )  # [Q, C]
        hits = topk_hits(scores, query_labels.to(device), ks=(1,))  # [Q, 1]
        return {"knn_top1": 100.0 * hits.mean().item(), "seconds": time.perf_counter() - start}
