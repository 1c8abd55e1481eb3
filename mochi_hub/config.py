"""Typed configuration: the single source of truth for every command.

A config is resolved once, in this order: dataclass defaults <- preset <- config file <- explicit options,
then validated as a whole in `__post_init__`, so an error names the option and its allowed range.
The resolved config (`to_dict`) is saved with every run, checkpoint, export and model card.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .mixing import check_mochi_settings

MIXED_PRECISIONS = ("no", "bf16", "fp16")
REPORTERS = ("auto", "none", "tensorboard", "wandb", "trackio")


def parse_mochi(value: str | tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
    """'1024,1024,512' or (1024, 1024, 512) -> (N, s, s')."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("(", "").replace(")", "").split(",")]
    else:
        parts = list(value)
    try:
        n_hard, s, s_prime = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"--mochi takes three integers N,s,s' (e.g. 1024,1024,512; 0,0,0 for MoCo-v2), "
                         f"got {value!r}") from None
    return n_hard, s, s_prime


def _positive(name: str, value: float | int | None, *, allow_none: bool = False, zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise ValueError(f"--{name.replace('_', '-')} must be {bound}, got {value}")


@dataclass
class TrainConfig:
    """MoCo-v2 + MoCHi pretraining. Field names are the CLI option names (`--queue-size` is queue_size)."""

    dataset: str = "fashion-mnist"  # Hub dataset id, local imagefolder, or a named source
    model: str = "resnet50"  # any timm architecture, created with num_classes=0
    image_size: int = 224
    epochs: int = 200
    batch_size: int = 256  # global batch, split over processes
    queue_size: int = 16384  # K
    mochi: tuple[int, int, int] = (1024, 1024, 512)  # (N, s, s'); (0, 0, 0) is MoCo-v2
    warmup_epochs: int = 10  # epochs without mixing
    lr: float | None = None  # None: 0.03 x batch_size / 256
    temperature: float = 0.2
    key_momentum: float = 0.999
    seed: int = 0
    workers: int = 4
    output: str = "runs/mochi"
    max_steps: int | None = None  # stop early (smoke runs); still exports
    save_every_steps: int | None = None  # checkpoints also every N steps (always at each epoch end)
    resume: str | None = None  # a checkpoint folder, or "auto" for the newest in output
    mixed_precision: str = "no"
    preset: str | None = None
    # Not in the paper's options list but part of the recipe; each is still an option.
    proj_dim: int = 128
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9
    beta_max: float = 0.5
    channels_last: bool = False
    log_every_steps: int = 10
    keep_checkpoints: int = 2
    strict_data: bool = False
    max_train_images: int | None = None  # subset for smoke runs and the CPU study
    report_to: str = "auto"  # Accelerate trackers: auto (TensorBoard when installed), none, tensorboard, wandb, trackio
    on_nonfinite: str = "stop"  # a NaN/Inf loss: stop (keeping the last good checkpoint) or skip the step

    def __post_init__(self) -> None:
        self.mochi = parse_mochi(self.mochi)
        n_hard, s, s_prime = self.mochi
        for name in ("image_size", "epochs", "batch_size", "queue_size", "temperature", "proj_dim",
                     "log_every_steps", "keep_checkpoints"):
            _positive(name, getattr(self, name))
        for name in ("warmup_epochs", "workers", "weight_decay", "sgd_momentum"):
            _positive(name, getattr(self, name), zero=True)
        for name in ("lr", "max_steps", "save_every_steps", "max_train_images"):
            _positive(name, getattr(self, name), allow_none=True)
        if not 0.0 <= self.key_momentum < 1.0:
            raise ValueError(f"--key-momentum must lie in [0, 1), got {self.key_momentum}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}, "
                             f"got {self.mixed_precision!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"--on-nonfinite must be stop or skip, got {self.on_nonfinite!r}")
        if self.report_to not in REPORTERS:
            raise ValueError(f"--report-to must be one of {', '.join(REPORTERS)}, got {self.report_to!r}")
        if self.queue_size < self.batch_size:
            raise ValueError(f"--queue-size (K = {self.queue_size}) must be at least the global "
                             f"--batch-size ({self.batch_size})")
        try:
            check_mochi_settings(n_hard, s, s_prime, queue_size=self.queue_size, beta_max=self.beta_max)
        except ValueError as error:
            raise ValueError(f"--mochi: {error}") from None
        if s + s_prime > 0 and self.warmup_epochs >= self.epochs:
            raise ValueError(f"--warmup-epochs ({self.warmup_epochs}) must be < --epochs ({self.epochs}) "
                             "or MoCHi never mixes; use --mochi 0,0,0 for plain MoCo-v2")

    @property
    def base_lr(self) -> float:
        """The lr actually used: the paper's linear scaling unless given."""
        return self.lr if self.lr is not None else 0.03 * self.batch_size / 256

    @property
    def uses_mixing(self) -> bool:
        return self.mochi[1] + self.mochi[2] > 0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mochi"] = list(self.mochi)
        return data


# The paper's settings (Sec. 4 and Appendix) and a CPU-sized demo. Values are TrainConfig fields.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet-100": dict(dataset="imagenet-100", model="resnet50", image_size=224, epochs=200, batch_size=256,
                         queue_size=16384, mochi=(1024, 1024, 512), warmup_epochs=10),
    "imagenet-1k": dict(dataset="imagenet-1k", model="resnet50", image_size=224, epochs=200, batch_size=256,
                        queue_size=65536, mochi=(1024, 1024, 512), warmup_epochs=15),
    # Minutes on a 2-core CPU: a small ResNet on 32 px Fashion-MNIST crops.
    "demo": dict(dataset="fashion-mnist", model="resnet18", image_size=32, epochs=2, batch_size=64,
                 queue_size=1024, mochi=(64, 64, 32), warmup_epochs=1, lr=0.06, workers=2,
                 max_train_images=4096, key_momentum=0.99, log_every_steps=8),
}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of config fields."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of option names to values")
    return data


