"""Typed configuration: the single source of truth for every command.

A config is resolved once, in this order: dataclass defaults <- preset <- config file <- explicit options,
then validated as a whole in `__post_init__`, so an error names the option and its allowed range.
The resolved config (`to_dict`) is saved with every run, checkpoint, export and model card.
This module is a leaf: it imports nothing of the package (whether a dataset or a model exists is checked by
mochi_hub.training.preflight), so every layer can read it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

# Choices are Literal types: the one place that lists them (the CLI shows them, __post_init__ checks them).
MixedPrecision = Literal["no", "bf16", "fp16"]
TrainPrecision = Literal["auto", "no", "bf16", "fp16"]  # auto: training.state.resolve_device_defaults
Init = Literal["moco", "timm"]  # mochi_hub.method.model.backbone_args says what each does
Reporter = Literal["auto", "none", "tensorboard", "wandb", "trackio"]
OnNonFinite = Literal["stop", "skip"]
AugmentOn = Literal["auto", "workers", "device"]
Protocol = Literal["linear", "knn", "fast"]
Split = Literal["val", "train"]


def parse_mochi(value: str | tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
    """'1024,1024,512' or (1024, 1024, 512) -> (N, s, s')."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("(", "").replace(")", "").split(",")]
    else:
        parts = list(value)
    try:
        n_hard, s, s_prime = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(
            f"--mochi takes three integers N,s,s' (e.g. 1024,1024,512; 0,0,0 for MoCo-v2), got {value!r}"
        ) from None
    return n_hard, s, s_prime


def check_mochi_settings(
    n_hard: int, s: int, s_prime: int, *, queue_size: int | None = None, beta_max: float = 0.5
) -> None:
    """Raise ValueError naming the setting when MoCHi (N, s, s') or beta_max cannot work."""
    for name, value in (("N (n_hard)", n_hard), ("s", s), ("s' (s_prime)", s_prime)):
        if value < 0:
            raise ValueError(f"MoCHi {name} must be >= 0, got {value}")
    if n_hard == 0 and (s > 0 or s_prime > 0):
        raise ValueError(
            f"MoCHi N (n_hard) = 0 leaves nothing to mix, but s={s}, s'={s_prime}; "
            "use N > 0, or (0, 0, 0) for plain MoCo-v2"
        )
    if queue_size is not None and n_hard > queue_size:
        raise ValueError(f"MoCHi N (n_hard) = {n_hard} exceeds the queue size K = {queue_size}")
    if not 0.0 < beta_max < 1.0:
        raise ValueError(f"MoCHi beta_max must lie in (0, 1), got {beta_max}")


def _check_choices(config: Any) -> None:
    """Every Literal-typed field holds one of its choices."""
    for name, hint in get_type_hints(type(config)).items():
        choices = get_args(hint) if get_origin(hint) is Literal else ()
        if choices and getattr(config, name) not in choices:
            raise ValueError(
                f"--{name.replace('_', '-')} must be one of {', '.join(map(str, choices))}, "
                f"got {getattr(config, name)!r}"
            )


def _check_numbers(config: Any) -> None:
    """Every int- or float-typed field (optional or not) holds a number. A numeric string becomes one: YAML 1.1
    (PyYAML, so config files and `--set`) reads `5e-4` as the string '5e-4'."""
    for name, hint in get_type_hints(type(config)).items():
        kinds = set(get_args(hint)) if get_origin(hint) in (Union, UnionType) else {hint}
        kind = int if int in kinds else float if float in kinds else None
        value = getattr(config, name)
        if kind is None or value is None:
            continue
        if isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool):
            continue
        try:
            number = float(value) if isinstance(value, (str, float)) else None
        except ValueError:
            number = None
        if number is None or (kind is int and not number.is_integer()):
            article = "an integer" if kind is int else "a number"
            raise ValueError(f"--{name.replace('_', '-')} must be {article}, got {value!r}")
        setattr(config, name, kind(number))


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
    mixing_warmup_epochs: int = 10  # MoCHi's warm-up: epochs of plain MoCo-v2 before mixing starts
    lr: float | None = None  # None: 0.03 x batch_size / 256
    temperature: float = 0.2
    key_momentum: float = 0.999
    seed: int = 0
    workers: int | None = None  # None: from the CPUs per local process on a GPU, else min(4, CPUs)
    output: str = "runs/mochi"
    max_steps: int | None = None  # stop early (smoke runs); still exports
    save_every_steps: int | None = None  # checkpoints also every N steps (always at each epoch end)
    resume: str | None = None  # a checkpoint folder, or "auto" for the newest in output
    mixed_precision: TrainPrecision = "auto"  # auto: bf16 on a GPU that has it (or accelerate launch's), else no
    preset: str | None = None
    # Not in the paper's options list but part of the recipe; each is still an option.
    init: Init = "moco"  # moco: MoCo's reference init (timm ResNets: zero_init_last=False); timm: timm's default
    bn_splits: int | None = None  # BatchNorm groups over the global batch, both encoders; None: groups of 32, at most 8
    lr_warmup_epochs: int = 0  # linear learning-rate warm-up before the cosine schedule (MoCo-v2: none)
    proj_dim: int = 128
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9
    beta_max: float = 0.5
    channels_last: bool | None = None  # None: on a GPU
    log_every_steps: int = 10
    keep_checkpoints: int = 2
    strict_data: bool = False
    max_train_images: int | None = None  # subset for smoke runs and the CPU study
    report_to: Reporter = (
        "auto"  # Accelerate trackers: auto (TensorBoard when installed), none, tensorboard, wandb, trackio
    )
    on_nonfinite: OnNonFinite = "stop"  # a NaN/Inf loss: stop (keeping the last good checkpoint) or skip the step
    augment_on: AugmentOn = "auto"  # MoCo-v2's views drawn by the loader workers (PIL) or batched on the device
    compile: bool = False  # torch.compile both encoders (in place: the state dict keeps its names)

    def __post_init__(self) -> None:
        _check_numbers(self)
        _check_choices(self)
        self.mochi = parse_mochi(self.mochi)
        n_hard, s, s_prime = self.mochi
        for name in (
            "image_size",
            "epochs",
            "batch_size",
            "queue_size",
            "temperature",
            "proj_dim",
            "log_every_steps",
            "keep_checkpoints",
        ):
            _positive(name, getattr(self, name))
        for name in ("mixing_warmup_epochs", "lr_warmup_epochs", "weight_decay", "sgd_momentum"):
            _positive(name, getattr(self, name), zero=True)
        _positive("workers", self.workers, allow_none=True, zero=True)
        for name in ("lr", "max_steps", "save_every_steps", "max_train_images", "bn_splits"):
            _positive(name, getattr(self, name), allow_none=True)
        if not 0.0 <= self.key_momentum < 1.0:
            raise ValueError(f"--key-momentum must lie in [0, 1), got {self.key_momentum}")
        if self.bn_splits is not None and (self.batch_size % self.bn_splits or self.batch_size // self.bn_splits < 2):
            raise ValueError(
                f"--bn-splits ({self.bn_splits}) must divide --batch-size ({self.batch_size}) into "
                "BatchNorm groups of at least 2 images"
            )
        if self.lr_warmup_epochs >= self.epochs:
            raise ValueError(f"--lr-warmup-epochs ({self.lr_warmup_epochs}) must be < --epochs ({self.epochs})")
        if self.queue_size < self.batch_size:
            raise ValueError(
                f"--queue-size (K = {self.queue_size}) must be at least the global --batch-size ({self.batch_size})"
            )
        try:
            check_mochi_settings(n_hard, s, s_prime, queue_size=self.queue_size, beta_max=self.beta_max)
        except ValueError as error:
            raise ValueError(f"--mochi: {error}") from None
        if s + s_prime > 0 and self.mixing_warmup_epochs >= self.epochs:
            raise ValueError(
                f"--mixing-warmup-epochs ({self.mixing_warmup_epochs}) must be < --epochs ({self.epochs}) "
                "or MoCHi never mixes; use --mochi 0,0,0 for plain MoCo-v2"
            )

    @property
    def base_lr(self) -> float:
        """The lr actually used: the paper's linear scaling unless given."""
        return self.lr if self.lr is not None else 0.03 * self.batch_size / 256

    @property
    def batchnorm_groups(self) -> int:
        """BatchNorm groups over the global batch: as given, else groups of 32 images as on each of the paper's
        8 GPUs (batch 256), at most 8."""
        return self.bn_splits if self.bn_splits is not None else min(8, max(1, self.batch_size // 32))

    @property
    def uses_mixing(self) -> bool:
        return self.mochi[1] + self.mochi[2] > 0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mochi"] = list(self.mochi)
        return data


# The paper's settings (Sec. 4 and Appendix) and a CPU-sized demo. Values are TrainConfig fields.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet-100": dict(
        dataset="imagenet-100",
        model="resnet50",
        image_size=224,
        epochs=200,
        batch_size=256,
        queue_size=16384,
        mochi=(1024, 1024, 512),
        mixing_warmup_epochs=10,
    ),
    "imagenet-1k": dict(
        dataset="imagenet-1k",
        model="resnet50",
        image_size=224,
        epochs=200,
        batch_size=256,
        queue_size=65536,
        mochi=(1024, 1024, 512),
        mixing_warmup_epochs=15,
    ),
    # The CPU recipe for small grayscale images that learns (docs/study: what was measured, and against what).
    "fashion-mnist": dict(
        dataset="fashion-mnist",
        model="resnet18",
        image_size=32,
        epochs=4,  # 1,872 steps: 9-27 minutes on the 2-core AVX-512 hosts measured, AVX2 hosts up to 47
        batch_size=128,
        queue_size=4096,
        mochi=(1024, 1024, 512),
        mixing_warmup_epochs=1,
        lr=0.015,
        bn_splits=8,
        key_momentum=0.99,
        workers=2,
        log_every_steps=20,
    ),
}


# A few minutes on a 2-core CPU: the fashion-mnist recipe over 512 steps (2 epochs of 32,768 images), enough for
# the backbone to pass its own untrained weights (make demo shows both).
TRAIN_PRESETS["demo"] = {
    **TRAIN_PRESETS["fashion-mnist"],
    "epochs": 2,
    "max_train_images": 32768,
    "log_every_steps": 16,
}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of config fields."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file: {path}")
    try:
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:  # json's and yaml's errors are ValueErrors or YAMLError
        raise ValueError(f"--config {path}: not readable ({str(error).splitlines()[0]})") from None
    except Exception as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"--config {path}: not valid YAML{where} ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of option names to values")
    return data


