"""SOURCE, what `mochi probe`, `mochi detect` and `mochi push` take: one backbone (timm, `num_classes=0`) from any
of three places, parsed once into a `Source` (its kind, its folder or its Hub repo id and revision):

- a run directory (run.json or checkpoints/): its export/ folder when present, else the newest complete
  checkpoint's query backbone, built as run.json's "config"."model";
- an exported timm folder (config.json + model.safetensors): `timm.create_model("local-dir:PATH")`;
- `hf-hub:org/name[@revision]`: timm's Hub loader (the HF cache serves it offline).

The same weights give the same module whichever way they came, and the same `weights_sha256`: the
feature cache and the probe results are keyed by it, not by where the weights were read from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from mochi_hub.config import ProbeConfig, resolve_probe_config
from mochi_hub.core.persist import read_json
from mochi_hub.data.augment import MEAN, STD
from mochi_hub.data.datasets import check_dataset_spec
from mochi_hub.errors import InputError, OptionError
from mochi_hub.method.model import pooled_width
from mochi_hub.training.checkpoint import latest_checkpoint
from mochi_hub.training.preflight import absolute_folders
from mochi_hub.training.runs import RUN_JSON, RunError, is_run_dir, load_run_backbone

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"
RUN, EXPORT, HUB = "run", "export", "hub"  # the kinds of SOURCE


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


def _from_training(config: dict[str, Any], input_size: Any = None) -> dict[str, Any]:
    """{"dataset", "image_size"} of a saved training config, where known. An export's config.json holds the dataset
    with local paths redacted ("<local>/name"), which names nothing here and is left out."""
    found: dict[str, Any] = {}
    dataset = config.get("dataset")
    if isinstance(dataset, str) and not dataset.startswith("<local>"):
        found["dataset"] = dataset
    size = input_size[-1] if isinstance(input_size, list) and input_size else config.get("image_size")
    if isinstance(size, int):
        found["image_size"] = size
    return found


@dataclass(frozen=True)
class Source:
    """A SOURCE, parsed once: `kind` RUN (a run directory), EXPORT (an exported timm folder) or HUB; `path` the
    folder (resolved), or `repo_id` and `revision` (None: the default branch) on the Hub; `text` as given."""

    text: str
    kind: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, text: str | Path) -> Source:
        """Raise ValueError, naming SOURCE, when it is neither a run directory, a timm folder nor hf-hub:org/name."""
        text = str(text)
        if text.startswith(HF_HUB):
            repo_id, _, revision = text[len(HF_HUB) :].partition("@")
            return cls(text, HUB, repo_id=repo_id, revision=revision or None)
        path = Path(text.removeprefix(LOCAL_DIR)).expanduser()
        if not path.is_dir():
            raise OptionError(
                f"SOURCE {text}: {'a file' if path.exists() else 'no such folder'}, and not hf-hub:org/name "
                "(expected a run directory, an exported timm folder, or hf-hub:org/name[@revision])"
            )
        path = path.resolve()
        if (path / RUN_JSON).is_file():
            return cls(text, RUN, path)
        if (path / "config.json").is_file():
            return cls(text, EXPORT, path)
        if is_run_dir(path):  # checkpoints/ before run.json was written
            return cls(text, RUN, path)
        raise OptionError(
            f"SOURCE {text}: neither a run directory (run.json, checkpoints/) nor an exported timm folder "
            "(config.json + model.safetensors)"
        )

    def trained_on(self) -> dict[str, Any]:
        """What the backbone was trained on, from JSON alone (no weights are read): {"dataset", "image_size"} where
        known (a run's run.json, an export's or a Hub model's config.json); {} where nothing says (a run without
        run.json yet, a config.json of another project). A file that cannot be read raises, naming it."""
        if self.kind == RUN:
            run = self.path / RUN_JSON
            data = read_json(run) if run.is_file() else {}
            return _from_training((data.get("config") if isinstance(data, dict) else None) or {})
        data = read_json(self._hub_config() if self.kind == HUB else self.path / "config.json")
        if not isinstance(data, dict):
            return {}
        return _from_training(data.get("training_config") or {}, (data.get("pretrained_cfg") or {}).get("input_size"))

    def _hub_config(self) -> Path:
        """The Hub model's config.json (the HF cache serves it offline)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            return Path(hf_hub_download(self.repo_id, "config.json", revision=self.revision))
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, HFValidationError) as error:
            raise OptionError(
                f"SOURCE {self.text}: no timm model there on the Hub ({type(error).__name__}: "
                f"{str(error).splitlines()[0]})"
            ) from None
        except Exception as error:  # no connection and no cached copy, or the endpoint failed
            raise InputError(
                f"SOURCE {self.text}: its config.json could not be read from the Hub or the HF cache "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            ) from None

    def load(self) -> tuple[nn.Module, dict[str, Any]]:
        """(backbone in eval mode, info). info: kind, source, architecture, num_features, weights_sha256, where it
        came from, and the mean/std the weights declare."""
        if self.kind == HUB:
            try:
                backbone = timm.create_model(self.text, pretrained=True, num_classes=0)
            except Exception as error:
                raise InputError(
                    f"SOURCE {self.text}: could not load from the Hub or the HF cache ({type(error).__name__}: {error})"
                ) from error
            info: dict[str, Any] = {"kind": "hf-hub", "repo_id": self.repo_id, "revision": self.revision or "main"}
        elif self.kind == RUN:
            backbone, info = self._run_backbone()
        else:
            backbone, info = _timm_folder(self.path), {"kind": "timm-folder", "path": str(self.path)}
        backbone.eval()
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        info.update(
            source=self.text,
            architecture=cfg.get("architecture") or type(backbone).__name__,
            num_features=pooled_width(backbone),
            weights_sha256=weights_sha256(backbone),
            declared_mean=list(cfg.get("mean", MEAN)),
            declared_std=list(cfg.get("std", STD)),
        )
        return backbone, info

    def _run_backbone(self) -> tuple[nn.Module, dict[str, Any]]:
        """A run's export/ when there is one, else its newest complete checkpoint's query backbone."""
        export = self.path / "export"
        if (export / "config.json").is_file():
            return _timm_folder(export), {"kind": "run-export", "run_dir": str(self.path), "path": str(export)}
        if latest_checkpoint(self.path) is None:
            raise InputError(
                f"SOURCE {self.text}: a run directory with neither export/ nor a complete checkpoint under checkpoints/"
            )
        try:
            backbone, _, _, checkpoint = load_run_backbone(self.path)
        except RunError as error:
            raise InputError(f"SOURCE {self.text}: {error}") from None
        return backbone, {
            "kind": "run-checkpoint",
            "run_dir": str(self.path),
            "checkpoint": str(checkpoint),
            "step": int(checkpoint.name.split("-")[1]),
        }


def load_backbone(source: str) -> tuple[nn.Module, dict[str, Any]]:
    """SOURCE -> (backbone in eval mode, info): Source.parse(source).load()."""
    return Source.parse(source).load()


def probe_config_for(source: str | Source, **options: Any) -> ProbeConfig:
    """The one place a probe's config is completed from its SOURCE: the options over what SOURCE was trained on (its
    dataset, which selects the preset of that name, and its input size), resolved; a ValueError names the option
    neither gives."""
    source = source if isinstance(source, Source) else Source.parse(source)
    config = resolve_probe_config(trained_on=source.trained_on(), **options)
    if config.dataset is not None:
        check_dataset_spec(config.dataset, config.data_root)  # one that names nothing: refused now, as in train
        config = absolute_folders(config)
    if config.dataset is None:
        raise OptionError(
            f"--dataset: SOURCE {source.text} does not record a dataset it was trained on that can be read here; "
            "pass --dataset"
        )
    if config.image_size is None:
        raise OptionError(f"--image-size: SOURCE {source.text} records no input size; pass --image-size")
    return config
