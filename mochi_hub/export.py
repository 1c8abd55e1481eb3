"""Export a run's backbone: a timm folder (default), or weights for detectron2 or torchvision.

timm folder (what `mochi train` writes to RUN/export/ and what `mochi push` uploads):

    model.safetensors     the query encoder's backbone, num_classes=0 (never a pickle)
    config.json           timm's shape (architecture, num_classes, num_features, global_pool, pretrained_cfg)
                          + our metadata at the top level, where timm ignores it
    README.md             the model card (mochi_hub.card)
    training_curves.png   when the run has metrics.jsonl

`timm.create_model("local-dir:FOLDER", pretrained=True)` (or "hf-hub:org/name" once pushed) loads it.
Offline only: nothing here touches the network (mochi_hub.hub pushes).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .augment import MEAN, STD
from .card import DEFAULT_LICENSE, PAPER_ID, PAPER_NAME, method_name, model_card_from_export, redact_local_paths
from .checkpoint import latest_checkpoint, load_query_backbone_tensors, read_state
from .config import TrainConfig, train_config_from_dict
from .model import create_backbone

FORMATS = ("timm", "detectron2", "torchvision")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
CURVES = "training_curves.png"
EXPORT_FILES = (WEIGHTS, CONFIG, CARD, CURVES)
DETECTRON2_FILE = "model_detectron2.pkl"
RESNET_FAMILY = ("resnet", "resnext", "wide_resnet")


class ExportError(ValueError):
    """A run or backbone that cannot be exported as asked; the message says why."""


# ---------------------------------------------------------------------------------------------- timm

def _global_pool(model: nn.Module) -> str | None:
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):
        return pool
    return getattr(pool, "pool_type", None)


def clean_pretrained_cfg(backbone: nn.Module, image_size: int, *, license: str = DEFAULT_LICENSE,
                         description: str | None = None) -> dict[str, Any]:
    """Our pretrained_cfg: only the architecture's structural keys survive from timm's default cfg.

    A fresh `timm.create_model("resnet50")` carries the cfg of timm's supervised `a1_in1k` weights (tag,
    url, hf_hub_id, license, paper ids, test/crop sizes); none of that describes our weights.
    Every key is a `timm.models.PretrainedCfg` field: timm builds PretrainedCfg(**cfg) and raises on others.
    """
    from timm.models import PretrainedCfg

    source = dict(getattr(backbone, "pretrained_cfg", None) or {})
    cfg: dict[str, Any] = {
        "custom_load": False,
        "input_size": [3, image_size, image_size],
        "fixed_input_size": bool(source.get("fixed_input_size", False)),
        "interpolation": "bilinear",  # torchvision's Resize default, as in mochi_hub.augment.eval_transform
        "crop_pct": 0.875,  # eval_transform: resize to 256/224 of the crop, then centre crop
        "crop_mode": "center",
        "mean": list(MEAN),
        "std": list(STD),
        "num_classes": 0,
        "first_conv": source.get("first_conv"),
        "classifier": source.get("classifier"),
        "license": license,
        "paper_ids": PAPER_ID,
        "paper_name": PAPER_NAME,
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


def timm_config(backbone: nn.Module, config: TrainConfig, *, probe_results: Iterable[Mapping[str, Any]] = (),
                extra: Mapping[str, Any] | None = None, license: str = DEFAULT_LICENSE) -> dict[str, Any]:
    """config.json: timm's keys first, then ours (method, MoCHi (N, s, s'), training config, probes)."""
    method = method_name(config.mochi)
    dataset = redact_local_paths(config.dataset)
    description = (f"{method} (N, s, s') = {tuple(config.mochi)} self-supervised pretraining on {dataset}, "
                   f"{config.epochs} epochs; backbone only")
    out: dict[str, Any] = {
        "architecture": config.model,
        "num_classes": 0,
        "num_features": int(backbone.num_features),
    }
    pool = _global_pool(backbone)
    if pool:
        out["global_pool"] = pool
    out["pretrained_cfg"] = clean_pretrained_cfg(backbone, config.image_size, license=license,
                                                 description=description)
    info = getattr(backbone, "feature_info", None)
    out.update({
        "method": method,
        "mochi": list(config.mochi),
        "epochs": config.epochs,
        "dataset": dataset,
        "num_params": sum(p.numel() for p in backbone.parameters()),
        "feature_info": {"channels": [int(f["num_chs"]) for f in info],
                         "reduction": [int(f["reduction"]) for f in info]} if info else None,
        "training_config": redact_local_paths(config.to_dict()),
        "probe_results": [redact_local_paths(dict(p)) for p in probe_results],
        "mochi_hub_version": __version__,
    })
    for key, value in (extra or {}).items():
        if key in out:
            raise ExportError(f"extra metadata key {key!r} would overwrite config.json's own {key!r}")
        out[key] = redact_local_paths(value)
    return out


def _replace_atomically(path: Path, write) -> None:
    """Write through a temporary sibling and rename: a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_timm_folder(backbone: nn.Module, config: TrainConfig, output: Path, *,
                     probe_results: Iterable[Mapping[str, Any]] = (), metrics_file: Path | None = None,
                     extra: Mapping[str, Any] | None = None, license: str = DEFAULT_LICENSE) -> Path:
    """Write model.safetensors + config.json + README.md (+ training_curves.png) into `output`."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    probes = [dict(p) for p in probe_results]
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in backbone.state_dict().items()}
    if getattr(backbone, "num_classes", 0):
        raise ExportError("the backbone has a classifier; export the backbone created with num_classes=0")
    hf_config = timm_config(backbone, config, probe_results=probes, extra=extra, license=license)

    _replace_atomically(output / WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    _replace_atomically(output / CONFIG, lambda p: p.write_text(json.dumps(hf_config, indent=2) + "\n"))
    has_curves = False
    if metrics_file is not None and Path(metrics_file).is_file():
        rows = read_metrics(metrics_file)
        if rows:
            _replace_atomically(output / CURVES, lambda p: plot_training_curves(rows, p))
            has_curves = True
    if not has_curves and (output / CURVES).exists():
        (output / CURVES).unlink()  # a curve from an older export would not describe these weights
    card = model_card_from_export(hf_config, has_curves=has_curves)
    _replace_atomically(output / CARD, lambda p: p.write_text(str(card), encoding="utf-8"))
    return output


# ----------------------------------------------------------------------------------- training curves

CURVE_KEYS = (("loss", "InfoNCE loss"), ("proxy_top1", "proxy top-1 % (positive ranked first)"),
              ("lr", "learning rate"), ("alignment", "alignment"), ("uniformity", "uniformity"),
              ("false_negative_rate", "false-negative rate"))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl -> its records with a step (kind "step" or "epoch"); a torn last line is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def plot_training_curves(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """A small line chart per metric (loss, proxy top-1, lr, ...) against the step, drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    def finite(row: dict[str, Any], key: str) -> bool:
        return isinstance(row.get(key), (int, float)) and math.isfinite(row[key])

    series = []
    step_rows = [r for r in rows if r.get("kind", "step") == "step"]
    for key, title in CURVE_KEYS:  # per-step values where logged, else the epoch-end values
        chosen = [r for r in step_rows if finite(r, key)] or [r for r in rows if finite(r, key)]
        if chosen:
            series.append((title, [(float(r["step"]), float(r[key])) for r in chosen]))
    if not series:
        raise ExportError("metrics.jsonl holds no finite loss / proxy_top1 / lr values to plot")
    width, height, columns = 420, 280, min(3, len(series))
    rows_count = math.ceil(len(series) / columns)
    image = Image.new("RGB", (width * columns, height * rows_count), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    left, right, top, bottom = 70, 15, 28, 36
    for index, (title, points) in enumerate(series):
        ox, oy = (index % columns) * width, (index // columns) * height
        x0, y0, x1, y1 = ox + left, oy + top, ox + width - right, oy + height - bottom
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        xmin, xmax = min(xs), max(xs)
        ymin, ymax = min(ys), max(ys)
        if xmax == xmin:
            xmax = xmin + 1
        if ymax == ymin:
            ymin, ymax = ymin - 0.5 * (abs(ymin) or 1), ymax + 0.5 * (abs(ymax) or 1)

        def to_px(x: float, y: float) -> tuple[float, float]:
            return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)

        draw.text((ox + left, oy + 6), title, fill="black", font=font)
        draw.rectangle((x0, y0, x1, y1), outline="#444444")
        for i in range(5):
            fy = ymin + (ymax - ymin) * i / 4
            py = to_px(xmin, fy)[1]
            draw.line((x0 - 4, py, x0, py), fill="#444444")
            draw.line((x0 + 1, py, x1 - 1, py), fill="#eeeeee")
            draw.text((ox + 4, py - 7), f"{fy:.3g}", fill="black", font=font)
        x_ticks = sorted({round(xmin + (xmax - xmin) * i / 4) for i in range(5)})  # whole steps, no repeats
        for fx in x_ticks:
            px = to_px(fx, ymin)[0]
            draw.line((px, y1, px, y1 + 4), fill="#444444")
            draw.text((px - 12, y1 + 6), f"{fx:d}", fill="black", font=font)
        draw.text((x1 - 30, y1 + 20), "step", fill="#444444", font=font)
        pixels = [to_px(x, y) for x, y in points]
        if len(pixels) == 1:
            px, py = pixels[0]
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill="#1f77b4")
        else:
            draw.line(pixels, fill="#1f77b4", width=2)
    image.save(path, format="PNG")
    return Path(path)


