"""Typed configuration: the single source of truth for every command.

Each option is declared once, as a field made by `option(...)`: its default, help text, allowed range, what a resumed
job may change, the value older saved configs meant, its old names and its row on the model card. Everything else
reads that declaration: `__post_init__`'s checks, the CLI's options and help (mochi_hub.cli.options), the resume
check (`resume_differences`), the names of results and the model card.

A config is resolved once, in this order: dataclass defaults <- preset <- config file <- explicit options,
then validated as a whole in `__post_init__`, so an error names the option and its allowed range.
The resolved config (`to_dict`) is saved with every run, checkpoint, export and model card.
This module is a leaf: it imports nothing of the package but its errors (whether a dataset or a model exists is checked
by mochi_hub.training.preflight), so every layer can read it. A bad value raises `OptionError` naming the option.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from mochi_hub.errors import OptionError

# Choices are Literal types: the one place that lists them (the CLI shows them, __post_init__ checks them).
MixedPrecision = Literal["no", "bf16", "fp16"]
TrainPrecision = Literal["auto", "no", "bf16", "fp16"]  # auto: training.state.resolve_device_defaults
Init = Literal["moco", "timm"]  # mochi_hub.method.model.backbone_args says what each does
Reporter = Literal["auto", "none", "tensorboard", "wandb", "trackio"]
OnNonFinite = Literal["stop", "skip"]
AugmentOn = Literal["auto", "workers", "device"]
Protocol = Literal["linear", "knn", "fast"]
Split = Literal["val", "train"]
BatchNormMode = Literal["auto", "frozen", "train", "sync"]

# What a field changes, which decides what a resumed job may change and what a result's name covers.
RUNS = "runs"  # where and how the work runs (output, workers): free on resume, not in a result's name
REPORTS = "reports"  # what is measured of the trained state (the split): free on resume, in a result's name
COMPUTES = "computes"  # the trained state itself: must match on resume, in a result's name
_NO_LEGACY = object()


@dataclass(frozen=True)
class Range:
    """An allowed range in interval notation: "(0, inf)" is > 0, "[0, 1)" is 0 <= x < 1."""

    text: str

    @property
    def bounds(self) -> tuple[float, float]:
        low, high = self.text[1:-1].split(",")
        return float(low), float(high)

    def __contains__(self, value: float) -> bool:
        low, high = self.bounds
        above = value >= low if self.text[0] == "[" else value > low
        below = value <= high if self.text[-1] == "]" else value < high
        return above and below

    def __str__(self) -> str:
        low, high = self.bounds
        if math.isinf(high):
            return f"{'>=' if self.text[0] == '[' else '>'} {low:g}"
        return f"in {self.text}"


def option(
    default: Any,
    help: str,
    *,
    within: str | None = None,
    affects: str = COMPUTES,
    legacy: Any = _NO_LEGACY,
    default_text: str | None = None,
    aliases: tuple[str, ...] = (),
    card: str | None = None,
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A config field and everything said about it, in one place.

    help: the option's help text (the CLI adds "[default: ...]" and the presets' values); within: the allowed range
    of a number, in interval notation ("(0, inf)", "[0, 1)"; NaN and infinities are always refused); affects: RUNS,
    REPORTS or COMPUTES (what a resumed job may change); legacy: what a saved config or result without this field
    meant (the behaviour of the version before it existed; a result's name leaves the field out at that value);
    default_text: the default in words (a None default that means
    something); aliases: older names, still accepted; card: the model card's row for it; parse: text -> value.
    """
    metadata = dict(
        help=help,
        within=Range(within) if within else None,
        affects=affects,
        legacy=legacy,
        default_text=default_text,
        aliases=aliases,
        card=card,
        parse=parse,
    )
    return dataclasses.field(default=default, metadata=metadata)


def _number_kind(hint: Any) -> type | None:
    """int or float for a field of that type (optional or not), else None."""
    kinds = set(get_args(hint)) if get_origin(hint) in (Union, UnionType) else {hint}
    return int if int in kinds else float if float in kinds else None


