"""`mochi detect`: fine-tune torchvision's Faster R-CNN + FPN on a timm backbone and report COCO box AP.

    SOURCE -> load_backbone -> timm features at strides 4..32 (C2..C5) -> FPN (+ max-pooled P6) -> Faster R-CNN
           -> SGD on DIR/train, a state per epoch -> predictions on DIR/val -> box AP (coco.evaluate_boxes)
           -> OUTPUT/results.json (+ RUN/detection/<name>.json for a run directory, which `mochi export` cards)

- The feature maps are timm's own `features_only` maps: the loaded backbone's public `forward_intermediates` (its
  pool and head pruned) gives the same tensors as `timm.create_model(..., features_only=True, out_indices=(1, 2, 3,
  4))` for a ResNet, for every way SOURCE can come (a run's checkpoint has no timm folder to re-create from).
- BatchNorm, as MoCo's detection transfer ("feature normalization", He et al. 2020): every stage trains and
  normalises with its batch's statistics (--batch-norm auto: SyncBatchNorm over several GPU processes, else per
  process), and the new layers are normalised too (BatchNorm in the FPN and a 4-conv + 1-fc box head, torchvision's
  Faster R-CNN v2 heads). A self-supervised backbone's running statistics describe its pretraining data: on a
  small set of 128 px colour photos, the frozen statistics of a 32 px Fashion-MNIST run left C5's activations at
  std 29 (1.0 with batch statistics) and the loss reached 1e16 within 25 steps. --batch-norm frozen
  (FrozenBatchNorm, no norm in the new layers: torchvision's default for supervised weights) stays an option.
  The backbone's stages that do not train are always frozen (`timm.layers.freeze_batch_norm_2d`).
- A non-finite loss rolls the detector back to the start of its epoch with the learning rate halved, at most
  MAX_ROLLBACKS times, then stops with one line; the results say how often and from where.
- The detector normalises with the mean/std the backbone's weights declare (torchvision's default is ImageNet's).
- Determinism: the data order, the flips, and every draw inside the detector (the RPN's and RoI heads' box
  sampling use torch's global generator) come from seeds at (seed, epoch), so a run resumed from an epoch's
  state ends with the weights of an uninterrupted one.

The per-epoch states, the result's name and envelope are job.py's (shared with probe).

This is a torchvision approximation of a detection transfer, not the MoCo/MoCHi paper's detectron2 protocol
(R50-C4, VOC07+12, SyncBN, 24k iterations): see the README's "Detection" section.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mochi_hub.config import DetectConfig, resume_settings
from mochi_hub.core import persist
from mochi_hub.core.console import progress_bar
from mochi_hub.core.distributed import all_ranks_true, launched_accelerator
from mochi_hub.core.memory import Need, check_fits
from mochi_hub.core.seeding import stream_seed
from mochi_hub.data.augment import MEAN, STD
from mochi_hub.data.sampling import GlobalBatches, subset
from mochi_hub.errors import DiskFullError, OptionError, UserError
from mochi_hub.evaluate.coco import (
    CocoSplit,
    DetectionImages,
    collate,
    evaluate_boxes,
    evaluator,
    load_dataset,
    to_coco_detections,
)
from mochi_hub.evaluate.job import STATE_PREFIX, EpochStates, Job, slug
from mochi_hub.evaluate.job import result_name as job_result_name
from mochi_hub.method.model import forward_sizes
from mochi_hub.publish.sources import load_backbone
from mochi_hub.training.runs import DETECTION

log = logging.getLogger(__name__)

STRIDES = (4, 8, 16, 32)  # C2..C5: what torchvision's FPN and its five default anchor sizes expect (+ P6)
MAX_SIZE_RATIO = 1333 / 800  # torchvision's max_size / min_size
WARMUP_FACTOR = 0.001  # torchvision's reference: the warm-up starts at 0.1 % of the lr
MAX_ROLLBACKS = 3  # a non-finite loss: back to the epoch's start with half the lr, at most this often
RESULTS = "results.json"
STATES = "state"  # OUTPUT/state/epoch-N: the per-epoch states (job.EpochStates)
DETECTIONS = "detections.json"  # the val predictions in COCO's results format: any COCO tool can re-score them
WEIGHTS = "detector.safetensors"
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
DETECTOR = "torchvision Faster R-CNN + FPN (LastLevelMaxPool), timm features_only C2-C5"


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the message says where and what to change."""


