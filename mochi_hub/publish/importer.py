"""`mochi import`: another project's checkpoint -> the timm folder `mochi export` writes.

    CHECKPOINT --read_checkpoint--> a dict --split_checkpoint--> backbone, head, the rest (reported, dropped)
               --fit_backbone--> timm.create_model(arch, num_classes=0), loaded strictly --> write_timm_folder

Layouts read (the file says which; nothing in it is run):
- MoCo / MoCHi (facebookresearch/moco's main_moco.py): {"epoch", "arch", "state_dict", "optimizer"}; the state dict
  holds `module.encoder_q.*` under DistributedDataParallel, `encoder_q.*` without it; `encoder_q.fc` is the
  projection head (`fc.0`, `fc.2` with --mlp); `encoder_k.*`, `queue`, `queue_ptr` are the key encoder and queue.
- Lightning (lightly, solo-learn): {"state_dict": {"backbone.*", "projection_head.*" or "projector.*", momentum
  copies, queue}, "optimizer_states", "hyper_parameters", ...}; lightly's backbone is an nn.Sequential of the
  torchvision ResNet's children, so its keys are numbered (`backbone.4.0.conv1.weight` is `layer1.0.conv1.weight`).
- A network's own state dict (torchvision, timm), in a .pth or a .safetensors file, perhaps under "state_dict" or
  "model"; its classifier is dropped.

Safety: torch.load(weights_only=True) rebuilds tensors and plain containers only. A file that needs more (any
other Python object: a pickled argparse.Namespace, or a code payload) is refused unless `allow_unsafe_pickle`, which
warns and then runs torch.load(weights_only=False): only for files whose origin the user trusts.

Exactness: every backbone tensor must find its place in timm's architecture with the same shape, and every place
must be filled, the classifier excepted (main_lincls.py asserts the same of MoCo's weights). Nothing is written
until all checks pass; the folder is written next to --output and renamed into place.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from mochi_hub.config import check_mochi_settings
from mochi_hub.core.persist import publish, read_json, save_tensors, staging
from mochi_hub.errors import InputError, OptionError
from mochi_hub.method.model import backbone_args, create_backbone, structural_args
from mochi_hub.publish.card import PAPER_ID, PAPER_NAME, method_name, redact_local_paths
from mochi_hub.publish.export import CONFIG, HEAD, network_info, timm_keys, write_timm_folder
from mochi_hub.publish.sources import weights_sha256
from mochi_hub.version import __version__

log = logging.getLogger(__name__)

UNKNOWN_LICENSE = "unknown"  # the Hub's identifier for "not stated"; the card tells the user to check the source
# Architectures tried, in this order, when neither --arch nor the file names one: torchvision's ResNets, which timm
# builds under the same names and parameter names.
RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
# Method names as users type them -> as the card prints them, with the paper that defines each.
METHODS = {"mochi": "MoCHi", "moco-v2": "MoCo-v2", "mocov2": "MoCo-v2", "moco": "MoCo", "moco-v1": "MoCo"}
PAPERS = {
    "MoCHi": (PAPER_ID, PAPER_NAME),
    "MoCo-v2": ("arXiv:2003.04297", "Improved Baselines with Momentum Contrastive Learning"),
    "MoCo": ("arXiv:1911.05722", "Momentum Contrast for Unsupervised Visual Representation Learning"),
}

ZIP_MAGIC = b"PK\x03\x04"  # torch.save since PyTorch 1.6
LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save before 1.6 pickles this number first


class CheckpointImportError(InputError):
    """A checkpoint that cannot be imported as asked; the one-line message says why and which option helps."""


@dataclass(frozen=True)
class Quote:
    """A figure published for the checkpoint, shown on the card as quoted, never as measured here."""

    metric: str
    value: float
    source: str

    @classmethod
    def parse(cls, text: str, source: str | None) -> Quote:
        """--quote 'METRIC=VALUE' with --quote-source."""
        metric, _, value = text.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not metric.strip() or number is None or not math.isfinite(number):
            raise OptionError(f"--quote takes METRIC=VALUE, e.g. 'ImageNet-1K linear top-1 (%)=68.0'; got {text!r}")
        if not source:
            raise OptionError("--quote needs --quote-source: where the figure was published")
        return cls(metric.strip(), number, source)


@dataclass(frozen=True)
class Declared:
    """What the user states about the weights (`mochi import` options); the card shows it as stated."""

    method: str | None = None  # mochi | moco-v2 | moco, or another method's name
    mochi: tuple[int, int, int] | None = None
    epochs: int | None = None
    dataset: str | None = None  # what it was pretrained on (a name or Hub id)
    source_url: str | None = None
    license: str = UNKNOWN_LICENSE
    quoted: tuple[Quote, ...] = ()

    def method_label(self) -> str | None:
        """'MoCHi', 'MoCo-v2', 'MoCo', another name as given, or None; checked against --mochi."""
        given = METHODS.get(self.method.lower(), self.method) if self.method else None
        if self.mochi is None:
            return given
        check_mochi_settings(*self.mochi)
        implied = method_name(self.mochi)
        if given and given != implied:
            raise OptionError(
                f"--method {self.method} contradicts --mochi {','.join(map(str, self.mochi))}, which is {implied}"
            )
        return implied

    def stated(self, arch: str | None = None) -> dict[str, Any]:
        """The options the user gave, as given (the card tells stated from read)."""
        given = {
            "method": self.method,
            "mochi": list(self.mochi) if self.mochi else None,
            "epochs": self.epochs,
            "dataset": self.dataset,
            "arch": arch,
        }
        return {k: v for k, v in given.items() if v is not None}


@dataclass
class Part:
    """One group of the checkpoint's entries, as reported: what it is, where it was, and whether it was kept."""

    what: str
    where: str
    tensors: int
    kept: bool

    def line(self) -> str:
        count = f"{self.tensors} tensors" if self.tensors else ""
        return f"{'kept' if self.kept else 'dropped':<8} {self.what:<24} {count:>12}  ({self.where})"


