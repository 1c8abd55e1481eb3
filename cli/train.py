"""`mochi train`: options -> TrainConfig -> mochi_hub.training.pretrain.train."""

from __future__ import annotations

from typing import Any

from mochi_hub.config import TRAIN_PRESETS, TrainConfig, resolve_train_config

from .options import FAILURE, USAGE, config_options, exit_on, fail, with_signature
from .options import print_config as show_config

NAMED_DATASETS = (
    "fashion-mnist",
    "imagenet-100",
    "imagenet-1k",
)  # mochi_hub.data.datasets.HUB_SOURCES, without importing it

HELP = {
    "dataset": "Hub dataset id (org/name), local imagefolder (train/ [val/]), or imagenet-100 | imagenet-1k | fashion-mnist.",
    "model": "timm architecture of the backbone (created with num_classes=0). [default: resnet50]",
    "image_size": "Crop size of the augmented views, in pixels. [default: 224]",
    "epochs": "Training epochs. [default: 200]",
    "batch_size": "Global batch size, split evenly over processes. [default: 256]",
    "queue_size": "K, the number of negatives in the queue. [default: 16384]",
    "mochi": "MoCHi N,s,s' (hardest negatives, pair mixes, query mixes); 0,0,0 is plain MoCo-v2. [default: 1024,1024,512]",
    "mixing_warmup_epochs": "(alias --warmup-epochs) MoCHi's warm-up: epochs of plain MoCo-v2 before mixing starts (not a learning-rate "
    "warm-up; see --lr-warmup-epochs). [default: 10]",
    "lr": "Base learning rate. [default: 0.03 x batch-size / 256]",
    "temperature": "Softmax temperature tau. [default: 0.2]",
    "key_momentum": "Momentum m of the key encoder update. [default: 0.999]",
    "seed": "Seed of every random draw (data order, augmentation, plans). [default: 0]",
    "workers": "Data-loading worker processes per training process. [default: on a GPU, the CPUs each local process "
    "gets minus one (at most 16); on a CPU, up to 4]",
    "output": "Run directory: run.json, metrics.jsonl, checkpoints/, export/. [default: runs/mochi]",
    "max_steps": "Stop after this many steps (smoke runs); still checkpoints and exports.",
    "save_every_steps": "Also checkpoint every N steps (always at each epoch end).",
    "resume": "Continue from a checkpoint folder, or 'auto' for the newest complete one in --output.",
    "mixed_precision": "auto | no | bf16 | fp16 (logits, loss and queue stay in fp32). auto: what accelerate launch "
    "--mixed_precision asked for, else bf16 on a GPU that has it, else no. [default: auto]",
    "preset": f"Start from a preset: {', '.join(TRAIN_PRESETS)}.",
    "init": "Initial weights: moco (MoCo's reference init: timm ResNets with zero_init_last=False) | timm "
    "(timm's default, zero-initialised last BatchNorm of each residual block). [default: moco]",
    "bn_splits": "BatchNorm groups over the global batch, in both encoders (the paper's 8 GPUs; the key "
    "encoder's groups come from the shuffled batch). [default: groups of 32 images, at most 8]",
    "lr_warmup_epochs": "Linear learning-rate warm-up epochs before the cosine schedule. [default: 0]",
    "proj_dim": "Output width of the MLP projection head. [default: 128]",
    "weight_decay": "SGD weight decay. [default: 1e-4]",
    "sgd_momentum": "SGD momentum. [default: 0.9]",
    "beta_max": "Upper bound of the query's weight beta in query mixes. [default: 0.5]",
    "channels_last": "Use channels_last memory format (faster on tensor cores and CPUs). [default: on a GPU]",
    "log_every_steps": "Write a metrics.jsonl line every N steps. [default: 10]",
    "keep_checkpoints": "Number of newest checkpoints kept. [default: 2]",
    "strict_data": "Stop at the first unusable image instead of reporting and skipping it.",
    "max_train_images": "Use only the first N training images, in the source's order (smoke runs, CPU studies); "
    "a warning says when they leave out classes.",
    "report_to": "Trackers: auto (TensorBoard when installed) | none | tensorboard | wandb | trackio. [default: auto]",
    "augment_on": "Where MoCo-v2's views are drawn: workers (PIL, per image) | device (batched on the training device, "
    "per-image parameters; workers only decode) | auto (device on a GPU). [default: auto]",
    "compile": "torch.compile both encoders (the key encoder too; off by default until measured on your GPU).",
    "on_nonfinite": "On a NaN/Inf loss: stop (keeping the last good checkpoint) or skip the step. [default: stop]",
}


def run(*, print_config: bool = False, **options: Any) -> None:
    if not any(options.get(k) is not None for k in ("dataset", "preset", "config_file")):
        fail(
            f"say what to train on: --dataset (a folder, a Hub id or {', '.join(NAMED_DATASETS)}), --preset "
            f"({', '.join(TRAIN_PRESETS)}; `mochi presets` shows their values) or --config FILE",
            USAGE,
        )
    with exit_on(ValueError, code=USAGE):
        config = resolve_train_config(**options)
        from mochi_hub.training.preflight import preflight  # timm and the data layer: not for --help

        preflight(config)
    if print_config:
        return show_config(config)
    from mochi_hub.data.datasets import BadImageError
    from mochi_hub.training.pretrain import NonFiniteLossError
    from mochi_hub.training.pretrain import train as train_run

    with exit_on(ValueError, BadImageError, NonFiniteLossError, code=FAILURE):  # bad input or a stopped run
        train_run(config)


train = with_signature(
    run,
    config_options(TrainConfig, HELP, aliases={"mixing_warmup_epochs": ("--warmup-epochs",)}),
    "Pretrain a timm backbone with MoCo-v2 + MoCHi (Accelerate: CPU, GPUs, nodes).",
)