# --- the model ---------------------------------------------------------------------------------------------


def feature_indices(backbone: nn.Module) -> list[int]:
    """The backbone's feature_info entries at strides 4, 8, 16, 32 (the last of each): (1, 2, 3, 4) for a ResNet."""
    info = getattr(backbone, "feature_info", None)
    reductions = [int(f["reduction"]) for f in info] if info else []
    missing = [s for s in STRIDES if s not in reductions]
    if missing or not hasattr(backbone, "forward_intermediates"):
        name = type(backbone).__name__
        raise OptionError(
            f"SOURCE: a {name} has no feature maps at strides {', '.join(map(str, STRIDES))} that timm can return "
            f"(feature strides: {reductions or 'none'}); an FPN needs a hierarchical CNN such as a ResNet"
        )
    return [max(i for i, r in enumerate(reductions) if r == s) for s in STRIDES]


def parameter_stages(backbone: nn.Module) -> dict[str, int]:
    """Parameter name -> the feature_info stage it computes: a parameter inside a stage's module is that stage's;
    one between stages (a ResNet's stem conv, an EfficientNet's unlisted blocks) belongs to the next stage."""
    modules = [str(f["module"]) for f in backbone.feature_info]
    stages, last = {}, -1
    for name, _ in backbone.named_parameters():
        inside = [i for i, m in enumerate(modules) if name.startswith(m + ".")]
        if inside:
            last = inside[0]
        stages[name] = inside[0] if inside else last + 1
    return stages


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def prepare_backbone(backbone: nn.Module, *, trainable_layers: int | None, batch_norm: str) -> dict[str, Any]:
    """In place: freeze all but the last `trainable_layers` stages (None: none frozen), and freeze BatchNorm outside
    them (and inside them when --batch-norm is frozen). Returns what was frozen, for the results."""
    stages = parameter_stages(backbone)
    count = len(backbone.feature_info)
    trainable_layers = count if trainable_layers is None else trainable_layers
    if trainable_layers > count:
        raise OptionError(f"--trainable-layers {trainable_layers}: this backbone has {count} stages (0..{count})")
    first = count - trainable_layers  # stages >= first train
    trains = {name for name, stage in stages.items() if stage >= first}
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad_(name in trains)
    frozen_bn = 0
    for name, module in list(backbone.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            trained = f"{name}.weight" in trains if module.affine else False
            if batch_norm == "frozen" or not trained:
                _set_module(backbone, name, freeze_batch_norm_2d(module))
                frozen_bn += 1
    return {
        "stages": count,
        "trainable_layers": trainable_layers,
        "trainable_backbone_parameters": sum(p.numel() for p in backbone.parameters() if p.requires_grad),
        "frozen_batchnorm_layers": frozen_bn,
    }


class TimmFPN(nn.Module):
    """timm feature maps C2..C5 -> torchvision's FeaturePyramidNetwork -> {"0", "1", "2", "3", "pool"}, each
    `out_channels` wide: the backbone interface torchvision's detectors take."""

    def __init__(self, backbone: nn.Module, out_channels: int, norm_layer: type[nn.Module] | None = None):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        indices = feature_indices(backbone)
        channels = [int(backbone.feature_info[i]["num_chs"]) for i in indices]
        self.indices = backbone.prune_intermediate_layers(indices)  # drops the pool and head
        self.body = backbone
        # Named "0".."3": the default RoI pooler reads those four; LastLevelMaxPool adds "pool" for the 5th anchor size.
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer)
        self.out_channels = out_channels

    def features(self, images: Tensor) -> list[Tensor]:
        """C2..C5: 4 x [B, C_i, H / s_i, W / s_i], timm's features_only maps."""
        return self.body.forward_intermediates(images, indices=self.indices, intermediates_only=True)

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.features(images)  # 4 x [B, C_i, H / s_i, W / s_i]
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))  # 5 x [B, out_channels, ...]