# Older names of fields, still accepted in config files, saved configs and on the command line.
TRAIN_ALIASES = {"warmup_epochs": "mixing_warmup_epochs"}
# What a config saved before a field existed meant by it (the behaviour of that older version).
TRAIN_LEGACY_DEFAULTS = {"init": "timm", "bn_splits": None, "augment_on": "workers"}


def _apply_aliases(values: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    out = dict(values)
    for old, new in aliases.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def resolve_config(
    cls: type,
    presets: dict[str, dict[str, Any]],
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    base: dict[str, Any] | None = None,
    **options: Any,
):
    """defaults <- preset <- base (what the SOURCE says) <- config file <- options (None: 'not given'),
    validated once."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"--preset must be one of {', '.join(presets)}, got {preset!r}")
        values.update(presets[preset])
        values["preset"] = preset
    values.update(base or {})
    if config_file is not None:
        values.update(load_config_file(config_file))
    values.update({k: v for k, v in options.items() if v is not None})
    values = _apply_aliases(values, TRAIN_ALIASES if cls is TrainConfig else {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    return cls(**values)


def resolve_train_config(**kwargs: Any) -> TrainConfig:
    """A new run's config from its values alone; whether its dataset and model exist here is
    mochi_hub.training.preflight's to check (the commands call it)."""
    return resolve_config(TrainConfig, TRAIN_PRESETS, **kwargs)


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a saved config (run.json, checkpoint), ignoring fields this version does not know; a field the
    saved version did not have takes the value that reproduces that version's behaviour."""
    data = _apply_aliases(data, TRAIN_ALIASES)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in data.items() if k in known}
    for name, legacy in TRAIN_LEGACY_DEFAULTS.items():
        if name not in values and legacy is not None:
            values[name] = legacy
    return TrainConfig(**values)


