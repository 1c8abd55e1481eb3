"""Export a run's backbone: a timm folder (default), or weights for detectron2 or torchvision (convert.py).

timm folder (what `mochi train` writes to RUN/export/ and what `mochi push` uploads):

    model.safetensors     the query encoder's backbone, num_classes=0 (never a pickle)
    config.json           timm's shape (architecture, num_classes, num_features, global_pool, pretrained_cfg,
                          model_args) + our metadata at the top level, where timm ignores it
    README.md             the model card (mochi_hub.publish.card)
    training_curves.png   when the run has metrics.jsonl and matplotlib is installed (mochi_hub.publish.plots)

`timm.create_model("local-dir:FOLDER", pretrained=True)` (or "hf-hub:org/name" once pushed) loads it.
Offline only: nothing here touches the network (mochi_hub.publish.hub pushes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from mochi_hub.config import TrainConfig
from mochi_hub.core.persist import atomic_write, read_json, save_tensors, staged_files, write_json
from mochi_hub.data.augment import MEAN, STD
from mochi_hub.errors import InputError, OptionError
from mochi_hub.method.model import pooled_width
from mochi_hub.publish import plots
from mochi_hub.publish.card import (
    DEFAULT_LICENSE,
    PAPER_ID,
    PAPER_NAME,
    method_name,
    model_card_from_export,
    redact_local_paths,
)
from mochi_hub.publish.convert import ConversionError, torchvision_state_dict, write_detectron2, write_torchvision
from mochi_hub.training.checkpoint import checkpoint_step
from mochi_hub.training.runs import (
    DETECTION,
    METRICS,
    PROBES,
    default_export,
    is_run_dir,
    load_run_backbone,
    read_metrics,
    read_results,
    run_backbone_args,
)
from mochi_hub.version import __version__

log = logging.getLogger(__name__)

FORMATS = ("timm", "detectron2", "torchvision")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
CURVES = "training_curves.png"
HEAD = "projection_head.safetensors"  # `mochi import --keep-head`: the source's projection head, beside the backbone
EXPORT_FILES = (WEIGHTS, CONFIG, CARD, CURVES, HEAD)


class ExportError(InputError):
    """A run or backbone that cannot be exported as asked; the message says why."""


def _global_pool(model: nn.Module) -> str | None:
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):
        return pool
    return getattr(pool, "pool_type", None)


def clean_pretrained_cfg(
    backbone: nn.Module,
    image_size: int,
    *,
    license: str = DEFAULT_LICENSE,
    description: str | None = None,
    paper: tuple[str, str] | None = (PAPER_ID, PAPER_NAME),
) -> dict[str, Any]:
    """Our pretrained_cfg: only the architecture's structural keys survive from timm's default cfg.

    A fresh `timm.create_model("resnet50")` carries the cfg of timm's supervised `a1_in1k` weights (tag,
    url, hf_hub_id, license, paper ids, test/crop sizes); none of that describes our weights.
    Every key is a `timm.models.PretrainedCfg` field: timm builds PretrainedCfg(**cfg) and raises on others.
    `paper`: (paper_ids, paper_name) of the method that trained the weights; None when it is not known.
    """
    from timm.models import PretrainedCfg

    source = dict(getattr(backbone, "pretrained_cfg", None) or {})
    cfg: dict[str, Any] = {
        "custom_load": False,
        "input_size": [3, image_size, image_size],
        "fixed_input_size": bool(source.get("fixed_input_size", False)),
        "interpolation": "bilinear",  # torchvision's Resize default, as in mochi_hub.data.augment.eval_transform
        "crop_pct": 0.875,  # eval_transform: resize to 256/224 of the crop, then centre crop
        "crop_mode": "center",
        "mean": list(MEAN),
        "std": list(STD),
        "num_classes": 0,
        "first_conv": source.get("first_conv"),
        "classifier": source.get("classifier"),
        "license": license,
        "paper_ids": paper[0] if paper else None,
        "paper_name": paper[1] if paper else None,
    }
    if description:
        cfg["description"] = description
    info = getattr(backbone, "feature_info", None)
    if source.get("pool_size") and info:
        reduction = info[-1]["reduction"]
        cfg["pool_size"] = [math.ceil(image_size / reduction)] * 2
    cfg = {k: v for k, v in cfg.items() if v is not None}
    PretrainedCfg(**cfg)  # fail here, not in the user's timm.create_model
    return cfg


def timm_keys(
    backbone: nn.Module,
    architecture: str,
    image_size: int,
    *,
    license: str = DEFAULT_LICENSE,
    description: str | None = None,
    paper: tuple[str, str] | None = (PAPER_ID, PAPER_NAME),
    model_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The keys timm reads from config.json: architecture, num_classes, num_features, global_pool, pretrained_cfg,
    model_args (what timm must pass the constructor to rebuild this backbone, e.g. a ViT's img_size)."""
    out: dict[str, Any] = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": int(backbone.num_features),
    }
    pool = _global_pool(backbone)
    if pool:
        out["global_pool"] = pool
    out["pretrained_cfg"] = clean_pretrained_cfg(
        backbone, image_size, license=license, description=description, paper=paper
    )
    if model_args:
        out["model_args"] = dict(model_args)
    return out