def config_class(cls: type) -> type:
    """@dataclass, and refuse at import time a field not made by `option` or a number without a range, so a new
    field cannot miss its help text or its range check."""
    cls = dataclass(cls)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with option(default, help, ...)")
        if _number_kind(hints[f.name]) and f.metadata["within"] is None:
            raise TypeError(f"{cls.__name__}.{f.name}: a number needs its range (within=...)")
    return cls


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _number(name: str, value: Any, kind: type, within: Range) -> int | float:
    """A finite number of `kind` within its range, or an OptionError stating both (NaN and infinities are never in a
    range). A numeric string becomes a number: YAML 1.1 (PyYAML, so config files) reads `5e-4` as the string '5e-4'."""
    if isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool):
        number = value
    else:
        try:
            number = float(value) if isinstance(value, (str, float)) else None
        except ValueError:
            number = None
    if (
        number is None
        or (isinstance(number, float) and not (math.isfinite(number) and (kind is float or number.is_integer())))
        or number not in within
    ):
        raise OptionError(
            f"{_flag(name)} must be {'an integer' if kind is int else 'a number'} {within}, got {value!r}"
        )
    return kind(number)


def check_fields(config: Any) -> None:
    """Each field as its declaration says: parsed, a number of its type within its range, one of its choices."""
    for f in dataclasses.fields(config):
        hint, value = get_type_hints(type(config))[f.name], getattr(config, f.name)
        if f.metadata["parse"] is not None:
            value = f.metadata["parse"](value)
        kind = _number_kind(hint)
        if kind is not None and value is not None:
            value = _number(f.name, value, kind, f.metadata["within"])
        choices = get_args(hint) if get_origin(hint) is Literal else ()
        if choices and value not in choices:
            raise OptionError(f"{_flag(f.name)} must be one of {', '.join(map(str, choices))}, got {value!r}")
        setattr(config, f.name, value)


