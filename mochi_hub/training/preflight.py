"""What a new run's config names must exist here before any work starts: the dataset and the timm model, and the
model must take inputs of --image-size; and, once the device is known, what the run will hold must fit in its memory.
These checks read timm's registry, the file system and the device, so they live here, not in mochi_hub.config (a leaf
that imports nothing of the package). A saved config is rebuilt without them: its local dataset may be gone."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from mochi_hub.config import TrainConfig
from mochi_hub.core.memory import Need
from mochi_hub.data.datasets import check_dataset_spec
from mochi_hub.errors import OptionError
from mochi_hub.method.model import backbone_args, forward_sizes, min_image_size

FLOAT32 = 4


def absolute_folders(config: Any) -> Any:
    """The config (train or probe) with a --dataset or --data-root that is a local folder as its absolute path, so
    that run.json, a resume, a probe or an export from another folder read the same folder, and no card takes
    "data/images" for a Hub id; anything else as given."""

    def absolute(spec: str | None) -> str | None:
        path = Path(spec).expanduser() if spec is not None else None
        return str(path.resolve()) if path is not None and path.is_dir() else spec

    return dataclasses.replace(config, dataset=absolute(config.dataset), data_root=absolute(config.data_root))


def preflight(config: TrainConfig) -> TrainConfig:
    """Raise OptionError, naming the option, when the dataset or the model does not exist or cannot take the
    image size; return the config with a local dataset folder as its absolute path."""
    check_dataset_spec(config.dataset, config.data_root)
    args = backbone_args(config.model, init=config.init, image_size=config.image_size)  # checks the name too
    smallest = min_image_size(config.model, **args)
    if config.image_size < smallest:
        raise OptionError(
            f"--image-size {config.image_size}: {config.model} reduces its input {smallest}x, so it "
            f"needs at least {smallest} px"
        )
    return absolute_folders(config)


def training_memory(config: TrainConfig, world: int, build: dict) -> list[Need]:
    """What one training process holds at least, known before its first step (mochi_hub.core.memory.check_fits
    compares it with the device): the queue and the logits against it, the two views of its share of the batch and
    the activations its backward needs, the weights with their gradients and momentum and the key encoder's copy.
    `build`: the backbone's timm arguments."""
    local = config.batch_size // world
    n_hard, s, s_prime = config.mochi
    sizes = forward_sizes(config.model, config.image_size, **build)
    activation = 2 if config.mixed_precision in ("bf16", "fp16") else FLOAT32
    views = 2 * local * 3 * config.image_size**2 * FLOAT32  # [2, b, 3, S, S]
    k, dim = config.queue_size, config.proj_dim
    return [
        Need(
            f"--queue-size {k}",
            f"the queue (K x {dim}, fp32) and {local} queries' logits against it",
            k * (dim * FLOAT32 + torch.int64.itemsize) + local * (1 + k + s + s_prime) * FLOAT32,
        ),
        Need(
            f"--batch-size {config.batch_size} at --image-size {config.image_size}",
            f"the views of {local} images and the activations kept for backward",
            views + local * sizes.activations * activation,
        ),
        Need(f"--model {config.model}", "weights, gradients, momentum and the key encoder", 4 * sizes.parameters * 4),
    ]