def network_info(backbone: nn.Module) -> dict[str, Any]:
    """What the network gives, for the card: pooled width, parameter count, the feature maps' channels and strides."""
    info = getattr(backbone, "feature_info", None)
    return {
        "pooled_features": pooled_width(backbone),  # what backbone(images) returns: after a conv head, if any
        "num_params": sum(p.numel() for p in backbone.parameters()),
        "feature_info": {
            "channels": [int(f["num_chs"]) for f in info],
            "reduction": [int(f["reduction"]) for f in info],
        }
        if info
        else None,
    }


def timm_config(
    backbone: nn.Module,
    config: TrainConfig,
    *,
    probe_results: Iterable[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
    license: str = DEFAULT_LICENSE,
    model_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json: timm's keys first, then ours (method, MoCHi (N, s, s'), training config, probes)."""
    method = method_name(config.mochi)
    dataset = redact_local_paths(config.dataset)
    description = (
        f"{method} (N, s, s') = {tuple(config.mochi)} self-supervised pretraining on {dataset}, "
        f"{config.epochs} epochs; backbone only"
    )
    out = timm_keys(
        backbone, config.model, config.image_size, license=license, description=description, model_args=model_args
    )
    out.update(
        {
            "method": method,
            "mochi": list(config.mochi),
            "epochs": config.epochs,
            "dataset": dataset,
            **network_info(backbone),
            "training_config": redact_local_paths(config.to_dict()),
            "probe_results": [redact_local_paths(dict(p)) for p in probe_results],
            "mochi_hub_version": __version__,
        }
    )
    for key, value in (extra or {}).items():
        if key in out:
            raise ExportError(f"extra metadata key {key!r} would overwrite config.json's own {key!r}")
        out[key] = redact_local_paths(value)
    return out


def save_timm_folder(
    backbone: nn.Module,
    config: TrainConfig,
    output: Path,
    *,
    probe_results: Iterable[Mapping[str, Any]] = (),
    metrics_file: Path | None = None,
    extra: Mapping[str, Any] | None = None,
    license: str = DEFAULT_LICENSE,
    model_args: Mapping[str, Any] | None = None,
) -> Path:
    """Write a run's backbone into `output` as a timm folder (write_timm_folder)."""
    hf_config = timm_config(
        backbone, config, probe_results=probe_results, extra=extra, license=license, model_args=model_args
    )
    return write_timm_folder(backbone, hf_config, output, metrics_file=metrics_file)


def write_timm_folder(
    backbone: nn.Module, hf_config: Mapping[str, Any], output: Path, *, metrics_file: Path | None = None
) -> Path:
    """The one writer of a timm folder (`mochi export` and `mochi import`): model.safetensors + config.json +
    README.md (+ training_curves.png), written as one set (persist.staged_files): a failure, a full disk included,
    leaves an earlier export as it was and no half-written or empty folder."""
    if getattr(backbone, "num_classes", 0):
        raise ExportError("the backbone has a classifier; export the backbone created with num_classes=0")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in backbone.state_dict().items()}
    with staged_files(output, "--output") as staged:
        save_tensors(staged / WEIGHTS, state, metadata={"format": "pt"})
        write_json(staged / CONFIG, hf_config)
        has_curves = _write_curves(metrics_file, staged / CURVES)
        card = model_card_from_export(hf_config, has_curves=has_curves)
        atomic_write(staged / CARD, lambda p: p.write_text(str(card), encoding="utf-8"))
    if not has_curves:
        (Path(output) / CURVES).unlink(missing_ok=True)  # a curve from an older export would not describe these weights
    return Path(output)