@dataclass
class Split:
    """A checkpoint taken apart: the backbone under the source network's names, the projection head, the rest."""

    layout: str
    backbone: dict[str, Tensor]
    head: dict[str, Tensor] = field(default_factory=dict)
    head_prefix: str = ""
    parts: list[Part] = field(default_factory=list)
    from_file: dict[str, Any] = field(default_factory=dict)  # arch, epoch, hyperparameters the file records


@dataclass
class ImportReport:
    output: Path
    architecture: str
    layout: str
    sha256: str
    parts: list[Part]
    from_file: dict[str, Any]
    notes: list[str]
    loaded_with: str


# ------------------------------------------------------------------------------------------------ reading


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    return len(head) > 8 and head[8:9] == b"{" and 8 < int.from_bytes(head[:8], "little") < size


SAFE_LOAD = "torch.load(weights_only=True)"
UNSAFE_LOAD = "torch.load(weights_only=False), allowed by --allow-unsafe-pickle"


def read_checkpoint(path: Path, *, allow_unsafe_pickle: bool = False) -> tuple[Any, str]:
    """(the checkpoint's content, how it was read), read without running anything in it unless the safe load
    refused the file and `allow_unsafe_pickle` is set (see the module's docstring)."""
    name = path.name
    if not path.is_file():
        raise CheckpointImportError(f"CHECKPOINT {path}: {'not a file' if path.exists() else 'no such file'}")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(64)
    if _is_safetensors(head, size):
        try:
            return load_file(path), "safetensors"
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointImportError(
                f"CHECKPOINT {name}: a truncated or damaged safetensors file ({error})"
            ) from None
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise CheckpointImportError(
                f"CHECKPOINT {name}: truncated or damaged ({size} bytes; a torch.save zip archive without its "
                "end): download it again"
            )
    elif LEGACY_MAGIC not in head[:32]:
        raise CheckpointImportError(
            f"CHECKPOINT {name}: not a checkpoint (neither a file torch.save wrote nor safetensors; "
            f"it starts with {head[:8]!r})"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True), SAFE_LOAD
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise CheckpointImportError(f"CHECKPOINT {name}: truncated or damaged ({_first_line(error)})") from None
        if not allow_unsafe_pickle:
            found = re.search(r"GLOBAL ([\w.]+)", str(error)) or re.search(r"(Unsupported operand \d+)", str(error))
            what = found.group(1) if found else "objects other than tensors"
            raise CheckpointImportError(
                f"CHECKPOINT {name} holds Python objects ({what}) that only full unpickling rebuilds, and "
                "unpickling can run any code in the file: refused. If you trust where the file comes from, "
                "pass --allow-unsafe-pickle"
            ) from None
    except Exception as error:  # the safe unpickler ran nothing: whatever failed, the file is damaged
        raise CheckpointImportError(
            f"CHECKPOINT {name}: truncated or damaged ({size} bytes; {_first_line(error)})"
        ) from None
    return _unsafe_load(path), UNSAFE_LOAD