# Fields a resumed run may change: where and how it runs, not what it computes (`preset` is only a label).
RESUME_MAY_CHANGE = (
    "output",
    "resume",
    "workers",
    "max_steps",
    "save_every_steps",
    "keep_checkpoints",
    "log_every_steps",
    "report_to",
    "preset",
    "compile",
)


def resume_differences(saved: TrainConfig, now: TrainConfig) -> list[str]:
    """Every field outside RESUME_MAY_CHANGE that differs, as "name: checkpoint X, now Y"."""
    return [
        f"{f.name}: checkpoint {getattr(saved, f.name)!r}, now {getattr(now, f.name)!r}"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in RESUME_MAY_CHANGE and getattr(saved, f.name) != getattr(now, f.name)
    ]


# --- Evaluation: `mochi probe` --------------------------------------------------------------------------

PROBE_PROTOCOLS = get_args(Protocol)


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

    dataset: str | None = None  # Hub dataset id, local imagefolder (train/ + val/), a named source; None: the SOURCE's
    protocol: Protocol = "linear"  # linear (the paper's), knn, or fast (cached features; not the paper's)
    split: Split = "val"  # the split reported; the classifier / kNN memory is always fitted on train
    epochs: int = 60
    batch_size: int = 128  # global batch, split over processes
    lr: float = 10.0
    lr_milestones: tuple[int, ...] = (30, 40, 50)  # epochs at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    sgd_momentum: float = 0.9
    weight_decay: float = 0.0
    augment: bool = True  # RandomResizedCrop + flip for training (off: the evaluation transform)
    crop_min_scale: float = 0.08  # RandomResizedCrop's smallest area share (torchvision's and MoCo's 0.08)
    image_size: int | None = None  # crop size (eval: resize 256/224 of it, centre crop); None: the SOURCE's input size
    knn_k: int = 200
    knn_temperature: float = 0.07
    seed: int = 0
    workers: int = 4
    output: str | None = None  # a JSON file of the results
    resume: bool = False  # continue the classifier from its last per-epoch state
    cache_dir: str | None = None  # feature cache (fast, knn); None: $MOCHI_HUB_CACHE or ~/.cache/mochi-hub
    max_images: int | None = None  # a seeded subset of each split (smoke runs)
    mixed_precision: MixedPrecision = "no"  # autocast of the backbone's forward: no, bf16, fp16
    strict_data: bool = False
    preset: str | None = None

    def __post_init__(self) -> None:
        self.lr_milestones = parse_milestones(self.lr_milestones)
        _check_numbers(self)
        _check_choices(self)
        for name in ("epochs", "batch_size", "lr", "knn_k", "knn_temperature"):
            _positive(name, getattr(self, name))
        _positive("image_size", self.image_size, allow_none=True)
        for name in ("sgd_momentum", "weight_decay", "workers"):
            _positive(name, getattr(self, name), zero=True)
        _positive("max_images", self.max_images, allow_none=True)
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ValueError(f"--crop-min-scale must lie in (0, 1], got {self.crop_min_scale}")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ValueError(f"--lr-gamma must lie in (0, 1], got {self.lr_gamma}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lr_milestones"] = list(self.lr_milestones)
        return data