class _Config:
    """What every config class shares: checks from the declarations, then its own checks across fields."""

    def __post_init__(self) -> None:
        check_fields(self)
        self.check_together()

    def check_together(self) -> None:
        """Checks that involve more than one field (each field alone is checked from its declaration)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def resume_settings(config: _Config) -> dict[str, Any]:
    """What a resumed job must share with the state it continues: every field that affects what it computes."""
    fields = {f.name for f in dataclasses.fields(config) if f.metadata["affects"] == COMPUTES}
    return {k: v for k, v in config.to_dict().items() if k in fields}


def result_settings(config: _Config) -> dict[str, Any]:
    """Every setting that moves a result's number (a result's name carries their digest). A field at its `legacy`
    value is left out: the results of the version before it existed keep their names."""
    fields = {
        f.name
        for f in dataclasses.fields(config)
        if f.metadata["affects"] != RUNS and getattr(config, f.name) != f.metadata["legacy"]
    }
    return {k: v for k, v in config.to_dict().items() if k in fields}


def resume_differences(saved: _Config | Mapping[str, Any], now: _Config | Mapping[str, Any]) -> list[str]:
    """The one resume check of train, probe and detect: every setting of `now` that `saved` holds otherwise, as
    "name: saved X, now Y". Configs compare by `resume_settings`; a job adds what else it keeps (weights, data) as a
    mapping of the same shape."""
    saved, now = (resume_settings(c) if isinstance(c, _Config) else c for c in (saved, now))
    return [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v]


def parse_mochi(value: str | tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
    """'1024,1024,512' or (1024, 1024, 512) -> (N, s, s')."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("(", "").replace(")", "").split(",")]
    else:
        parts = list(value)
    try:
        n_hard, s, s_prime = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise OptionError(
            f"--mochi takes three integers N,s,s' (e.g. 1024,1024,512; 0,0,0 for MoCo-v2), got {value!r}"
        ) from None
    return n_hard, s, s_prime


def check_mochi_settings(
    n_hard: int, s: int, s_prime: int, *, queue_size: int | None = None, beta_max: float = 0.5
) -> None:
    """Raise OptionError naming the setting when MoCHi (N, s, s') or beta_max cannot work."""
    for name, value in (("N (n_hard)", n_hard), ("s", s), ("s' (s_prime)", s_prime)):
        if value < 0:
            raise OptionError(f"MoCHi {name} must be >= 0, got {value}")
    if n_hard == 0 and (s > 0 or s_prime > 0):
        raise OptionError(
            f"MoCHi N (n_hard) = 0 leaves nothing to mix, but s={s}, s'={s_prime}; "
            "use N > 0, or (0, 0, 0) for plain MoCo-v2"
        )
    if queue_size is not None and n_hard > queue_size:
        raise OptionError(f"MoCHi N (n_hard) = {n_hard} exceeds the queue size K = {queue_size}")
    if not 0.0 < beta_max < 1.0:
        raise OptionError(f"MoCHi beta_max must lie in (0, 1), got {beta_max}")


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
        raise OptionError(f"--lr-milestones takes epochs separated by commas (e.g. 30,40,50), got {value!r}") from None
    if any(m <= 0 for m in milestones) or list(milestones) != sorted(set(milestones)):
        raise OptionError(f"--lr-milestones must be increasing positive epochs, got {value!r}")
    return milestones


# --- Pretraining: `mochi train` ------------------------------------------------------------------------------


@config_class
class TrainConfig(_Config):
    """MoCo-v2 + MoCHi pretraining. Field names are the CLI option names (`--queue-size` is queue_size)."""

    dataset: str = option(
        "fashion-mnist",
        "Hub dataset id (org/name), local imagefolder (train/ [val/]), local shards (data/<split>-*.parquet), or "
        "imagenet-100 | imagenet-1k | fashion-mnist.",
        default_text="none: `mochi train` needs --dataset, --preset or --config",
    )
    data_root: str | None = option(
        None,
        "Where a named --dataset lives: imagenet-100 as a view of an ImageNet-1K folder (train/<synset>/, "
        "val/<synset>/) or of its shards (data/train-NNNNN-of-MMMMM.parquet), in CMC's class order; imagenet-1k "
        "from such a folder.",
        affects=RUNS,
        default_text="the Hub copy",
    )
    streaming: bool = option(
        False,
        "Read Parquet shards (a Hub id or a folder data/<split>-*.parquet) as a stream, each process its own shards, "
        "without converting or downloading them first; a resume skips the rows already read (exact with the same "
        "processes and workers).",
        legacy=False,
    )
    model: str = option("resnet50", "timm architecture of the backbone (created with num_classes=0).")
    image_size: int = option(224, "Crop size of the augmented views, in pixels.", within="(0, inf)", card="Image size")
    epochs: int = option(200, "Training epochs.", within="(0, inf)", card="Epochs")
    batch_size: int = option(
        256, "Global batch size, split evenly over processes.", within="(0, inf)", card="Global batch size"
    )
    queue_size: int = option(
        16384, "K, the number of negatives in the queue.", within="(0, inf)", card="Queue size (K)"
    )
    mochi: tuple[int, int, int] = option(
        (1024, 1024, 512),
        "MoCHi N,s,s' (hardest negatives, pair mixes, query mixes); 0,0,0 is plain MoCo-v2.",
        card="MoCHi (N, s, s')",
        parse=parse_mochi,
    )
    mixing_warmup_epochs: int = option(
        10,
        "MoCHi's warm-up: epochs of plain MoCo-v2 before mixing starts (not a learning-rate "
        "warm-up; see --lr-warmup-epochs).",
        within="[0, inf)",
        aliases=("warmup_epochs",),
        card="Mixing warm-up (epochs without mixing)",
    )
    lr: float | None = option(
        None,
        "Base learning rate.",
        within="(0, inf)",
        default_text="0.03 x batch-size / 256",
        card="Base learning rate (SGD)",
    )
    temperature: float = option(0.2, "Softmax temperature tau.", within="(0, inf)", card="Temperature (tau)")
    key_momentum: float = option(
        0.999, "Momentum m of the key encoder update.", within="[0, 1)", card="Key-encoder momentum"
    )
    seed: int = option(
        0, "Seed of every random draw (data order, augmentation, plans).", within="[0, inf)", card="Seed"
    )
    workers: int | None = option(
        None,
        "Data-loading worker processes per training process.",
        within="[0, inf)",
        affects=RUNS,
        default_text="on a GPU, the CPUs each local process gets minus one (at most 16); on a CPU, up to 4",
    )
    output: str = option("runs/mochi", "Run directory: run.json, metrics.jsonl, checkpoints/, export/.", affects=RUNS)
    max_steps: int | None = option(
        None,
        "Stop after this many steps (smoke runs); still checkpoints and exports.",
        within="(0, inf)",
        affects=RUNS,
        card="Stopped after (steps)",
    )
    save_every_steps: int | None = option(
        None, "Also checkpoint every N steps (always at each epoch end).", within="(0, inf)", affects=RUNS
    )
    resume: str | None = option(
        None, "Continue from a checkpoint folder, or 'auto' for the newest complete one in --output.", affects=RUNS
    )
    mixed_precision: TrainPrecision = option(
        "auto",
        "Autocast (logits, loss and queue stay in fp32). auto: what accelerate launch --mixed_precision asked for, "
        "else bf16 on a GPU that has it, else no.",
        card="Mixed precision",
    )
    preset: str | None = option(None, "Start from a preset.", affects=RUNS)
    # Not in the paper's options list but part of the recipe; each is still an option.
    init: Init = option(
        "moco",
        "Initial weights: moco (MoCo's reference init: timm ResNets with zero_init_last=False) | timm "
        "(timm's default, zero-initialised last BatchNorm of each residual block).",
        legacy="timm",
        card="Initialisation",
    )
    bn_splits: int | None = option(
        None,
        "BatchNorm groups over the global batch, in both encoders (the paper's 8 GPUs; the key "
        "encoder's groups come from the shuffled batch).",
        within="(0, inf)",
        default_text="groups of 32 images, at most 8",
        card="BatchNorm groups (global batch)",
    )
    lr_warmup_epochs: int = option(
        0,
        "Linear learning-rate warm-up epochs before the cosine schedule (MoCo-v2: none).",
        within="[0, inf)",
        card="Learning-rate warm-up (epochs)",
    )
    proj_dim: int = option(
        128, "Output width of the MLP projection head.", within="(0, inf)", card="Projection head output dim"
    )
    weight_decay: float = option(1e-4, "SGD weight decay.", within="[0, inf)", card="Weight decay")
    sgd_momentum: float = option(0.9, "SGD momentum.", within="[0, 1)", card="SGD momentum")
    beta_max: float = option(
        0.5,
        "Upper bound of the query's weight beta in query mixes.",
        within="(0, 1)",
        card="Max share of the query in s' mixes (beta max)",
    )
    channels_last: bool | None = option(
        None, "Use channels_last memory format (faster on tensor cores and CPUs).", default_text="on a GPU"
    )
    log_every_steps: int = option(10, "Write a metrics.jsonl line every N steps.", within="(0, inf)", affects=RUNS)
    keep_checkpoints: int = option(2, "Number of newest checkpoints kept.", within="(0, inf)", affects=RUNS)
    strict_data: bool = option(False, "Stop at the first unusable image instead of reporting and skipping it.")
    max_train_images: int | None = option(
        None,
        "Use only the first N training images, in the source's order (smoke runs, CPU studies); a warning says "
        "when they leave out classes.",
        within="(0, inf)",
        default_text="every image",
        card="Training images used (subset)",
    )
    report_to: Reporter = option("auto", "Accelerate trackers (auto: TensorBoard when installed).", affects=RUNS)
    on_nonfinite: OnNonFinite = option(
        "stop", "On a NaN/Inf loss: stop (keeping the last good checkpoint) or skip the step."
    )
    augment_on: AugmentOn = option(
        "auto",
        "Where MoCo-v2's views are drawn: workers (PIL, per image) | device (batched on the training device, "
        "per-image parameters; workers only decode) | auto (device on a GPU).",
        legacy="workers",
    )
    compile: bool = option(
        False,
        "torch.compile both encoders (the key encoder too; off by default until measured on your GPU).",
        affects=RUNS,
    )
    knn_monitor_every: int | None = option(
        None,
        "kNN monitor: every N steps, the kNN top-1 of the backbone being trained (and once of the untrained one) on "
        "a seeded subset of the dataset (bank: train split, queries: val split); 0 turns it off. A monitor in "
        "metrics.jsonl, the progress line, the curves and the card, not a probe result.",
        within="[0, inf)",
        affects=RUNS,
        legacy=0,
        default_text="8 points over the run when the dataset has a labelled val split, else off",
    )
    knn_monitor_images: int = option(
        2000,
        "Images of each split the kNN monitor uses (as `mochi probe --max-images`).",
        within="(0, inf)",
        affects=RUNS,
    )
    fit_to_data: bool = option(
        True,
        "With a preset measured on a dataset of another size: the queue keeps the share of the training images "
        "the preset was measured with, and the run the preset's number of steps (as epochs of this dataset, the "
        "mixing warm-up keeping its share); values that differ from the preset's are kept. The start says what "
        "changed. --no-fit-to-data keeps the preset's values as they are.",
        affects=RUNS,
        legacy=False,
    )

    def check_together(self) -> None:
        if self.lr is None:  # resolved here, so run.json, checkpoints and --print-config hold the lr that runs
            self.lr = self.base_lr
        n_hard, s, s_prime = self.mochi
        if self.bn_splits is not None and (self.batch_size % self.bn_splits or self.batch_size // self.bn_splits < 2):
            raise OptionError(
                f"--bn-splits ({self.bn_splits}) must divide --batch-size ({self.batch_size}) into "
                "BatchNorm groups of at least 2 images"
            )
        if self.lr_warmup_epochs >= self.epochs:
            raise OptionError(f"--lr-warmup-epochs ({self.lr_warmup_epochs}) must be < --epochs ({self.epochs})")
        if self.queue_size < self.batch_size:
            raise OptionError(
                f"--queue-size (K = {self.queue_size}) must be at least the global --batch-size ({self.batch_size})"
            )
        try:
            check_mochi_settings(n_hard, s, s_prime, queue_size=self.queue_size, beta_max=self.beta_max)
        except ValueError as error:
            raise OptionError(f"--mochi: {error}") from None
        if s + s_prime > 0 and self.mixing_warmup_epochs >= self.epochs:
            raise OptionError(
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


# The paper's settings (Sec. 4 and Appendix) and a CPU-sized demo. Values are TrainConfig fields.
_IMAGENET_100 = dict(
    dataset="imagenet-100",
    model="resnet50",
    image_size=224,
    epochs=200,
    batch_size=256,
    queue_size=16384,
    mochi=(1024, 1024, 512),
    mixing_warmup_epochs=10,
)
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet-100": _IMAGENET_100,
    # ImageNet-1K: the ImageNet-100 setting with the paper's larger queue and longer warm-up.
    "imagenet-1k": {**_IMAGENET_100, "dataset": "imagenet-1k", "queue_size": 65536, "mixing_warmup_epochs": 15},
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


@dataclass(frozen=True)
class MeasuredOn:
    """What a preset's settings were measured on, so that a run on other data can be fitted to it, and told."""

    images: int  # training images
    learned_by_step: int | None = None  # the kNN of the trained backbone first beat the untrained one by then


PRESETS_MEASURED_ON = {
    "imagenet-100": MeasuredOn(126_689),  # the paper's ImageNet-100 (CMC's 100 classes)
    "imagenet-1k": MeasuredOn(1_281_167),
    "fashion-mnist": MeasuredOn(60_000, learned_by_step=702),  # docs/study: crossed between steps 468 and 702
    "demo": MeasuredOn(32_768, learned_by_step=512),  # make demo: trained above untrained after its 512 steps
}


def fit_to_data(config: TrainConfig, images: int) -> tuple[TrainConfig, list[str]]:
    """The config fitted to a dataset of `images` training images (see --fit-to-data), and one line per change or
    concern. Fields whose values differ from the preset's (given explicitly) are kept. Also says, for any run, when
    the queue holds every image's own earlier key, and when a preset's run is shorter than where it learned."""
    measured = PRESETS_MEASURED_ON.get(config.preset or "")
    notes: list[str] = []
    if measured is not None and config.fit_to_data and images != measured.images:
        preset = TrainConfig(**{k: v for k, v in TRAIN_PRESETS[config.preset].items() if k != "dataset"})
        changes: dict[str, Any] = {}
        share = images / measured.images
        queue = max(config.batch_size, int(preset.queue_size * share))
        if config.queue_size == preset.queue_size and queue < config.queue_size:
            changes["queue_size"] = queue
            notes.append(
                f"queue K {queue} (the preset's {preset.queue_size} of {measured.images:,} images, as a share of "
                f"these {images:,})"
            )
            n_hard, s, s_prime = config.mochi
            if n_hard == preset.mochi[0] and n_hard:  # the hardest N keep their share of the queue
                changes["mochi"] = (max(1, n_hard * queue // preset.queue_size), s, s_prime)
                notes.append(f"MoCHi N {changes['mochi'][0]} (the preset's {n_hard} of K {preset.queue_size})")
        if config.epochs == preset.epochs and config.batch_size == preset.batch_size:
            steps = preset.epochs * (measured.images // preset.batch_size)  # what the preset was measured over
            epochs = max(1, round(steps / max(1, images // config.batch_size)))
            if epochs != config.epochs:
                changes["epochs"] = epochs
                notes.append(f"{epochs} epoch(s) (about the preset's {steps:,} steps on these {images:,} images)")
                if config.mixing_warmup_epochs == preset.mixing_warmup_epochs and preset.mixing_warmup_epochs:
                    warmup = min(epochs - 1, round(preset.mixing_warmup_epochs * epochs / preset.epochs))
                    changes["mixing_warmup_epochs"] = warmup
                    notes.append(f"mixing from epoch {warmup + 1} (the preset's share of the run without mixing)")
        config = dataclasses.replace(config, **changes)
    if config.queue_size >= images:
        notes.append(
            f"the queue (K {config.queue_size}) holds at least all {images:,} training images: each image's own key "
            "from an earlier epoch is among its negatives; a queue that is a small share of the data learns better"
        )
    steps = config.epochs * (images // config.batch_size)
    if measured is not None and measured.learned_by_step and steps < measured.learned_by_step:
        notes.append(
            f"{steps} steps: fewer than the {measured.learned_by_step} after which the {config.preset} preset was "
            "measured to beat its untrained weights; the kNN monitor will show whether this run does"
        )
    return config, notes


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of config fields."""
    path = Path(path)
    if not path.is_file():
        raise OptionError(f"--config: no such file: {path}")
    try:
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:  # json's and yaml's errors are ValueErrors or YAMLError
        raise OptionError(f"--config {path}: not readable ({str(error).splitlines()[0]})") from None
    except Exception as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise OptionError(f"--config {path}: not valid YAML{where} ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise OptionError(f"--config: {path} must hold a mapping of option names to values")
    return data


def _apply_aliases(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Older names of fields (their `aliases`), still accepted in config files, saved configs and options."""
    out = dict(values)
    for f in dataclasses.fields(cls):
        for old in f.metadata["aliases"]:
            if old in out:
                out.setdefault(f.name, out.pop(old))
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
            raise OptionError(f"--preset must be one of {', '.join(presets)}, got {preset!r}")
        values.update(presets[preset])
        values["preset"] = preset
    values.update(base or {})
    if config_file is not None:
        values.update(load_config_file(config_file))
    values.update({k: v for k, v in options.items() if v is not None})
    values = _apply_aliases(cls, values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionError(f"unknown config field(s): {', '.join(unknown)}")
    return cls(**values)


def resolve_train_config(**kwargs: Any) -> TrainConfig:
    """A new run's config from its values alone; whether its dataset and model exist here is
    mochi_hub.training.preflight's to check (the commands call it)."""
    return resolve_config(TrainConfig, TRAIN_PRESETS, **kwargs)


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a saved config (run.json, checkpoint), ignoring fields this version does not know; a field the
    saved version did not have takes its `legacy` value, which reproduces that version's behaviour."""
    data = _apply_aliases(TrainConfig, data)
    values = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in data:
            values[f.name] = data[f.name]
        elif f.metadata["legacy"] is not _NO_LEGACY:
            values[f.name] = f.metadata["legacy"]
    return TrainConfig(**values)


# --- Evaluation: `mochi probe` --------------------------------------------------------------------------

PROBE_PROTOCOLS = get_args(Protocol)


@config_class
class ProbeConfig(_Config):
    """Evaluation of a frozen backbone. Field names are the CLI option names; SOURCE is not a field
    (it is what is evaluated, not how). Defaults are the paper's ImageNet-100 linear protocol."""

    dataset: str | None = option(
        None,
        "Hub dataset id (org/name), local imagefolder (train/ + val/), or imagenet-100 | imagenet-1k | "
        "fashion-mnist (each also selects its preset). A local folder of ImageNet-100 synsets takes "
        "CMC's class order.",
        default_text="the dataset SOURCE was trained on",
    )
    data_root: str | None = option(
        None,
        "Where a named --dataset lives: imagenet-100 as a view of an ImageNet-1K folder (train/<synset>/, "
        "val/<synset>/) or of its shards (data/<split>-NNNNN-of-MMMMM.parquet), in CMC's class order.",
        affects=RUNS,
        default_text="the Hub copy",
    )
    protocol: Protocol = option(
        "linear",
        "linear (the paper's: frozen backbone, augmented images every epoch) | knn (weighted kNN) | "
        "fast (linear classifier on cached, un-augmented features; not the paper's).",
    )
    split: Split = option(
        "val",
        "Split reported: val (Hub: validation) or train; the classifier is always fitted on train.",
        affects=REPORTS,
    )
    epochs: int = option(60, "Classifier epochs (linear, fast).", within="(0, inf)")
    batch_size: int = option(128, "Global batch size, split evenly over processes.", within="(0, inf)")
    lr: float = option(10.0, "Initial learning rate.", within="(0, inf)")
    lr_milestones: tuple[int, ...] = option(
        (30, 40, 50), "Epochs at which lr is multiplied by --lr-gamma, e.g. 30,40,50.", parse=parse_milestones
    )
    lr_gamma: float = option(0.1, "Factor applied to lr at each milestone.", within="(0, 1]")
    sgd_momentum: float = option(0.9, "SGD momentum.", within="[0, 1)")
    weight_decay: float = option(0.0, "SGD weight decay.", within="[0, inf)")
    augment: bool = option(
        True, "Train the linear protocol on RandomResizedCrop + flip (--no-augment: the evaluation crop)."
    )
    crop_min_scale: float = option(
        0.08,
        "Smallest area share of the training crops (RandomResizedCrop; torchvision's and MoCo's 0.08).",
        within="(0, 1]",
    )
    image_size: int | None = option(
        None,
        "Crop size in pixels; evaluation resizes to image-size / --crop-pct and centre-crops.",
        within="(0, inf)",
        default_text="SOURCE's input size (pretrained_cfg), else the preset's",
    )
    crop_pct: float = option(
        224 / 256,
        "Evaluation crop as timm's crop_pct: resize to image-size / crop-pct, then centre-crop image-size "
        "(1: the whole image, e.g. for small images already framed).",
        within="(0, 1]",
        legacy=224 / 256,
    )
    knn_k: int = option(200, "Neighbours voting in kNN.", within="(0, inf)", affects=REPORTS)
    knn_temperature: float = option(0.07, "kNN vote weight exp(similarity / T).", within="(0, inf)", affects=REPORTS)
    seed: int = option(
        0, "Seed of the classifier's initialisation, data order, augmentation and subsets.", within="[0, inf)"
    )
    workers: int = option(4, "Data-loading worker processes per process.", within="[0, inf)", affects=RUNS)
    output: str | None = option(
        None, "Write the results (top1, top5, source, hyperparameters, time) as JSON to this file.", affects=RUNS
    )
    resume: bool = option(
        False,
        "Continue the classifier from its last per-epoch state (in RUN/probes/, or next to --output).",
        affects=RUNS,
    )
    card: bool = option(
        True,
        "Keep the result of a run directory's SOURCE in RUN/probes/, which its next export puts on the model card "
        "(--no-card: a trial, written only to --output; delete a kept file to drop it from the card).",
        affects=RUNS,
    )
    cache_dir: str | None = option(
        None,
        "Feature cache of fast and knn.",
        affects=RUNS,
        default_text="$MOCHI_HUB_CACHE/features, else $XDG_CACHE_HOME/mochi-hub/features, else ~/.cache/mochi-hub/features",
    )
    max_images: int | None = option(
        None, "Use a seeded random subset of N images of each split (smoke runs).", within="(0, inf)"
    )
    mixed_precision: MixedPrecision = option("no", "Autocast of the backbone's forward.")
    strict_data: bool = option(
        False, "Stop at the first unusable image instead of reporting and skipping it.", affects=RUNS
    )
    preset: str | None = option(
        None, "Start from a preset.", affects=RUNS, default_text="the one --dataset names, if any"
    )


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
    size, from mochi_hub.publish.sources.Source.trained_on) where not given. Without --preset, the dataset (given or the
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


# --- Downstream detection: `mochi detect` (DetectConfig; mochi_hub.evaluate.detect) --------------------------------


@config_class
class DetectConfig(_Config):
    """Fine-tuning torchvision's Faster R-CNN + FPN on a timm backbone (mochi_hub.evaluate.detect). Field names are the
    CLI option names; SOURCE is not a field. Defaults are torchvision's COCO reference schedule at 1x
    (12 epochs, lr 0.02 for 16 images, x0.1 at epochs 8 and 11, 1000 warm-up iterations, 800 px)."""

    data: str | None = option(
        None,
        "A folder in the COCO layout: annotations/instances_train.json, annotations/instances_val.json, "
        "images under train/ and val/ (file names in the JSON relative to those folders). Required.",
    )
    epochs: int = option(12, "Fine-tuning epochs (torchvision's 1x schedule: 12).", within="(0, inf)")
    batch_size: int = option(16, "Global batch size (images), split evenly over processes.", within="(0, inf)")
    lr: float | None = option(
        None,
        "Initial SGD learning rate (torchvision's reference, linearly scaled).",
        within="(0, inf)",
        default_text="0.02 x batch-size / 16",
    )
    lr_milestones: tuple[int, ...] = option(
        (8, 11), "Epochs at which lr is multiplied by --lr-gamma, e.g. 8,11.", parse=parse_milestones
    )
    lr_gamma: float = option(0.1, "Factor applied to lr at each milestone.", within="(0, 1]")
    warmup_iters: int = option(
        1000, "Linear lr warm-up from 0.1 % over this many iterations (at most one epoch).", within="[0, inf)"
    )
    sgd_momentum: float = option(0.9, "SGD momentum.", within="[0, 1)")
    weight_decay: float = option(1e-4, "SGD weight decay.", within="[0, inf)")
    image_size: int = option(
        800,
        "Shorter image side in pixels (torchvision's min_size; at least 32, the FPN's coarsest stride); the longer "
        "side is capped at 1333/800 of it.",
        within="[32, inf)",
    )
    batch_norm: BatchNormMode = option(
        "auto",
        "BatchNorm of the trained backbone stages and of the new layers (FPN, box head): train (the batch's "
        "statistics) | sync (SyncBatchNorm over GPUs) | frozen (FrozenBatchNorm in the backbone and no norm in the "
        "new layers: torchvision's default for supervised weights). auto: sync with several GPU processes, else "
        "train, as MoCo's detection transfer (self-supervised features are not scaled as the running statistics "
        "of their pretraining say on new data). Stages that do not train are always frozen.",
    )
    trainable_layers: int | None = option(
        None,
        "How many of the backbone's last stages train (a ResNet has 5: stem, layer1-4; 0 freezes the backbone).",
        within="[0, inf)",
        default_text="every stage, as MoCo's detection transfer",
    )
    fpn_channels: int = option(256, "Channels of every FPN level (out_channels).", within="(0, inf)")
    hflip: bool = option(True, "Random horizontal flips of the training images (--no-hflip: none).")
    max_images: int | None = option(
        None, "Use a seeded random subset of N images of each split (smoke runs).", within="(0, inf)"
    )
    seed: int = option(
        0, "Seed of the heads' initialisation, data order, flips and the detector's box sampling.", within="[0, inf)"
    )
    workers: int = option(4, "Data-loading worker processes per process.", within="[0, inf)", affects=RUNS)
    output: str = option(
        "runs/detect", "Folder for results.json, detector.safetensors and the per-epoch state.", affects=RUNS
    )
    resume: bool = option(
        False, "Continue from the last per-epoch state in --output (after a crash or kill).", affects=RUNS
    )
    card: bool = option(
        True,
        "Keep the result of a run directory's SOURCE in RUN/detection/, which its next export puts on the model card "
        "(--no-card: a trial, written only to --output; delete a kept file to drop it from the card).",
        affects=RUNS,
    )
    mixed_precision: MixedPrecision = option("no", "Autocast of the detector's forward.")
    preset: str | None = option(None, "Start from a preset.", affects=RUNS)

    @property
    def base_lr(self) -> float:
        """The lr actually used: torchvision's 0.02 for 16 images, scaled linearly, unless given."""
        return self.lr if self.lr is not None else 0.02 * self.batch_size / 16


DETECT_PRESETS: dict[str, dict[str, Any]] = {
    # torchvision's references/detection recipe for COCO (fasterrcnn_resnet50_fpn), 1x: the defaults.
    "coco-1x": dict(epochs=12, batch_size=16, lr_milestones=(8, 11), warmup_iters=1000, image_size=800),
    # The Fashion-MNIST canvases of bench/detection.py (128 px, up to 3 items).
    "canvas": dict(epochs=12, batch_size=8, lr=0.02, lr_milestones=(9, 11), warmup_iters=50, image_size=128),
}


def resolve_detect_config(
    *, preset: str | None = None, config_file: str | Path | None = None, **options: Any
) -> DetectConfig:
    """defaults <- preset <- config file <- options, validated; --data must be given and be a folder."""
    config = resolve_config(DetectConfig, DETECT_PRESETS, preset=preset, config_file=config_file, **options)
    if config.data is None:
        raise OptionError(
            "--data DIR is required: a folder in the COCO layout (annotations/instances_train.json, "
            "annotations/instances_val.json, images under train/ and val/)"
        )
    return config
