"""`mochi probe SOURCE`: options -> ProbeConfig -> mochi_hub.evaluate.probe.run_probe."""

from __future__ import annotations

from typing import Any

from mochi_hub.config import PROBE_PRESETS, ProbeConfig

from .options import FAILURE, SOURCE, USAGE, config_options, exit_on, with_signature
from .options import print_config as show_config

HELP = {
    "dataset": "Hub dataset id (org/name), local imagefolder (train/ + val/), or imagenet-100 | imagenet-1k | "
    "fashion-mnist (each also selects its preset). A local folder of ImageNet-100 synsets takes "
    "CMC's class order. [default: the dataset SOURCE was trained on]",
    "protocol": "linear (the paper's: frozen backbone, augmented images every epoch) | knn (weighted kNN) | "
    "fast (linear classifier on cached, un-augmented features; not the paper's). [default: linear]",
    "split": "Split reported: val (Hub: validation) or train; the classifier is always fitted on train. [default: val]",
    "epochs": "Classifier epochs (linear, fast). [default: 60; imagenet-1k 100; fashion-mnist 20]",
    "batch_size": "Global batch size, split evenly over processes. [default: 128; imagenet-1k 512; fashion-mnist 256]",
    "lr": "Initial learning rate. [default: 10.0; imagenet-1k 30.0]",
    "lr_milestones": "Epochs at which lr is multiplied by --lr-gamma, e.g. 30,40,50. [default: 30,40,50; "
    "imagenet-1k 60,80; fashion-mnist 12,16]",
    "lr_gamma": "Factor applied to lr at each milestone. [default: 0.1]",
    "sgd_momentum": "SGD momentum. [default: 0.9]",
    "weight_decay": "SGD weight decay. [default: 0]",
    "augment": "Train the linear protocol on RandomResizedCrop + flip (--no-augment: the evaluation crop). [default: on]",
    "crop_min_scale": "Smallest area share of the training crops (RandomResizedCrop). [default: 0.08; fashion-mnist 0.5]",
    "image_size": "Crop size in pixels; evaluation resizes to 256/224 of it and centre-crops. "
    "[default: SOURCE's input size (pretrained_cfg), else the preset's]",
    "knn_k": "Neighbours voting in kNN. [default: 200]",
    "knn_temperature": "kNN vote weight exp(similarity / T). [default: 0.07]",
    "seed": "Seed of the classifier's initialisation, data order, augmentation and subsets. [default: 0]",
    "workers": "Data-loading worker processes per process. [default: 4]",
    "output": "Write the results (top1, top5, source, hyperparameters, time) as JSON to this file.",
    "resume": "Continue the classifier from its last per-epoch state (in RUN/probes/, or next to --output).",
    "cache_dir": "Feature cache of fast and knn. [default: $MOCHI_HUB_CACHE or ~/.cache/mochi-hub, /features]",
    "max_images": "Use a seeded random subset of N images of each split (smoke runs).",
    "mixed_precision": "no | bf16 | fp16: autocast of the backbone's forward. [default: no]",
    "strict_data": "Stop at the first unusable image instead of reporting and skipping it.",
    "preset": f"Start from a preset: {', '.join(PROBE_PRESETS)}. [default: the one --dataset names, if any]",
}


def run(source: str, *, print_config: bool = False, **options: Any) -> None:
    with exit_on(ValueError, code=USAGE):
        from mochi_hub.publish.sources import probe_config_for

        config = probe_config_for(source, **options)
    if print_config:
        return show_config(config)
    from mochi_hub.data.datasets import BadImageError
    from mochi_hub.evaluate.probe import run_probe

    with exit_on(ValueError, BadImageError, code=FAILURE):  # FrozenBackboneError is a bug, not bad input: it raises
        run_probe(source, config)


probe = with_signature(
    run,
    [SOURCE, *config_options(ProbeConfig, HELP)],
    "Evaluate a frozen backbone: the paper's linear protocol, kNN, or cached-feature linear.",
)
