"""mochi-hub: MoCHi (Kalantidis et al., NeurIPS 2020) for timm backbones.

    from mochi_hub import TrainConfig, train, ProbeConfig, run_probe, export_run, push, import_checkpoint

Importing the package is light: each name loads its module (and torch, timm, accelerate) on first use,
as huggingface_hub's own package does.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .version import __version__

# Installed, pyproject's package-dir maps the top-level cli/ and model_cards/ to mochi_hub.cli and
# mochi_hub.model_cards. A plain checkout on PYTHONPATH (a device machine, `python -m mochi_hub.cli`) has them beside
# this folder instead: search there too, after this folder, so both names resolve the same way in either case.
_CHECKOUT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "cli").is_dir() and (_CHECKOUT / "cli" / "app.py").is_file():
    __path__.append(str(_CHECKOUT))

_LAZY = {
    "TrainConfig": "config",
    "ProbeConfig": "config",
    "DetectConfig": "config",
    "resolve_train_config": "config",
    "resolve_probe_config": "config",
    "resolve_detect_config": "config",
    "train": "training.pretrain",
    "run_probe": "evaluate.probe",
    "export_run": "publish.export",
    "push": "publish.hub",
    "import_checkpoint": "publish.importer",
    "run_detect": "evaluate.detect",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from .config import (
        DetectConfig,
        ProbeConfig,
        TrainConfig,
        resolve_detect_config,
        resolve_probe_config,
        resolve_train_config,
    )
    from .evaluate.detect import run_detect
    from .evaluate.probe import run_probe
    from .publish.export import export_run
    from .publish.hub import push
    from .publish.importer import import_checkpoint
    from .training.pretrain import train