def resolve_config(cls: type, presets: dict[str, dict[str, Any]], *, preset: str | None = None,
                   config_file: str | Path | None = None, **options: Any):
    """defaults <- preset <- config file <- options (None means 'not given'), validated once."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"--preset must be one of {', '.join(presets)}, got {preset!r}")
        values.update(presets[preset])
        values["preset"] = preset
    if config_file is not None:
        values.update(load_config_file(config_file))
    values.update({k: v for k, v in options.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    return cls(**values)


def resolve_train_config(**kwargs: Any) -> TrainConfig:
    """A new run's config. Beyond the values, what they name must exist here: the dataset and the model.
    (A saved config is rebuilt without that check: its local dataset may be gone.)"""
    from .data import check_dataset_spec
    from .model import check_model_name

    config = resolve_config(TrainConfig, TRAIN_PRESETS, **kwargs)
    check_dataset_spec(config.dataset)
    check_model_name(config.model)
    return config


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a saved config (run.json, checkpoint), ignoring fields this version does not know."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in known})


# --- Evaluation: `mochi probe` --------------------------------------------------------------------------

PROBE_PROTOCOLS = ("linear", "knn", "fast")


def parse_milestones(value: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """'30,40,50' or (30, 40, 50) -> (30, 40, 50); '' or 'none' -> () (a constant lr)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("(", "").replace(")", "").split(",")]
        parts = [p for p in parts if p and p.lower() != "none"]
    else:
        parts = list(value)
    try:
        milestones = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"--lr-milestones takes epochs separated by commas (e.g. 30,40,50), got {value!r}") from None
    if any(m <= 0 for m in milestones) or list(milestones) != sorted(set(milestones)):
        raise ValueError(f"--lr-milestones must be increasing positive epochs, got {value!r}")
    return milestones