PAPER_PROTOCOL_DATASETS = ("imagenet-100", "imagenet-1k")  # presets that are the paper's linear protocol
# The paper's linear protocol (Appendix, following MoCo) and a small-image setting for Fashion-MNIST.
# When --preset is not given and --dataset names one of these, that preset applies.
PROBE_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet-100": dict(
        dataset="imagenet-100", image_size=224, epochs=60, lr=10.0, batch_size=128, lr_milestones=(30, 40, 50)
    ),
    "imagenet-1k": dict(
        dataset="imagenet-1k", image_size=224, epochs=100, lr=30.0, batch_size=512, lr_milestones=(60, 80)
    ),
    # 28 px images probed at 32 px (eval: resize 37, centre crop 32), as the demo pretrains.
    # 28 px images: crops of 8% of the area are 8 px wide, far from what evaluation sees.
    "fashion-mnist": dict(
        dataset="fashion-mnist",
        image_size=32,
        epochs=20,
        lr=10.0,
        batch_size=256,
        crop_min_scale=0.5,
        lr_milestones=(12, 16),
    ),
}


def resolve_probe_config(
    *,
    trained_on: dict[str, Any] | None = None,
    preset: str | None = None,
    config_file: str | Path | None = None,
    **options: Any,
) -> ProbeConfig:
    """As resolve_config, with what the SOURCE was trained on as the base (`trained_on`: its dataset and input
    size, from mochi_hub.publish.sources.source_defaults) where not given. Without --preset, the dataset (given or the
    SOURCE's) selects the preset of the same name."""
    given = {
        **(load_config_file(config_file) if config_file is not None else {}),
        **{k: v for k, v in options.items() if v is not None},
    }
    base = {k: v for k, v in (trained_on or {}).items() if k not in given}
    dataset = given.get("dataset", base.get("dataset"))
    if preset is None and dataset in PROBE_PRESETS:
        preset = dataset
    return resolve_config(ProbeConfig, PROBE_PRESETS, preset=preset, config_file=config_file, base=base, **options)


def complete_probe_config(config: ProbeConfig, trained_on: dict[str, Any], source: str) -> ProbeConfig:
    """Fill the fields left to the SOURCE (dataset, image size) from `trained_on`; raise, naming the option, when
    neither the caller nor the SOURCE says."""
    values = {k: v for k, v in trained_on.items() if k in ("dataset", "image_size") and getattr(config, k) is None}
    config = dataclasses.replace(config, **values)
    if config.dataset is None:
        raise ValueError(
            f"--dataset: SOURCE {source} does not record a dataset it was trained on that can be read here; "
            "pass --dataset"
        )
    if config.image_size is None:
        raise ValueError(f"--image-size: SOURCE {source} records no input size; pass --image-size")
    return config