# ------------------------------------------------------------------------------- torchvision / detectron2

def torchvision_state_dict(backbone: nn.Module, architecture: str) -> dict[str, torch.Tensor]:
    """The backbone's weights under torchvision's names (timm's ResNets use the same ones), checked key by
    key and shape by shape against `torchvision.models.<architecture>()` without its `fc` layer."""
    import torchvision

    if not architecture.startswith(RESNET_FAMILY):
        raise ExportError(f"--format torchvision/detectron2 needs a ResNet-family backbone "
                          f"(resnet18/34/50/101/152, resnext, wide_resnet), got {architecture!r}")
    if architecture not in torchvision.models.list_models(module=torchvision.models):
        raise ExportError(f"torchvision has no architecture named {architecture!r}: timm's variant has no "
                          "torchvision counterpart (e.g. resnet50d's deep stem); use --format timm")
    with torch.device("meta"):  # shapes only, no memory
        reference = torchvision.models.get_model(architecture, weights=None)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    ours = {k: v for k, v in backbone.state_dict().items()}
    mismatched = sorted(set(expected) ^ set(ours)) + sorted(
        k for k in set(expected) & set(ours) if expected[k] != tuple(ours[k].shape))
    if mismatched:
        raise ExportError(f"timm's {architecture} does not match torchvision's layout "
                          f"({len(mismatched)} keys differ, e.g. {mismatched[:3]}); use --format timm")
    return {k: v.detach().cpu().contiguous() for k, v in ours.items()}


