"""The pretraining data: images -> two seeded MoCo-v2 views each -> this process's share of every global batch.

`pretraining_views` and `epoch_loader` are what the training loop, the benches and the tests iterate, so
"the same batches as the loop" holds by construction.
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from .augment import TwoViews, moco_v2_transform
from .config import TrainConfig
from .data import DecodedImages, ImageSource, collate_samples
from .sampling import GlobalBatches, SeededItems


def pretraining_views(source: ImageSource, config: TrainConfig) -> SeededItems:
    """The first config.max_train_images images (all by default), each decoded on demand and turned into two
    MoCo-v2 views seeded by (seed, epoch, index)."""
    count = len(source) if config.max_train_images is None else min(len(source), config.max_train_images)
    images = DecodedImages(source, TwoViews(moco_v2_transform(config.image_size)), strict=config.strict_data,
                           indices=list(range(count)))
    return SeededItems(images, config.seed, "augment")


def epoch_loader(views: SeededItems, config: TrainConfig, epoch: int, *, rank: int = 0, world: int = 1,
                 start: int = 0, pin_memory: bool = False) -> DataLoader:
    """This process's batches of one epoch, in the seeded order of GlobalBatches, from batch `start` on."""
    views.epoch = epoch
    return DataLoader(views, batch_sampler=GlobalBatches(len(views), config.batch_size, seed=config.seed, epoch=epoch,
                                                         rank=rank, world=world, start=start),
                      num_workers=config.workers, collate_fn=collate_samples, pin_memory=pin_memory,
                      persistent_workers=False)
