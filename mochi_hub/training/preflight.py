"""What a new run's config names must exist here before any work starts: the dataset and the timm model, and the
model must take inputs of --image-size. These checks read timm's registry and the file system, so they live here,
not in mochi_hub.config (a leaf that imports nothing of the package). A saved config is rebuilt without them: its
local dataset may be gone."""

from __future__ import annotations

from mochi_hub.config import TrainConfig
from mochi_hub.data.datasets import check_dataset_spec
from mochi_hub.errors import OptionError
from mochi_hub.method.model import backbone_args, min_image_size


def preflight(config: TrainConfig) -> TrainConfig:
    """Raise ValueError, naming the option, when the dataset or the model does not exist or cannot take the
    image size; return the config unchanged."""
    check_dataset_spec(config.dataset, config.data_root)
    args = backbone_args(config.model, init=config.init, image_size=config.image_size)  # checks the name too
    smallest = min_image_size(config.model, **args)
    if config.image_size < smallest:
        raise OptionError(
            f"--image-size {config.image_size}: {config.model} reduces its input {smallest}x, so it "
            f"needs at least {smallest} px"
        )
    return config