# --- Downstream detection: `mochi detect` (DetectConfig; mochi_hub.evaluate.detect) --------------------------------

BatchNormMode = Literal["frozen", "train", "sync"]


@dataclass
class DetectConfig:
    """Fine-tuning torchvision's Faster R-CNN + FPN on a timm backbone (mochi_hub.evaluate.detect). Field names are the
    CLI option names; SOURCE is not a field. Defaults are torchvision's COCO reference schedule at 1x
    (12 epochs, lr 0.02 for 16 images, x0.1 at epochs 8 and 11, 1000 warm-up iterations, 800 px)."""

    data: str | None = None  # a folder in the COCO layout (annotations/instances_{train,val}.json, train/, val/)
    epochs: int = 12
    batch_size: int = 16  # global batch, split over processes
    lr: float | None = None  # None: 0.02 x batch_size / 16 (torchvision's reference, linearly scaled)
    lr_milestones: tuple[int, ...] = (8, 11)  # epochs at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    warmup_iters: int = 1000  # linear lr warm-up from 0.1 % over the first iterations (capped at one epoch)
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4
    image_size: int = 800  # shorter image side (torchvision's min_size); the longer side at most 1333/800 of it
    batch_norm: BatchNormMode = "frozen"  # the trained stages' BatchNorm: frozen, train (per process) or sync
    trainable_layers: int = 3  # how many of the backbone's last stages train (torchvision's default 3)
    fpn_channels: int = 256  # the FPN's out_channels
    hflip: bool = True  # random horizontal flips of the training images (p 0.5)
    max_images: int | None = None  # a seeded subset of each split (smoke runs)
    seed: int = 0
    workers: int = 4
    output: str = "runs/detect"  # a folder: results.json, detector.safetensors, the per-epoch state
    resume: bool = False  # continue from the last per-epoch state in --output
    mixed_precision: MixedPrecision = "no"
    preset: str | None = None

    def __post_init__(self) -> None:
        self.lr_milestones = parse_milestones(self.lr_milestones)
        _check_numbers(self)
        _check_choices(self)
        for name in ("epochs", "batch_size", "image_size", "fpn_channels"):
            _positive(name, getattr(self, name))
        for name in ("warmup_iters", "sgd_momentum", "weight_decay", "trainable_layers", "workers", "seed"):
            _positive(name, getattr(self, name), zero=True)
        for name in ("lr", "max_images"):
            _positive(name, getattr(self, name), allow_none=True)
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ValueError(f"--lr-gamma must lie in (0, 1], got {self.lr_gamma}")
        if self.image_size < 32:
            raise ValueError(
                f"--image-size must be at least 32 (the FPN's coarsest map has stride 32), got {self.image_size}"
            )

    @property
    def base_lr(self) -> float:
        """The lr actually used: torchvision's 0.02 for 16 images, scaled linearly, unless given."""
        return self.lr if self.lr is not None else 0.02 * self.batch_size / 16

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lr_milestones"] = list(self.lr_milestones)
        return data


DETECT_PRESETS: dict[str, dict[str, Any]] = {
    # torchvision's references/detection recipe for COCO (fasterrcnn_resnet50_fpn), 1x: the defaults.
    "coco-1x": dict(epochs=12, batch_size=16, lr_milestones=(8, 11), warmup_iters=1000, image_size=800),
    # The Fashion-MNIST canvases of bench/detection.py (128 px, up to 3 items). Every stage and its BatchNorm
    # train, as in MoCo's detection transfer: frozen statistics of an untrained baseline would normalise nothing.
    "canvas": dict(
        epochs=12,
        batch_size=8,
        lr=0.02,
        lr_milestones=(9, 11),
        warmup_iters=50,
        image_size=128,
        trainable_layers=5,
        batch_norm="train",
    ),
}


def resolve_detect_config(
    *, preset: str | None = None, config_file: str | Path | None = None, **options: Any
) -> DetectConfig:
    """defaults <- preset <- config file <- options, validated; --data must be given and be a folder."""
    config = resolve_config(DetectConfig, DETECT_PRESETS, preset=preset, config_file=config_file, **options)
    if config.data is None:
        raise ValueError(
            "--data DIR is required: a folder in the COCO layout (annotations/instances_train.json, "
            "annotations/instances_val.json, images under train/ and val/)"
        )
    return config