def _unsafe_load(path: Path) -> Any:
    """--allow-unsafe-pickle: the file's own pickle, run as is. Only reached after the safe load refused it."""
    log.warning(
        "--allow-unsafe-pickle: unpickling %s with torch.load(weights_only=False), which runs any code the file "
        "holds; do this only for files you trust",
        path.name,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointImportError(f"CHECKPOINT {path.name}: unreadable ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# ------------------------------------------------------------------------------------------------ layouts


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(torch.is_tensor(v) for v in value.values())


def _count(state: Mapping[str, Tensor], prefix: str) -> int:
    return sum(1 for k in state if k.startswith(prefix))


def _take(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove and return the entries under `prefix`, with the prefix stripped."""
    taken = {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
    return taken


# Lightning modules (lightly, solo-learn) name their parts freely; these are the names their examples use.
LIGHTNING_HEADS = ("projection_head.", "projector.")
LIGHTNING_DROPPED = (
    ("key encoder (momentum)", ("backbone_momentum.", "momentum_backbone.")),
    ("key encoder's head", ("projection_head_momentum.", "momentum_projector.")),
    ("queue", ("queue", "criterion.memory_bank.", "memory_bank.")),
    ("online classifier", ("classifier.",)),
)


def split_checkpoint(content: Any, classifier: Sequence[str] = ("fc",)) -> Split:
    """Find the layout (see the module's docstring) and take the checkpoint apart. `classifier`: the names of the
    network's classifier (timm's pretrained_cfg "classifier"), dropped from a plain state dict."""
    if not isinstance(content, Mapping):
        raise CheckpointImportError(f"CHECKPOINT holds a {type(content).__name__}, not a dict of weights")
    if _is_state_dict(content):
        state, outer = dict(content), {}
    else:
        inner = next((k for k in ("state_dict", "model") if _is_state_dict(content.get(k))), None)
        if inner is None:
            keys = ", ".join(map(str, list(content)[:12]))
            raise CheckpointImportError(
                f"CHECKPOINT: unknown layout; found the keys {keys} (expected a MoCo checkpoint, a Lightning "
                "checkpoint, or a network's state dict, perhaps under 'state_dict' or 'model')"
            )
        state, outer = dict(content[inner]), {k: v for k, v in content.items() if k != inner}
    ddp = "module." if all(k.startswith("module.") for k in state) else ""
    if ddp:
        state = {k[len(ddp) :]: v for k, v in state.items()}

    if _count(state, "encoder_q."):
        split = _split_moco(state, ddp)
    elif _count(state, "backbone."):
        split = _split_lightning(state)
    else:
        split = _split_network(state, ddp, classifier)
    split.parts += _outer_parts(outer)
    split.from_file = _file_info(outer)
    return split


def _split_moco(state: dict[str, Tensor], ddp: str) -> Split:
    query = _take(state, "encoder_q.")
    head = _take(query, "fc.")
    parts = [
        Part("backbone", f"{ddp}encoder_q.* without fc", len(query), True),
        Part("projection head", f"{ddp}encoder_q.fc.*", len(head), False),
    ]
    if key := _take(state, "encoder_k."):
        parts.append(Part("key encoder", f"{ddp}encoder_k.*", len(key), False))
    if queue := [k for k in ("queue", "queue_ptr") if state.pop(k, None) is not None]:
        parts.append(Part("queue", ", ".join(ddp + k for k in queue), len(queue), False))
    parts += [Part("other", ddp + k, 1, False) for k in sorted(state)]
    layout = "MoCo (main_moco.py" + (", DistributedDataParallel)" if ddp else ", one process)")
    return Split(layout, query, head, f"{ddp}encoder_q.fc.", parts)


def _split_lightning(state: dict[str, Tensor]) -> Split:
    backbone = _take(state, "backbone.")
    head_prefix = next((p for p in LIGHTNING_HEADS if _count(state, p)), "")
    head = _take(state, head_prefix) if head_prefix else {}
    parts = [Part("backbone", "backbone.*", len(backbone), True)]
    if head:
        parts.append(Part("projection head", f"{head_prefix}*", len(head), False))
    for what, prefixes in LIGHTNING_DROPPED:
        for prefix in prefixes:
            if taken := _take(state, prefix):
                parts.append(Part(what, f"{prefix}*" if prefix.endswith(".") else prefix, len(taken), False))
    parts += [Part("other", k, 1, False) for k in sorted(state)]
    numbered = all(k.split(".", 1)[0].isdigit() for k in backbone)
    layout = "Lightning (backbone.*" + (", an nn.Sequential of the network's children)" if numbered else ")")
    return Split(layout, backbone, head, head_prefix, parts)


def _split_network(state: dict[str, Tensor], ddp: str, classifier: Sequence[str]) -> Split:
    parts = []
    for name in classifier:
        if taken := _take(state, f"{name}."):
            outputs = next((int(t.shape[0]) for k, t in taken.items() if k.endswith("weight")), None)
            parts.append(Part(f"classifier ({outputs} classes)", f"{ddp}{name}.*", len(taken), False))
    parts.insert(0, Part("backbone", f"{ddp}* without the classifier", len(state), True))
    return Split("a network's state dict" + (" (DistributedDataParallel)" if ddp else ""), state, parts=parts)


# Top-level entries beside the weights: what they are called in main_moco.py, Lightning and timm's train.py.
OUTER = {
    "optimizer": "optimizer",
    "optimizer_states": "optimizer",
    "lr_schedulers": "learning-rate scheduler",
    "scheduler": "learning-rate scheduler",
    "state_dict_ema": "EMA weights",
    "model_ema": "EMA weights",
    "callbacks": "Lightning callbacks",
    "loops": "Lightning loop state",
}
FILE_INFO = ("arch", "epoch", "global_step", "pytorch-lightning_version", "version")


def _outer_parts(outer: Mapping[str, Any]) -> list[Part]:
    return [Part(OUTER[k], k, 0, False) for k in outer if k in OUTER]


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def _file_info(outer: Mapping[str, Any]) -> dict[str, Any]:
    """What the file says of itself that a card can show: arch, epoch, and scalar hyperparameters."""
    info = {k: outer[k] for k in FILE_INFO if k in outer and _scalar(outer[k])}
    for key in ("hyper_parameters", "args"):  # Lightning's save_hyperparameters(); an argparse.Namespace
        value = outer.get(key)
        settings = vars(value) if hasattr(value, "__dict__") and not isinstance(value, Mapping) else value
        if isinstance(settings, Mapping):
            kept = {str(k): v for k, v in settings.items() if _scalar(v)}
            if kept:
                info[key] = kept
    return info


# ----------------------------------------------------------------------------------- fitting timm's network


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    return (names,) if isinstance(names, str) else tuple(names)


def _by_child_names(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """lightly's nn.Sequential(*resnet.children()[:-1]) numbers the children: '4.0.conv1.weight' -> 'layer1.0...'."""
    children = [name for name, _ in model.named_children()]
    renamed = {}
    for key, tensor in state.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or int(index) >= len(children):
            return dict(state)
        renamed[f"{children[int(index)]}.{rest}"] = tensor
    return renamed


def _differences(state: Mapping[str, Tensor], model: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """(shapes that differ, places the file does not fill, entries with no place); a BatchNorm's step counter
    (num_batches_tracked) may be absent, as in files from before PyTorch 0.4.1."""
    expected = model.state_dict()
    shapes = [
        f"{k} (file {list(state[k].shape)}, model {list(expected[k].shape)})"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    return shapes, missing, unexpected


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def infer_architecture(backbone: Mapping[str, Tensor]) -> str | None:
    """The one torchvision-named ResNet whose every parameter the backbone fills with the right shape, if any."""
    for name in RESNETS:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = create_backbone(name)
        if not any(_differences(_by_child_names(backbone, model), model)):
            return name
    return None


def fit_backbone(backbone: Mapping[str, Tensor], architecture: str, model_args: Mapping[str, Any]) -> nn.Module:
    """timm's `architecture` (num_classes=0) holding exactly these tensors, or a one-line error naming what differs."""
    model = create_backbone(architecture, **model_args)
    state = _by_child_names(backbone, model)
    shapes, missing, unexpected = _differences(state, model)
    if shapes or missing or unexpected:
        found = [
            f"{len(shapes)} shapes differ: {_few(shapes)}" if shapes else "",
            f"{len(missing)} weights missing: {_few(missing)}" if missing else "",
            f"{len(unexpected)} entries timm's {architecture} has no place for: {_few(unexpected)}"
            if unexpected
            else "",
        ]
        raise CheckpointImportError(
            f"CHECKPOINT does not fit timm's {architecture}: {'; '.join(f for f in found if f)} "
            "(pass --arch with the network it was trained with)"
        )
    model.load_state_dict(state, strict=False)  # strict in effect: only num_batches_tracked may be absent above
    return model.eval()


def named_architecture(content: Any, arch: str | None) -> tuple[str | None, list[str]]:
    """(--arch, else the architecture the file names (MoCo's "arch"), else None; notes), checked against timm."""
    notes = []
    named = content.get("arch") if isinstance(content, Mapping) and isinstance(content.get("arch"), str) else None
    if arch and named and arch != named:
        notes.append(f"--arch {arch} overrides the file's arch {named!r}")
    if arch or named:
        try:
            backbone_args(arch or named, init="timm")  # a known timm name, or the closest ones
        except ValueError as error:
            raise CheckpointImportError(
                str(error).replace("--model", "--arch" if arch else "the file's arch")
            ) from None
    return arch or named, notes


# ------------------------------------------------------------------------------------------------ results


def read_measured_results(paths: Iterable[Path], sha256: str) -> tuple[list[dict], list[dict]]:
    """(probe results, detection results) from `mochi probe --output` / `mochi detect` JSON files, each measured
    on these very weights (its weights_sha256), so the card never shows another model's number."""
    probes, detections = [], []
    for path in paths:
        try:
            record = read_json(path)
        except ValueError as error:
            raise CheckpointImportError(f"--results {error}") from None
        measured = (record.get("source_info") or {}).get("weights_sha256") if isinstance(record, dict) else None
        if not isinstance(record, dict) or not ("top1" in record or "AP" in record) or not measured:
            raise CheckpointImportError(f"--results {path}: not a result file of `mochi probe` or `mochi detect`")
        if measured != sha256:
            raise CheckpointImportError(
                f"--results {path}: measured on other weights (sha256 {measured[:12]}...), not on these "
                f"({sha256[:12]}...)"
            )
        (probes if "top1" in record else detections).append(redact_local_paths(record))
    return probes, detections


# ------------------------------------------------------------------------------------------------- import


def head_module(head: Mapping[str, Tensor]) -> str | None:
    """The torch module MoCo's projection head loads into (a Linear; with --mlp Linear, ReLU, Linear), as code."""
    if set(head) == {"weight", "bias"} and head["weight"].ndim == 2:
        return "nn.Linear({1}, {0})".format(*head["weight"].shape)
    if set(head) == {"0.weight", "0.bias", "2.weight", "2.bias"}:
        first, second = head["0.weight"].shape, head["2.weight"].shape
        return f"nn.Sequential(nn.Linear({first[1]}, {first[0]}), nn.ReLU(), nn.Linear({second[1]}, {second[0]}))"
    return None


def _check_output(output: Path) -> None:
    """--output: absent, empty, or a folder `mochi import`/`mochi export` wrote (it is replaced as a whole)."""
    if output.exists() and not output.is_dir():
        raise OptionError(f"--output {output}: is a file, not a folder")
    if output.is_dir() and any(output.iterdir()):
        try:
            ours = "mochi_hub_version" in read_json(output / CONFIG)
        except ValueError:
            ours = False
        if not ours:
            raise OptionError(
                f"--output {output}: a folder with other files in it; give a new or empty folder (one that "
                "`mochi import` or `mochi export` wrote is replaced)"
            )


def import_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    arch: str | None = None,
    image_size: int = 224,
    keep_head: bool = False,
    allow_unsafe_pickle: bool = False,
    declared: Declared = Declared(),
    results: Sequence[str | Path] = (),
) -> ImportReport:
    """Import CHECKPOINT into `output` as a timm folder (see the module's docstring); returns what was done."""
    checkpoint, output = Path(checkpoint).expanduser(), Path(output).expanduser()
    method = declared.method_label()
    _check_output(output)
    content, loaded_with = read_checkpoint(checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
    architecture, notes = named_architecture(content, arch)
    classifier = _classifier_names(create_backbone(architecture)) if architecture else ("fc",)
    split = split_checkpoint(content, classifier)
    if architecture is None:
        architecture = infer_architecture(split.backbone)
        if architecture is None:
            raise CheckpointImportError(
                f"CHECKPOINT does not say its architecture and fits none of {', '.join(RESNETS)}: pass --arch "
                "(a timm model name)"
            )
        notes.append(f"architecture {architecture}: not named in the file, the one whose every weight it fills")
    if keep_head and not split.head:
        dropped = [p.where for p in split.parts if not p.kept] or ["nothing beside the backbone"]
        raise CheckpointImportError(f"--keep-head: CHECKPOINT has no projection head ({split.layout}: {_few(dropped)})")
    model_args = structural_args(backbone_args(architecture, init="timm", image_size=image_size))
    backbone = fit_backbone(split.backbone, architecture, model_args)
    probes, detections = read_measured_results([Path(p) for p in results], weights_sha256(backbone))
    for part in split.parts:
        part.kept |= keep_head and part.what == "projection head"

    epochs = declared.epochs
    if epochs is None and split.layout.startswith("MoCo") and isinstance(split.from_file.get("epoch"), int):
        epochs = split.from_file["epoch"]
        notes.append(f"epochs {epochs}: the file's 'epoch' (main_moco.py saves the number of epochs completed)")
    hf_config = {
        **timm_keys(
            backbone,
            architecture,
            image_size,
            license=declared.license,
            description=_description(architecture, checkpoint.name, method, declared, epochs),
            paper=PAPERS.get(method or ""),
            model_args=model_args,
        ),
        "method": method,
        "mochi": list(declared.mochi) if declared.mochi else None,
        "epochs": epochs,
        "dataset": redact_local_paths(declared.dataset),
        **network_info(backbone),
        "provenance": {
            "file": checkpoint.name,
            "sha256": file_sha256(checkpoint),
            "size_bytes": checkpoint.stat().st_size,
            "source_url": declared.source_url,
            "layout": split.layout,
            "loaded_with": loaded_with,
            "from_file": redact_local_paths(split.from_file),
            "declared": redact_local_paths(declared.stated(arch)),
            "kept": [asdict(p) for p in split.parts if p.kept],
            "dropped": [asdict(p) for p in split.parts if not p.kept],
            "notes": notes,
            "imported_with": f"mochi-hub {__version__}",
        },
        "projection_head": {
            "file": HEAD,
            "from": f"{split.head_prefix}*",
            "module": head_module(split.head),
            "shapes": {k: list(t.shape) for k, t in split.head.items()},
        }
        if keep_head
        else None,
        "quoted_results": [asdict(q) for q in declared.quoted],
        "probe_results": probes,
        "detection_results": detections,
        "mochi_hub_version": __version__,
    }
    _write_folder(output, backbone, hf_config, split.head if keep_head else None)
    provenance = hf_config["provenance"]
    return ImportReport(
        output, architecture, split.layout, provenance["sha256"], split.parts, split.from_file, notes, loaded_with
    )


def _description(architecture: str, file: str, method: str | None, declared: Declared, epochs: int | None) -> str:
    """pretrained_cfg's one-line description: what the weights are, as far as anyone said."""
    settings = f"{method} {tuple(declared.mochi)}" if method and declared.mochi else method or "method not stated"
    return (
        f"{architecture} backbone imported from {file} ({settings}"
        + (f", {epochs} epochs" if epochs else "")
        + (f", pretrained on {redact_local_paths(declared.dataset)}" if declared.dataset else "")
        + "); backbone only"
    )


def _write_folder(output: Path, backbone: nn.Module, hf_config: dict[str, Any], head: dict | None) -> None:
    """Write the folder as OUTPUT.tmp/ and rename it into place (persist's state folders): a failure on the way
    leaves no half-written OUTPUT."""
    shutil.rmtree(output.with_name(output.name + ".tmp"), ignore_errors=True)  # an earlier, interrupted import
    try:
        with staging(output) as tmp:
            write_timm_folder(backbone, hf_config, tmp)
            if head is not None:
                save_tensors(tmp / HEAD, head, metadata={"format": "pt"})
        publish(output)
    except OSError as error:
        raise CheckpointImportError(f"--output {output}: not writable ({error.strerror or error})") from None