def resolved_batch_norm(mode: str, num_processes: int, device_type: str) -> str:
    """--batch-norm auto as MoCo's detection transfer: SyncBatchNorm over several GPU processes, else each process's
    batch statistics; any other mode as given."""
    if mode != "auto":
        return mode
    return "sync" if num_processes > 1 and device_type == "cuda" else "train"


def build_detector(
    backbone: nn.Module, info: dict[str, Any], num_classes: int, config: DetectConfig
) -> tuple[nn.Module, dict[str, Any]]:
    """Faster R-CNN (torchvision's defaults: anchors 32..512, 3 ratios, 0.05 score threshold, 100 boxes an
    image) on the backbone; heads initialised from (seed, "detect_init"). num_classes counts the categories.
    With trained BatchNorm the new layers are normalised too: BatchNorm in the FPN and torchvision's v2 heads
    (a 2-conv RPN head, a 4-conv + 1-fc box head with BatchNorm), widths scaled with --fpn-channels."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, RPNHead

    frozen = prepare_backbone(backbone, trainable_layers=config.trainable_layers, batch_norm=config.batch_norm)
    normalised = config.batch_norm != "frozen"
    width = config.fpn_channels
    with torch.random.fork_rng(devices=[]):  # the FPN's and heads' init, without touching the caller's generator
        torch.manual_seed(stream_seed(config.seed, "detect_init"))
        heads = (
            dict(
                rpn_head=RPNHead(width, 3, conv_depth=2),  # 3 aspect ratios a location (the default anchors)
                box_head=FastRCNNConvFCHead((width, 7, 7), [width] * 4, [4 * width], norm_layer=nn.BatchNorm2d),
                box_predictor=FastRCNNPredictor(4 * width, num_classes + 1),  # + background
            )
            if normalised
            else dict(num_classes=num_classes + 1)  # + background
        )
        model = FasterRCNN(
            TimmFPN(backbone, width, norm_layer=nn.BatchNorm2d if normalised else None),
            min_size=config.image_size,
            max_size=round(config.image_size * MAX_SIZE_RATIO),
            image_mean=list(info.get("declared_mean", MEAN)),
            image_std=list(info.get("declared_std", STD)),
            **heads,
        )
    frozen["new_layers"] = "BatchNorm in the FPN, 2-conv RPN head, 4-conv + 1-fc box head" if normalised else "no norm"
    return model, frozen


# --- schedule and data order ------------------------------------------------------------------------------


def lr_at_step(step: int, steps_per_epoch: int, config: DetectConfig) -> float:
    """torchvision's reference schedule: a linear warm-up from 0.1 % over the first min(warmup_iters, one epoch)
    iterations, then x lr_gamma at each milestone epoch."""
    epoch = step // steps_per_epoch
    lr = config.base_lr * config.lr_gamma ** sum(epoch >= m for m in config.lr_milestones)
    warmup = min(config.warmup_iters, steps_per_epoch - 1)
    if step < warmup:
        alpha = step / warmup
        lr *= WARMUP_FACTOR * (1 - alpha) + alpha
    return lr


# --- the loops --------------------------------------------------------------------------------------------


@dataclass
class _Detect(Job):
    """One fine-tuning's inputs, resolved before any work (SOURCE, config, processes and clock: job.Job)."""

    train: CocoSplit
    val: CocoSplit
    output: Path
    states: EpochStates  # under OUTPUT/state
    frozen: dict[str, Any]

    def loader(self, dataset: Any, batch_sampler: Any) -> DataLoader:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.config.workers, collate_fn=collate)


