"""What `mochi probe SOURCE` evaluates: one backbone (timm, `num_classes=0`), from any of three places.

- a run directory (has run.json): its export/ folder when present, else the newest complete checkpoint's
  query backbone, built as run.json's "config"."model";
- an exported timm folder (config.json + model.safetensors): `timm.create_model("local-dir:PATH")`;
- `hf-hub:org/name[@revision]`: timm's Hub loader (the HF cache serves it offline).

The same weights give the same module whichever way they came, and the same `weights_sha256`: the
feature cache and the probe results are keyed by it, not by where the weights were read from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from mochi_hub.data.augment import MEAN, STD
from mochi_hub.method.model import pooled_width
from mochi_hub.training.checkpoint import latest_checkpoint
from mochi_hub.training.runs import RUN_JSON, RunError, load_run_backbone

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"


def weights_sha256(module: nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _timm_folder(path: Path) -> nn.Module:
    return timm.create_model(f"{LOCAL_DIR}{path}", pretrained=True, num_classes=0)


def _run_directory(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    export = path / "export"
    if (export / "config.json").is_file():
        return _timm_folder(export), {"kind": "run-export", "run_dir": str(path), "path": str(export)}
    if latest_checkpoint(path) is None:
        raise ValueError(
            f"SOURCE {path}: a run directory with neither export/ nor a complete checkpoint under checkpoints/"
        )
    try:
        backbone, _, _, checkpoint = load_run_backbone(path)
    except RunError as error:
        raise ValueError(f"SOURCE {path}: {error}") from None
    return backbone, {
        "kind": "run-checkpoint",
        "run_dir": str(path),
        "checkpoint": str(checkpoint),
        "step": int(checkpoint.name.split("-")[1]),
    }


def source_defaults(source: str) -> dict[str, Any]:
    """What SOURCE was trained on, from its JSON alone (no weights are read): {"dataset", "image_size"} where
    known. A run directory's run.json has the real dataset; an export's config.json has it with local paths
    redacted ("<local>/name"), which names nothing here and is left out."""
    import json

    def from_training(config: dict[str, Any], input_size: Any = None) -> dict[str, Any]:
        found: dict[str, Any] = {}
        dataset = config.get("dataset")
        if isinstance(dataset, str) and not dataset.startswith("<local>"):
            found["dataset"] = dataset
        size = input_size[-1] if isinstance(input_size, list) and input_size else config.get("image_size")
        if isinstance(size, int):
            found["image_size"] = size
        return found

    try:
        if source.startswith(HF_HUB):
            from huggingface_hub import hf_hub_download

            repo_id, _, revision = source[len(HF_HUB) :].partition("@")
            data = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision or None)).read_text())
            return from_training(
                data.get("training_config") or {}, (data.get("pretrained_cfg") or {}).get("input_size")
            )
        path = Path(source.removeprefix(LOCAL_DIR)).expanduser()
        if (path / RUN_JSON).is_file():
            return from_training(json.loads((path / RUN_JSON).read_text()).get("config") or {})
        if (path / "config.json").is_file():
            data = json.loads((path / "config.json").read_text())
            return from_training(
                data.get("training_config") or {}, (data.get("pretrained_cfg") or {}).get("input_size")
            )
    except Exception:
        return {}
    return {}


def probe_config_for(source: str, **options: Any):
    """`mochi probe SOURCE [options]`'s config: the options over what SOURCE was trained on, resolved and complete."""
    from mochi_hub.config import complete_probe_config, resolve_probe_config

    trained_on = source_defaults(source)
    return complete_probe_config(resolve_probe_config(trained_on=trained_on, **options), trained_on, source)


def load_backbone(source: str) -> tuple[nn.Module, dict[str, Any]]:
    """SOURCE -> (backbone in eval mode, info). info: kind, source, architecture, num_features,
    weights_sha256, where it came from, and the mean/std the weights declare."""
    if source.startswith(HF_HUB):
        repo_id, _, revision = source[len(HF_HUB) :].partition("@")
        try:
            backbone = timm.create_model(source, pretrained=True, num_classes=0)
        except Exception as error:
            raise ValueError(
                f"SOURCE {source}: could not load from the Hub or the HF cache ({type(error).__name__}: {error})"
            ) from error
        info: dict[str, Any] = {"kind": "hf-hub", "repo_id": repo_id, "revision": revision or "main"}
    else:
        path = Path(source.removeprefix(LOCAL_DIR)).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"SOURCE {source}: not a folder and not hf-hub:org/name "
                "(expected a run directory, an exported timm folder, or hf-hub:org/name[@revision])"
            )
        path = path.resolve()
        if (path / RUN_JSON).is_file():
            backbone, info = _run_directory(path)
        elif (path / "config.json").is_file():
            backbone, info = _timm_folder(path), {"kind": "timm-folder", "path": str(path)}
        else:
            raise ValueError(f"SOURCE {source}: neither a run directory (run.json) nor a timm folder (config.json)")
    backbone.eval()
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    info.update(
        source=source,
        architecture=cfg.get("architecture") or type(backbone).__name__,
        num_features=pooled_width(backbone),
        weights_sha256=weights_sha256(backbone),
        declared_mean=list(cfg.get("mean", MEAN)),
        declared_std=list(cfg.get("std", STD)),
    )
    return backbone, info