def to_detectron2(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """torchvision ResNet names -> detectron2's (stem.conv1, res2..res5, convN.norm, shortcut[.norm]),
    numpy arrays, as detectron2's tools/convert-torchvision-to-d2.py and MoCo's
    detection/convert-pretrain-to-detectron2.py do. BN step counters are dropped (FrozenBN has none)."""
    model = {}
    for name, tensor in state_dict.items():
        if name.endswith("num_batches_tracked") or name.startswith("fc."):
            continue
        key = name if "layer" in name else "stem." + name
        for t in (1, 2, 3, 4):
            key = key.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            key = key.replace(f"bn{t}", f"conv{t}.norm")
        key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        model[key] = tensor.detach().cpu().numpy()
    return {"model": model, "__author__": "mochi-hub", "matching_heuristics": True}


DETECTRON2_NOTES = """# {name}: detectron2 weights

`{file}` holds the backbone of a MoCHi / MoCo-v2 run in detectron2's naming (as MoCo's
`detection/convert-pretrain-to-detectron2.py` writes). Use it as detectron2's MoCo configs do:

```yaml
MODEL:
  WEIGHTS: "{file}"
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
  RESNETS:
    DEPTH: {depth}
    STRIDE_IN_1X1: False   # torchvision/timm ResNets stride in the 3x3 conv
INPUT:
  FORMAT: "RGB"
```
"""

TORCHVISION_NOTES = """# {name}: torchvision weights

`{file}` is a state dict for `torchvision.models.{arch}()` without its `fc` layer:

```python
import torch, torchvision
from safetensors.torch import load_file

model = torchvision.models.{arch}()
model.fc = torch.nn.Identity()  # pooled features; or keep fc and load with strict=False
model.load_state_dict(load_file("{file}"))
```
Inputs: RGB, normalised with mean {mean} and std {std}.
"""


# ---------------------------------------------------------------------------------------------- runs

def read_probe_results(run_dir: str | Path) -> list[dict[str, Any]]:
    """RUN/probes/*.json, in name order; an unreadable file is reported and skipped."""
    results = []
    for path in sorted((Path(run_dir) / "probes").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            warnings.warn(f"skipping probe result {path.name}: {error}", stacklevel=2)
            continue
        if isinstance(record, dict) and "top1" in record:
            results.append(record)
    return results


def read_run(run_dir: str | Path) -> tuple[TrainConfig, dict[str, Any], Path]:
    """(config, run.json, newest checkpoint) of a run directory, or an ExportError saying what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"no such run directory: {run_dir}")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ExportError(f"{run_dir} holds no complete checkpoint (checkpoints/step-*/): nothing to export")
    run_file = run_dir / "run.json"
    run: dict[str, Any] = json.loads(run_file.read_text()) if run_file.is_file() else {}
    config_dict = run.get("config") or read_state(checkpoint).get("config")
    if not config_dict:
        raise ExportError(f"{run_dir} has no run.json and its checkpoint records no config")
    return _saved_config(config_dict), run, checkpoint


def _saved_config(config_dict: dict[str, Any]) -> TrainConfig:
    try:
        return train_config_from_dict(config_dict)
    except ValueError as error:
        raise ExportError(f"the run's saved config is invalid: {error}") from None


def load_run_backbone(run_dir: str | Path) -> tuple[nn.Module, TrainConfig, dict[str, Any], Path]:
    """The query encoder's backbone of the newest checkpoint, in eval mode."""
    config, run, checkpoint = read_run(run_dir)
    backbone = create_backbone(config.model)
    tensors = load_query_backbone_tensors(checkpoint)
    if not tensors:
        raise ExportError(f"{checkpoint} holds no query backbone weights (query.backbone.*)")
    try:
        backbone.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ExportError(f"{checkpoint} does not match a {config.model} backbone: {error}") from None
    return backbone.eval(), config, run, checkpoint


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def default_output(run_dir: str | Path, format: str = "timm") -> Path:
    return Path(run_dir) / ("export" if format == "timm" else f"export-{format}")


def export_run(run_dir: Path, output: Path | None = None, format: str = "timm") -> Path:
    """Export the newest checkpoint of a run. Returns the folder (timm) or the weights file (others).

    Default output: RUN/export (timm), RUN/export-detectron2, RUN/export-torchvision.
    """
    if format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    run_dir = Path(run_dir)
    backbone, config, run, checkpoint = load_run_backbone(run_dir)
    output = Path(output) if output is not None else default_output(run_dir, format)
    if format == "timm":
        extra = {"run": {"checkpoint_step": checkpoint_step(checkpoint),
                         "num_processes": run.get("num_processes"),
                         "global_batch_size": run.get("global_batch_size"),
                         "mochi_hub_version": run.get("mochi_hub_version"),
                         "summary": run.get("summary")}}
        return save_timm_folder(backbone, config, output, probe_results=read_probe_results(run_dir),
                                metrics_file=run_dir / "metrics.jsonl", extra=extra)

    state = torchvision_state_dict(backbone, config.model)
    output.mkdir(parents=True, exist_ok=True)
    name = f"{config.model} {method_name(config.mochi)} {tuple(config.mochi)}"
    if format == "torchvision":
        target = output / f"torchvision_{config.model}.safetensors"
        _replace_atomically(target, lambda p: save_file(state, p, metadata={
            "format": "pt", "torchvision_architecture": config.model, "paper": PAPER_ID}))
        notes = TORCHVISION_NOTES.format(name=name, file=target.name, arch=config.model, mean=MEAN, std=STD)
    else:
        target = output / DETECTRON2_FILE
        converted = to_detectron2(state)

        def write_pickle(path: Path) -> None:
            with open(path, "wb") as handle:
                pickle.dump(converted, handle)

        _replace_atomically(target, write_pickle)
        depth = "".join(ch for ch in config.model.split("_")[0] if ch.isdigit()) or "50"
        notes = DETECTRON2_NOTES.format(name=name, file=target.name, depth=depth)
    _replace_atomically(output / "README.md", lambda p: p.write_text(notes))
    return target