@dataclass
class ProbeConfig:
    """Evaluation of a frozen backbone. Field names are the CLI option names; SOURCE is not a field
    (it is what is evaluated, not how). Defaults are the paper's ImageNet-100 linear protocol."""

    dataset: str = "fashion-mnist"  # Hub dataset id, local imagefolder (train/ + val/), or a named source
    protocol: str = "linear"  # linear (the paper's), knn, or fast (cached features; not the paper's)
    split: str = "val"  # the split reported; the classifier / kNN memory is always fitted on train
    epochs: int = 60
    batch_size: int = 128  # global batch, split over processes
    lr: float = 10.0
    lr_milestones: tuple[int, ...] = (30, 40, 50)  # epochs at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    sgd_momentum: float = 0.9
    weight_decay: float = 0.0
    augment: bool = True  # RandomResizedCrop + flip for training (off: the evaluation transform)
    crop_min_scale: float = 0.08  # RandomResizedCrop's smallest area share (torchvision's and MoCo's 0.08)
    image_size: int = 224  # crop size; evaluation resizes to 256/224 of it, then centre-crops
    knn_k: int = 200
    knn_temperature: float = 0.07
    seed: int = 0
    workers: int = 4
    output: str | None = None  # a JSON file of the results
    resume: bool = False  # continue the classifier from its last per-epoch state
    cache_dir: str | None = None  # feature cache (fast, knn); None: $MOCHI_HUB_CACHE or ~/.cache/mochi-hub
    max_images: int | None = None  # a seeded subset of each split (smoke runs)
    mixed_precision: str = "no"  # autocast of the backbone's forward: no, bf16, fp16
    strict_data: bool = False
    preset: str | None = None

    def __post_init__(self) -> None:
        self.lr_milestones = parse_milestones(self.lr_milestones)
        if self.protocol not in PROBE_PROTOCOLS:
            raise ValueError(f"--protocol must be one of {', '.join(PROBE_PROTOCOLS)}, got {self.protocol!r}")
        if self.split not in ("train", "val"):
            raise ValueError(f"--split must be train or val, got {self.split!r}")
        for name in ("epochs", "batch_size", "lr", "image_size", "knn_k", "knn_temperature"):
            _positive(name, getattr(self, name))
        for name in ("sgd_momentum", "weight_decay", "workers"):
            _positive(name, getattr(self, name), zero=True)
        _positive("max_images", self.max_images, allow_none=True)
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ValueError(f"--crop-min-scale must lie in (0, 1], got {self.crop_min_scale}")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ValueError(f"--lr-gamma must lie in (0, 1], got {self.lr_gamma}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}, "
                             f"got {self.mixed_precision!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lr_milestones"] = list(self.lr_milestones)
        return data


# The paper's linear protocol (Appendix, following MoCo) and a small-image setting for Fashion-MNIST.
# When --preset is not given and --dataset names one of these, that preset applies.
PROBE_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet-100": dict(dataset="imagenet-100", image_size=224, epochs=60, lr=10.0, batch_size=128,
                         lr_milestones=(30, 40, 50)),
    "imagenet-1k": dict(dataset="imagenet-1k", image_size=224, epochs=100, lr=30.0, batch_size=512,
                        lr_milestones=(60, 80)),
    # 28 px images probed at 32 px (eval: resize 37, centre crop 32), as the demo pretrains.
    # 28 px images: crops of 8% of the area are 8 px wide, far from what evaluation sees.
    "fashion-mnist": dict(dataset="fashion-mnist", image_size=32, epochs=20, lr=10.0, batch_size=256, crop_min_scale=0.5,
                          lr_milestones=(12, 16)),
}


def resolve_probe_config(*, preset: str | None = None, config_file: str | Path | None = None,
                         **options: Any) -> ProbeConfig:
    """As resolve_config; without --preset, a --dataset (option or config file) that names a preset selects it."""
    if preset is None:
        dataset = options.get("dataset")
        if dataset is None and config_file is not None:
            dataset = load_config_file(config_file).get("dataset")
        dataset = dataset if dataset is not None else ProbeConfig.dataset
        preset = dataset if dataset in PROBE_PRESETS else None
    return resolve_config(ProbeConfig, PROBE_PRESETS, preset=preset, config_file=config_file, **options)
