"""`mochi train`: options -> TrainConfig -> mochi_hub.training.pretrain.train."""

from __future__ import annotations

from typing import Any

from mochi_hub.config import TRAIN_PRESETS, TrainConfig, resolve_train_config
from mochi_hub.errors import USAGE

from .options import config_options, fail, user_errors, with_signature
from .options import print_config as show_config

NAMED_DATASETS = (
    "fashion-mnist",
    "imagenet-100",
    "imagenet-1k",
)  # mochi_hub.data.datasets.HUB_SOURCES, without importing it


def run(*, print_config: bool = False, **options: Any) -> None:
    if not any(options.get(k) is not None for k in ("dataset", "preset", "config_file")):
        fail(
            f"say what to train on: --dataset (a folder, a Hub id or {', '.join(NAMED_DATASETS)}), --preset "
            f"({', '.join(TRAIN_PRESETS)}; `mochi presets` shows their values) or --config FILE",
            USAGE,
        )
    with user_errors():
        config = resolve_train_config(**options)
        from mochi_hub.training.preflight import preflight  # timm and the data layer: not for --help

        config = preflight(config)
        if print_config:
            return show_config(config)
        from mochi_hub.training.pretrain import train as train_run

        train_run(config)


train = with_signature(
    run,
    config_options(TrainConfig, TRAIN_PRESETS),
    "Pretrain a timm backbone with MoCo-v2 + MoCHi (Accelerate: CPU, GPUs, nodes).",
)
