"""`mochi detect SOURCE --data DIR`: options -> DetectConfig -> mochi_hub.evaluate.detect.run_detect."""

from __future__ import annotations

from typing import Any

from mochi_hub.config import DETECT_PRESETS, DetectConfig, resolve_detect_config

from .options import FAILURE, SOURCE, USAGE, config_options, exit_on, with_signature
from .options import print_config as show_config

HELP = {
    "data": "A folder in the COCO layout: annotations/instances_train.json, annotations/instances_val.json, "
    "images under train/ and val/ (file names in the JSON relative to those folders). Required.",
    "epochs": "Fine-tuning epochs. [default: 12, torchvision's 1x schedule]",
    "batch_size": "Global batch size (images), split evenly over processes. [default: 16]",
    "lr": "Initial SGD learning rate. [default: 0.02 x batch-size / 16]",
    "lr_milestones": "Epochs at which lr is multiplied by --lr-gamma, e.g. 8,11. [default: 8,11]",
    "lr_gamma": "Factor applied to lr at each milestone. [default: 0.1]",
    "warmup_iters": "Linear lr warm-up from 0.1 % over this many iterations (at most one epoch). [default: 1000]",
    "sgd_momentum": "SGD momentum. [default: 0.9]",
    "weight_decay": "SGD weight decay. [default: 0.0001]",
    "image_size": "Shorter image side in pixels (torchvision's min_size); the longer side is capped at 1333/800 "
    "of it. [default: 800]",
    "batch_norm": "BatchNorm of the trained backbone stages: frozen (FrozenBatchNorm, torchvision's default) | "
    "train (per-process batch statistics) | sync (SyncBatchNorm over GPUs, as MoCo's detection transfer). "
    "Stages that do not train are always frozen. [default: frozen]",
    "trainable_layers": "How many of the backbone's last stages train (a ResNet has 5: stem, layer1-4; 0 freezes "
    "the backbone). [default: 3]",
    "fpn_channels": "Channels of every FPN level (out_channels). [default: 256]",
    "hflip": "Random horizontal flips of the training images (--no-hflip: none). [default: on]",
    "max_images": "Use a seeded random subset of N images of each split (smoke runs).",
    "seed": "Seed of the heads' initialisation, data order, flips and the detector's box sampling. [default: 0]",
    "workers": "Data-loading worker processes per process. [default: 4]",
    "output": "Folder for results.json, detector.safetensors and the per-epoch state. [default: runs/detect]",
    "resume": "Continue from the last per-epoch state in --output (after a crash or kill).",
    "mixed_precision": "no | bf16 | fp16: autocast of the detector's forward. [default: no]",
    "preset": f"Start from a preset: {', '.join(DETECT_PRESETS)}.",
}


def run(source: str, *, print_config: bool = False, **options: Any) -> None:
    with exit_on(ValueError, code=USAGE):
        config = resolve_detect_config(**options)
    if print_config:
        return show_config(config)
    from mochi_hub.evaluate.detect import NonFiniteLossError, run_detect

    # Bad data, a bad SOURCE, an unwritable --output, a diverging loss: one line each.
    with exit_on(ValueError, NonFiniteLossError, code=FAILURE):
        run_detect(source, config)


detect = with_signature(
    run,
    [SOURCE, *config_options(DetectConfig, HELP)],
    "Fine-tune torchvision's Faster R-CNN + FPN on a backbone and report COCO box AP.",
)
