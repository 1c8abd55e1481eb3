"""Format conversions of a ResNet-family backbone: torchvision's state dict names, detectron2's `.pkl`.

MoCo's detection transfer (detectron2 R50-C4 / FPN on VOC and COCO) loads the `.pkl`; detectron2 is not on
PyPI, so this module only writes the file and the notes on how to use it (mochi_hub.evaluate.detect trains
torchvision's Faster R-CNN directly on the timm backbone).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mochi_hub.core.persist import atomic_write, save_tensors
from mochi_hub.data.augment import MEAN, STD
from mochi_hub.errors import InputError
from mochi_hub.publish.card import PAPER_ID, RESNET_FAMILY

DETECTRON2_FILE = "model_detectron2.pkl"


class ConversionError(InputError):
    """A backbone that has no counterpart in the asked format; the message says why."""


def torchvision_state_dict(backbone: nn.Module, architecture: str) -> dict[str, torch.Tensor]:
    """The backbone's weights under torchvision's names (timm's ResNets use the same ones), checked key by
    key and shape by shape against `torchvision.models.<architecture>()` without its `fc` layer."""
    import torchvision

    if not architecture.startswith(RESNET_FAMILY):
        raise ConversionError(
            f"--format torchvision/detectron2 needs a ResNet-family backbone "
            f"(resnet18/34/50/101/152, resnext, wide_resnet), got {architecture!r}"
        )
    if architecture not in torchvision.models.list_models(module=torchvision.models):
        raise ConversionError(
            f"torchvision has no architecture named {architecture!r}: timm's variant has no "
            "torchvision counterpart (e.g. resnet50d's deep stem); use --format timm"
        )
    with torch.device("meta"):  # shapes only, no memory
        reference = torchvision.models.get_model(architecture, weights=None)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    ours = {k: v for k, v in backbone.state_dict().items()}
    mismatched = sorted(set(expected) ^ set(ours)) + sorted(
        k for k in set(expected) & set(ours) if expected[k] != tuple(ours[k].shape)
    )
    if mismatched:
        raise ConversionError(
            f"timm's {architecture} does not match torchvision's layout "
            f"({len(mismatched)} keys differ, e.g. {mismatched[:3]}); use --format timm"
        )
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
  PIXEL_MEAN: [{pixel_mean}]
  PIXEL_STD: [{pixel_std}]
  RESNETS:
    DEPTH: {depth}
    STRIDE_IN_1X1: False   # torchvision/timm ResNets stride in the 3x3 conv{basic_block}
INPUT:
  FORMAT: "RGB"
```
"""
# detectron2's build_resnet_backbone asserts RES2_OUT_CHANNELS == 64 for its BasicBlock ResNets; its C4 box head
# (Res5ROIHeads) builds bottleneck blocks, so those depths take an FPN config.
BASIC_BLOCK = """
    RES2_OUT_CHANNELS: 64  # ResNet-18/34 (BasicBlock): detectron2 requires it; use an FPN config, not C4"""

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

LICENSE_NOTE = "\nLicense of the weights: {license}.\n"


def write_torchvision(
    state: dict[str, torch.Tensor],
    architecture: str,
    output: Path,
    name: str,
    license: str | None = None,
    paper: str | None = PAPER_ID,
) -> Path:
    target = output / f"torchvision_{architecture}.safetensors"
    metadata = {"format": "pt", "torchvision_architecture": architecture, "paper": paper, "license": license}
    save_tensors(target, state, metadata={k: v for k, v in metadata.items() if v})
    notes = TORCHVISION_NOTES.format(name=name, file=target.name, arch=architecture, mean=MEAN, std=STD)
    notes += LICENSE_NOTE.format(license=license) if license else ""
    atomic_write(output / "README.md", lambda p: p.write_text(notes))
    return target


def _pixels(values: tuple[float, ...]) -> str:
    """ImageNet's mean or std in detectron2's units: 0-255 pixel values (123.675, 116.280, 103.530)."""
    return ", ".join(f"{255 * v:.3f}" for v in values)


def write_detectron2(
    state: dict[str, torch.Tensor], architecture: str, output: Path, name: str, license: str | None = None
) -> Path:
    target = output / DETECTRON2_FILE
    converted = to_detectron2(state)

    def write_pickle(path: Path) -> None:
        with open(path, "wb") as handle:
            pickle.dump(converted, handle)  # detectron2's own format; we only ever write it, never read it

    atomic_write(target, write_pickle)
    depth = "".join(ch for ch in architecture.split("_")[0] if ch.isdigit()) or "50"
    pixels = dict(pixel_mean=_pixels(MEAN), pixel_std=_pixels(STD))
    basic_block = BASIC_BLOCK if depth in ("18", "34") else ""
    notes = DETECTRON2_NOTES.format(name=name, file=target.name, depth=depth, basic_block=basic_block, **pixels)
    notes += LICENSE_NOTE.format(license=license) if license else ""
    atomic_write(output / "README.md", lambda p: p.write_text(notes))
    return target