def _write_curves(metrics_file: Path | None, path: Path) -> bool:
    rows = read_metrics(metrics_file) if metrics_file is not None and Path(metrics_file).is_file() else []
    drawn = False
    if rows and plots.available():
        drawn = atomic_write(path, lambda p: plots.training_curves(rows, p) or p.write_bytes(b"")).stat().st_size > 0
    elif rows:
        log.info("no training_curves.png: matplotlib is not installed (pip install 'mochi-hub[plots]')")
    if not drawn:
        path.unlink(missing_ok=True)
    return drawn


def export_run(run_dir: Path, output: Path | None = None, format: str = "timm", license: str | None = None) -> Path:
    """Export the newest checkpoint of a run. Returns the folder (timm) or the weights file (others).

    Default output: RUN/export (timm), RUN/export-detectron2, RUN/export-torchvision. A timm folder (what
    `mochi import` writes) converts to detectron2 / torchvision, by default into FOLDER-detectron2 / -torchvision.
    `license`: the weights' license (default: apache-2.0 for a run, a timm folder's own).
    """
    if format not in FORMATS:
        raise OptionError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir) and (run_dir / CONFIG).is_file():
        return _convert_timm_folder(run_dir, output, format, license)
    backbone, config, run, checkpoint = load_run_backbone(run_dir)
    output = Path(output) if output is not None else default_export(run_dir, format)
    if format == "timm":
        extra = {
            "run": {
                "checkpoint_step": checkpoint_step(checkpoint),
                "num_processes": run.get("num_processes"),
                "global_batch_size": run.get("global_batch_size"),
                "mochi_hub_version": run.get("mochi_hub_version"),
                "backbone": run.get("backbone"),
                "summary": run.get("summary"),
            },
            "detection_results": [redact_local_paths(r) for r in read_results(run_dir, DETECTION)],
        }
        return save_timm_folder(
            backbone,
            config,
            output,
            probe_results=read_results(run_dir, PROBES),
            metrics_file=run_dir / METRICS,
            extra=extra,
            license=license or DEFAULT_LICENSE,
            model_args=run_backbone_args(config, run),
        )
    state = torchvision_state_dict(backbone, config.model)
    name = f"{config.model} {method_name(config.mochi)} {tuple(config.mochi)}"
    write = write_torchvision if format == "torchvision" else write_detectron2
    with staged_files(output, "--output") as staged:
        weights = write(state, config.model, staged, name, license=license or DEFAULT_LICENSE)
    return output / weights.name


def _convert_timm_folder(folder: Path, output: Path | None, format: str, license: str | None) -> Path:
    """A timm folder's backbone (`mochi import`'s, or an export) as detectron2 / torchvision weights."""
    import timm

    if format == "timm":
        raise OptionError(f"{folder} is already a timm folder: use --format detectron2 or torchvision")
    try:
        hf_config = read_json(folder / CONFIG)
        architecture = hf_config["architecture"]
        backbone = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True, num_classes=0)
        state = torchvision_state_dict(backbone, architecture)
    except (ConversionError, ValueError, KeyError, RuntimeError) as error:  # a folder timm cannot read as it says
        raise ExportError(f"{folder}: {error}") from None
    output = Path(output) if output is not None else folder.with_name(f"{folder.name}-{format}")
    name = f"{architecture} {hf_config.get('method') or 'backbone'}"
    cfg = hf_config.get("pretrained_cfg") or {}
    with staged_files(output, "--output") as staged:
        if format == "torchvision":
            weights = write_torchvision(
                state, architecture, staged, name, license=license or cfg.get("license"), paper=cfg.get("paper_ids")
            )
        else:
            weights = write_detectron2(state, architecture, staged, name, license=license or cfg.get("license"))
    return output / weights.name