def _to(device: torch.device, images: list[Tensor], targets: list[dict[str, Tensor]]):
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def train_detector(d: _Detect, model: nn.Module, progress: Any) -> dict[str, Any]:
    """SGD (momentum, weight decay) on the trainable parameters, lr by `lr_at_step`; a state after each epoch."""
    c, acc = d.config, d.accelerator
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=c.base_lr, momentum=c.sgd_momentum, weight_decay=c.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)
    dataset_size = len(d.train.images)
    steps_per_epoch = math.ceil(dataset_size / c.batch_size)
    saved = d.states.start(acc.unwrap_model(model), optimizer, resume=c.resume)
    start, history = saved["epoch"], saved.get("epoch_losses", [])
    rollbacks: list[dict[str, int]] = saved.get("rollbacks", [])
    devices = [acc.device] if acc.device.type == "cuda" else []
    epochs_bar = progress.add_task("epochs", total=c.epochs, completed=start, loss="")
    epoch = start
    while epoch < c.epochs:
        lr_scale = 0.5 ** len(rollbacks)
        good = _snapshot(acc.unwrap_model(model), optimizer)  # where a non-finite loss rolls back to
        dataset = DetectionImages(d.train, flip_seed=(c.seed, epoch) if c.hflip else None)
        # Every image every epoch: the last batch is filled from the start of the epoch's order.
        sampler = GlobalBatches(
            dataset_size,
            c.batch_size,
            seed=c.seed,
            epoch=epoch,
            rank=acc.process_index,
            world=acc.num_processes,
            wrap=True,
            stream="detect_order",
            parts=(0,),
        )
        batches = progress.add_task(f"epoch {epoch + 1}", total=len(sampler), loss="")
        model.train()
        sums = torch.zeros(5, device=acc.device)  # total and the 4 parts, summed over steps
        diverged = False
        with torch.random.fork_rng(devices=devices):  # the detector's box sampling draws from the global generator
            torch.manual_seed(stream_seed(c.seed, "detect_order", 1, epoch, acc.process_index))
            for b, (images, targets) in enumerate(d.loader(dataset, sampler)):
                step = epoch * steps_per_epoch + b
                for group in optimizer.param_groups:
                    group["lr"] = lr_at_step(step, steps_per_epoch, c) * lr_scale
                images, targets = _to(acc.device, images, targets)
                with acc.autocast():
                    parts = model(images, targets)  # loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg
                loss = sum(parts.values())
                diverged = not all_ranks_true(torch.isfinite(loss), acc)  # every rank together, none waits forever
                if diverged:
                    break
                optimizer.zero_grad(set_to_none=True)
                acc.backward(loss)
                optimizer.step()
                sums += torch.stack([loss.detach(), *(parts[k].detach() for k in sorted(parts))]).float()
                progress.update(batches, advance=1, loss=f"loss {loss.item():.3f}")
        progress.remove_task(batches)
        if diverged:
            if len(rollbacks) == MAX_ROLLBACKS:
                raise NonFiniteLossError(
                    f"the detection loss is not finite at epoch {epoch + 1}, step {b + 1} after {MAX_ROLLBACKS} "
                    f"rollbacks with the learning rate halved each time (the last good state is in {d.states.root}): "
                    "lower --lr or lengthen --warmup-iters"
                )
            _restore(acc.unwrap_model(model), optimizer, good)
            rollbacks.append({"epoch": epoch + 1, "step": b + 1})
            log.warning(
                "the detection loss is not finite at epoch %d, step %d: back to the start of the epoch with the "
                "learning rate x%g",
                epoch + 1,
                b + 1,
                0.5 ** len(rollbacks),
            )
            continue
        means = (acc.reduce(sums, "mean") / len(sampler)).tolist()
        history.append({"loss": means[0], **dict(zip(sorted(parts), means[1:]))})
        d.states.save(epoch + 1, acc.unwrap_model(model), optimizer, epoch_losses=history, rollbacks=rollbacks)
        progress.update(epochs_bar, advance=1, loss=f"loss {means[0]:.3f}")
        epoch += 1
    return {
        "model": acc.unwrap_model(model),
        "epoch_losses": history,
        "resumed_from_epoch": start or None,
        "rollbacks": rollbacks,
    }


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A copy of the model's and the optimiser's state (on their device)."""
    return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, snapshot: dict[str, Any]) -> None:
    model.load_state_dict(snapshot["model"])
    optimizer.load_state_dict(snapshot["optimizer"])


@torch.no_grad()
def predict(d: _Detect, model: nn.Module, progress: Any) -> list[dict[str, Any]]:
    """COCO-format detections for every val image, each process predicting every world-th image."""
    acc = d.accelerator
    dataset = DetectionImages(d.val)
    local = max(1, d.config.batch_size // acc.num_processes)
    mine = list(range(acc.process_index, len(dataset), acc.num_processes))
    batches = [mine[i : i + local] for i in range(0, len(mine), local)]
    category_of = {label: category for category, label in dataset.label_of.items()}
    task = progress.add_task("evaluate", total=len(batches), loss="")
    model.eval()
    found: list[dict[str, Any]] = []
    for images, targets in d.loader(dataset, batches):
        images, _ = _to(acc.device, images, [])
        with acc.autocast():
            outputs = model(images)  # per image: boxes [n, 4] x1 y1 x2 y2 (input pixels), labels [n], scores [n]
        found += to_coco_detections(outputs, [int(t["image_id"]) for t in targets], category_of)
        progress.advance(task)
    return gather_object(found) if acc.num_processes > 1 else found


# --- names, data, putting it together ----------------------------------------------------------------------


def result_name(config: DetectConfig) -> str:
    """faster-rcnn-fpn-<data folder>-<size>px-<digest> (job.result_name)."""
    return job_result_name(config, "faster-rcnn-fpn", slug(str(config.data)), f"{config.image_size}px")


def _subset(split: CocoSplit, max_images: int | None, seed: int, number: int) -> CocoSplit:
    """A seeded subset of `max_images` images, its ground truth restricted to them (smoke runs)."""
    picked = subset(len(split.images), max_images, seed, number, stream="detect_order", parts=(3,))
    if len(picked) == len(split.images):
        return split
    images = [split.images[i] for i in picked]
    ids = {i["id"] for i in images}
    gt = {**split.gt, "images": images, "annotations": [a for a in split.gt["annotations"] if a["image_id"] in ids]}
    boxes = {i: split.boxes[i] for i in ids}
    return CocoSplit(split.root, split.split, gt, images, boxes, split.categories, split.dropped, split.files_bytes)


def _prepare(
    source: str, config: DetectConfig, accelerator: Accelerator | None, backbone: tuple[nn.Module, dict] | None
) -> tuple[_Detect, nn.Module]:
    if config.data is None:
        raise OptionError("--data DIR is required: a folder in the COCO layout")
    evaluator()  # fail now, not after training, when none is installed
    train, val = load_dataset(config.data)
    train, val = _subset(train, config.max_images, config.seed, 0), _subset(val, config.max_images, config.seed, 1)
    accelerator = launched_accelerator(
        config.batch_size, accelerator=accelerator, mixed_precision=config.mixed_precision
    )
    # Recorded resolved: the state, the result and its name say what ran.
    config = dataclasses.replace(
        config, batch_norm=resolved_batch_norm(config.batch_norm, accelerator.num_processes, accelerator.device.type)
    )
    if config.batch_norm == "sync" and accelerator.num_processes > 1 and accelerator.device.type != "cuda":
        raise OptionError("--batch-norm sync needs GPUs (SyncBatchNorm does not run on the CPU); use train")
    # A caller's backbone is copied: freezing replaces its BatchNorm layers in place.
    module, info = (copy.deepcopy(backbone[0]), backbone[1]) if backbone is not None else load_backbone(source)
    local, size = max(1, config.batch_size // accelerator.num_processes), config.image_size
    activations = forward_sizes(module, size).activations  # the backbone alone at the shorter side: a lower bound
    need = local * (3 * size * round(size * MAX_SIZE_RATIO) + activations) * 4
    check_fits(
        [Need(f"--batch-size {config.batch_size} at --image-size {size}", f"{local} images", need)], accelerator.device
    )
    model, frozen = build_detector(module, info, len(train.categories), config)
    output = persist.ensure_writable_dir(config.output, "--output")  # the last check: bad input leaves no folder
    if config.batch_norm == "sync" and accelerator.num_processes > 1:
        model = timm.layers.convert_sync_batchnorm(model)
    settings = {
        **resume_settings(config),
        "weights_sha256": info["weights_sha256"],
        "data": {"train": train.fingerprint(), "val": val.fingerprint()},
    }
    states = EpochStates(output / STATES, settings, accelerator)
    d = _Detect(source, config, accelerator, info, train, val, output, states, frozen)
    return d, model.to(accelerator.device)


def run_detect(
    source: str,
    config: DetectConfig,
    *,
    accelerator: Accelerator | None = None,
    backbone: tuple[nn.Module, dict[str, Any]] | None = None,
    show: bool = True,
) -> dict[str, Any]:
    """Fine-tune a detector on SOURCE's backbone and evaluate it on config.data's val split. Returns the result
    written to OUTPUT/results.json (and, for a run directory, RUN/detection/<name>.json). `backbone`
    (module, info as load_backbone returns it) replaces what SOURCE would load, for tests and library callers;
    `show`: progress bars. A failure leaves no empty --output; a full disk is one DiskFullError naming the file and
    the last complete state."""
    try:
        with persist.output_dir(config.output, "--output"):
            return _detect(source, config, accelerator, backbone, show)
    except DiskFullError as error:
        states = persist.complete_folders(Path(config.output) / STATES, STATE_PREFIX)
        survived = f"the last complete state is {states[-1]} (--resume continues from it)" if states else ""
        raise DiskFullError(f"{error}; {survived or 'no epoch was complete yet'}") from None


def _detect(
    source: str,
    config: DetectConfig,
    accelerator: Accelerator | None,
    backbone: tuple[nn.Module, dict[str, Any]] | None,
    show: bool,
) -> dict[str, Any]:
    d, model = _prepare(source, config, accelerator, backbone)
    with progress_bar(d.accelerator.is_main_process and show, fields="{task.fields[loss]}") as progress:
        with d.timed("train"):
            fit = train_detector(d, model, progress)
        with d.timed("predict"):
            detections = predict(d, fit["model"], progress)
    with d.timed("evaluate"):
        scores = evaluate_boxes(d.val.gt, detections)
    result = _result(d, scores, fit, len(detections))
    if d.accelerator.is_main_process:
        persist.save_tensors(d.output / WEIGHTS, fit["model"].state_dict())
        compact = json.dumps(detections, separators=(",", ":"))  # COCO val: half a million boxes
        persist.atomic_write(d.output / DETECTIONS, lambda path: path.write_text(compact))
    d.write(result, d.output / RESULTS, run_folder=DETECTION, name=result_name(config))
    d.accelerator.wait_for_everyone()
    return result


def _result(d: _Detect, scores: dict[str, Any], fit: dict[str, Any], detections: int) -> dict[str, Any]:
    c = d.config
    trained = (c.epochs - (fit["resumed_from_epoch"] or 0)) * math.ceil(len(d.train.images) / c.batch_size)
    numbers = {
        **{k: scores[k] for k in METRIC_KEYS},
        "metrics": {k: v for k, v in scores.items() if k != "evaluator"},  # with AR1..ARl
        "metric": "COCO box AP (%), IoU 0.50:0.95; AP50/AP75 at IoU 0.5/0.75; s/m/l by area 32^2 / 96^2",
        "task": "object-detection",
        "evaluator": scores["evaluator"],
        "detector": DETECTOR,
        "note": "torchvision fine-tuning; not the MoCo/MoCHi paper's detectron2 protocol (R50-C4, VOC07+12)",
        "weights_sha256": d.info["weights_sha256"],
        "dataset": str(c.data),
        "dataset_name": Path(str(c.data)).expanduser().resolve().name,
        "split": "val",
        "dataset_fingerprint": d.states.settings["data"],
        "categories": [c_["name"] for c_ in sorted(d.train.categories, key=lambda c_: c_["id"])],
        "train_images": len(d.train.images),
        "val_images": len(d.val.images),
        "val_annotations": len(d.val.gt["annotations"]),
        "detections": detections,
        "lr": c.base_lr,
        "max_size": round(c.image_size * MAX_SIZE_RATIO),
        "backbone_training": d.frozen,
        "image_mean": d.info.get("declared_mean"),
        "image_std": d.info.get("declared_std"),
        "epoch_losses": fit["epoch_losses"],
        "rollbacks": fit["rollbacks"],  # each non-finite loss: the epoch and step it rolled back from (lr halved)
        "resumed_from_epoch": fit["resumed_from_epoch"],
        "state_dir": str(d.states.root),
        "weights": str(d.output / WEIGHTS),
        "detections_file": str(d.output / DETECTIONS),
    }
    return d.result(numbers, {"steps_trained": trained})
