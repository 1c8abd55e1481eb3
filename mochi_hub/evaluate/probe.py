"""`mochi probe`: evaluate a frozen backbone, as the paper does (after MoCo), or faster.

    SOURCE -> load_backbone -> freeze + snapshot -> features -> linear classifier or kNN -> top-1, top-5
                                                                      -> check_frozen -> table + JSON

- linear (the paper's protocol): a linear classifier on the frozen backbone's pooled features, the
  features computed on the fly from augmented images (RandomResizedCrop + flip) every epoch; BatchNorm
  in eval mode; SGD, momentum 0.9, no weight decay, lr x0.1 at fixed epochs (ImageNet-100: 60 epochs,
  lr 10, batch 128, milestones 30/40/50; ImageNet-1K: 100 epochs, lr 30, batch 512, 60/80).
  Evaluated on the centre crop (resize 256/224 of the crop size, crop). Resumable per epoch.
- knn: weighted kNN (InstDisc / MoCo style): cosine similarity to every training feature, the k nearest
  vote for their class with weight exp(sim / T); k = 200, T = 0.07.
- fast: the features of un-augmented (centre-cropped) images, extracted once and cached on disk, then
  the same linear classifier and schedule on them. Not the paper's protocol (no augmentation); it says so.

The math is in classify.py, the frozen check in frozen.py, the feature cache in features.py, the states, the
result's name and envelope in job.py (shared with detect); this module runs them over processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mochi_hub.config import (
    PAPER_PROTOCOL_DATASETS,
    PROBE_PRESETS,
    ProbeConfig,
    resume_settings,
)
from mochi_hub.core import persist
from mochi_hub.core.console import progress_bar
from mochi_hub.core.distributed import all_ranks_true, launched_accelerator, on_main_process
from mochi_hub.core.memory import Need, check_fits
from mochi_hub.data.augment import MEAN, STD, eval_transform, probe_train_transform
from mochi_hub.data.datasets import (
    IMAGENET100_CMC_CLASSES,
    DecodedImages,
    ImageFolder,
    ImageSource,
    num_classes,
    resolve_dataset,
    train_and_val,
)
from mochi_hub.data.sampling import EpochShuffle, SeededItems, subset
from mochi_hub.errors import OptionError
from mochi_hub.evaluate.classify import knn_scores, lr_at, make_classifier, topk_hits
from mochi_hub.evaluate.features import (
    FeatureTensors,
    cache_key,
    dataset_fingerprint,
    default_cache_dir,
    extract,
    feature_batch,
    image_batch,
    load_cached,
    save_cached,
)
from mochi_hub.evaluate.frozen import check_frozen, freeze, snapshot
from mochi_hub.evaluate.job import EpochStates, Job, slug
from mochi_hub.evaluate.job import result_name as job_result_name
from mochi_hub.method.model import forward_sizes, pooled_width
from mochi_hub.publish.sources import load_backbone, probe_config_for
from mochi_hub.training.runs import PROBES

log = logging.getLogger(__name__)

FAST_NOTE = (
    "fast: a linear classifier on cached features of un-augmented centre crops; "
    "NOT the paper's linear protocol (use --protocol linear for that)"
)
KNN_NOTE = "knn: weighted k-nearest-neighbour vote on L2-normalised features; not the paper's linear protocol"

# --- training and evaluation loops -----------------------------------------------------------------------


def _local_batch(config: ProbeConfig, accelerator: Accelerator) -> int:
    """--batch-size is global: split over the processes, whether or not the Accelerator splits batches itself."""
    return config.batch_size if accelerator.split_batches else config.batch_size // accelerator.num_processes


def fit_classifier(
    classifier: nn.Module,
    make_dataset: Callable[[int], Dataset],
    *,
    encode: Callable[[Tensor], Tensor],
    collate: Callable,
    config: ProbeConfig,
    accelerator: Accelerator,
    states: EpochStates,
    workers: int,
    progress: Any,
) -> dict[str, Any]:
    """SGD on the classifier alone, one seeded shuffle per epoch, lr by `lr_at`; a state saved after each epoch.
    `make_dataset(epoch)` gives that epoch's dataset; `encode` maps its inputs to features (no grad)."""
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=config.lr, momentum=config.sgd_momentum, weight_decay=config.weight_decay
    )
    classifier, optimizer = accelerator.prepare(classifier, optimizer)
    start = states.start(accelerator.unwrap_model(classifier), optimizer, resume=config.resume)["epoch"]
    losses: list[float] = []
    skipped: set[str] = set()  # the same bad image is met every epoch: report it once
    epochs_bar = progress.add_task("epochs", total=config.epochs, completed=start)
    for epoch in range(start, config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, config)
        dataset = make_dataset(epoch)
        loader = accelerator.prepare_data_loader(
            DataLoader(
                dataset,
                batch_size=_local_batch(config, accelerator),
                sampler=EpochShuffle(len(dataset), config.seed, epoch),
                num_workers=workers,
                collate_fn=collate,
            )
        )
        batches = progress.add_task(f"epoch {epoch + 1}", total=len(loader))
        classifier.train()
        total, count = torch.zeros((), device=accelerator.device), 0
        for batch in loader:
            with torch.no_grad(), accelerator.autocast():
                features = encode(batch["inputs"])  # [b, D]
            loss = F.cross_entropy(classifier(features.float()), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            total += loss.detach() * len(batch["labels"])
            count += len(batch["labels"])
            skipped.update(batch["skipped"])
            progress.advance(batches)
        progress.remove_task(batches)
        losses.append(
            float(accelerator.reduce(total, "sum"))
            / max(1, int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum")))
        )
        states.save(epoch + 1, accelerator.unwrap_model(classifier), optimizer)
        progress.advance(epochs_bar)
    return {
        "classifier": classifier,
        "epoch_losses": losses,
        "resumed_from_epoch": start or None,
        "skipped": sorted(skipped),
    }


@torch.no_grad()
def evaluate_classifier(
    classifier: nn.Module,
    dataset: Dataset,
    *,
    encode: Callable[[Tensor], Tensor],
    collate: Callable,
    config: ProbeConfig,
    accelerator: Accelerator,
    workers: int,
    progress: Any,
) -> tuple[Tensor, list[str]]:
    """Top-1 and top-5 hits summed over the dataset, [2], every image counted once on every process."""
    loader = accelerator.prepare_data_loader(
        DataLoader(
            dataset,
            batch_size=_local_batch(config, accelerator),
            shuffle=False,
            num_workers=workers,
            collate_fn=collate,
        )
    )
    task = progress.add_task("evaluate", total=len(loader))
    classifier.eval()
    hits, skipped = torch.zeros(2, device=accelerator.device), []
    for batch in loader:
        with accelerator.autocast():
            scores = classifier(encode(batch["inputs"]).float())  # [b, C]
        hits += accelerator.gather_for_metrics(topk_hits(scores.float(), batch["labels"])).sum(0)
        skipped += batch["skipped"]
        progress.advance(task)
    return hits.cpu(), skipped


# --- names and data ----------------------------------------------------------------------------------------


def result_name(config: ProbeConfig) -> str:
    """<protocol>-<dataset>-<split>-<size>px[-max<N>]-<digest> (job.result_name)."""
    subset_part = [f"max{config.max_images}"] if config.max_images is not None else []
    return job_result_name(
        config, config.protocol, slug(str(config.dataset)), config.split, f"{config.image_size}px", *subset_part
    )


def _resolve_sources(config: ProbeConfig) -> tuple[ImageSource, ImageSource]:
    if config.split == "train":
        train = resolve_dataset(config.dataset, "train", data_root=config.data_root)
        return train, train
    return train_and_val(config.dataset, config.data_root)


def _class_order(source: ImageSource) -> str:
    if isinstance(source, ImageFolder):
        if source.classes is IMAGENET100_CMC_CLASSES:
            return "ImageNet-100, CMC order (HobbitLong/CMC imagenet100.txt)"
        return "sorted class-folder names"
    return "the dataset's own labels"


# --- putting it together ---------------------------------------------------------------------------------


@dataclass
class _Probe(Job):
    """One probe's inputs, resolved before any work (SOURCE, config, processes and clock: job.Job)."""

    module: nn.Module
    train_source: ImageSource
    eval_source: ImageSource
    train_indices: list[int]
    eval_indices: list[int]
    num_classes: int
    states: EpochStates
    cache_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    decoded: int = 0  # images decoded and run through the backbone (cached features cost none)

    @property
    def eval_tf(self):
        return eval_transform(self.config.image_size, self.config.crop_pct)

    @property
    def train_tf(self):
        c = self.config
        return (
            probe_train_transform(c.image_size, c.crop_min_scale)
            if c.augment and c.protocol == "linear"
            else self.eval_tf
        )

    def images(self, source: ImageSource, indices: list[int], transform) -> DecodedImages:
        return DecodedImages(source, transform, strict=self.config.strict_data, indices=indices)

    def features(self, source: ImageSource, indices: list[int], split: str, progress: Any) -> tuple[Tensor, Tensor]:
        """Cached features of un-augmented centre crops, extracted on a miss."""
        parts = {
            "weights_sha256": self.info["weights_sha256"],
            "data": dataset_fingerprint(source, self.config.dataset),
            "split": split,
            "indices": indices if len(indices) != len(source) else "all",
            "transform": repr(self.eval_tf),
            "mixed_precision": self.config.mixed_precision,
        }
        key = cache_key(parts)
        hit = self._cache_hit(key)
        self.extra.setdefault("feature_cache", {})[split] = {
            "key": key,
            "hit": hit is not None,
            "dir": str(self.cache_dir),
        }
        if hit is not None:
            return hit
        self.decoded += len(indices)
        task = progress.add_task(f"features {split}", total=len(indices))
        features, labels, bad = extract(
            self.module,
            self.images(source, indices, self.eval_tf),
            accelerator=self.accelerator,
            batch_size=_local_batch(self.config, self.accelerator),
            workers=self.config.workers,
            on_batch=lambda n: progress.advance(task, n),
        )
        self.skipped.extend(bad)
        if self.accelerator.is_main_process:
            save_cached(self.cache_dir, key, features, labels, parts)
        self.accelerator.wait_for_everyone()
        return features, labels

    def _cache_hit(self, key: str) -> tuple[Tensor, Tensor] | None:
        """Whether the cache holds `key` is decided by rank 0 (every rank must then extract, or none); every rank
        reads the entry, and a rank that cannot (a --cache-dir not shared between nodes) stops them all."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return load_cached(self.cache_dir, key)
        if not on_main_process(accelerator, lambda: load_cached(self.cache_dir, key) is not None):
            return None
        hit = load_cached(self.cache_dir, key)
        if not bool(all_ranks_true(torch.tensor(hit is not None, device=accelerator.device), accelerator)):
            raise OptionError(
                f"--cache-dir {self.cache_dir}: process 0 found cached features that other processes cannot read; "
                "with several nodes --cache-dir must be one folder every node shares"
            )
        return hit

    def fit_and_score(
        self, classifier: nn.Module, train: Callable[[int], Dataset], evaluated: Dataset, progress: Any, **loader: Any
    ) -> Tensor:
        """The linear classifier fitted on `train(epoch)` and scored on `evaluated`: top-1 and top-5 hits [2].
        `loader`: encode, collate and workers of both."""
        with self.timed("train"):
            fit = fit_classifier(
                classifier,
                train,
                config=self.config,
                accelerator=self.accelerator,
                states=self.states,
                progress=progress,
                **loader,
            )
        with self.timed("eval"):
            hits, bad = evaluate_classifier(
                fit["classifier"],
                evaluated,
                config=self.config,
                accelerator=self.accelerator,
                progress=progress,
                **loader,
            )
        self.skipped += fit["skipped"] + bad
        self.extra.update(
            epoch_losses=fit["epoch_losses"],
            resumed_from_epoch=fit["resumed_from_epoch"],
            state_dir=str(self.states.root),
        )
        return hits


def _prepare(
    source: str,
    config: ProbeConfig,
    accelerator: Accelerator | None,
    backbone: tuple[nn.Module, dict[str, Any]] | None,
    sources: tuple[ImageSource, ImageSource] | None,
) -> _Probe:
    if config.output:
        persist.ensure_writable_file(config.output, "--output")
    accelerator = launched_accelerator(
        config.batch_size,
        accelerator=accelerator,
        mixed_precision=config.mixed_precision,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    module, info = backbone if backbone is not None else load_backbone(source)
    module = freeze(module).to(accelerator.device)
    if accelerator.is_main_process and (
        info.get("declared_mean", list(MEAN)) != list(MEAN) or info.get("declared_std", list(STD)) != list(STD)
    ):
        log.info(
            "note: the weights declare mean %s / std %s; the probe normalises with ImageNet's %s / %s, "
            "as pretraining did",
            info["declared_mean"],
            info["declared_std"],
            list(MEAN),
            list(STD),
        )
    train_source, eval_source = sources if sources is not None else _resolve_sources(config)
    train_indices = subset(len(train_source), config.max_images, config.seed, 0)
    eval_indices = (
        train_indices if eval_source is train_source else subset(len(eval_source), config.max_images, config.seed, 1)
    )
    check_fits(_memory(config, module, accelerator, len(train_indices) + len(eval_indices)), accelerator.device)
    name = result_name(config)
    run_dir = Path(info["run_dir"]) if "run_dir" in info else None
    if run_dir is not None:
        state_root = run_dir / PROBES / f"{name}.state"
    elif config.output:
        state_root = Path(config.output).parent / f"{Path(config.output).stem}.state"
    else:
        state_root = default_cache_dir() / "probe-state" / f"{name}-{info['weights_sha256'][:12]}"
    settings = {
        **resume_settings(config),
        "weights_sha256": info["weights_sha256"],
        "train_data": dataset_fingerprint(train_source, config.dataset),
    }
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir() / "features"
    return _Probe(
        source,
        config,
        accelerator,
        info,
        module,
        train_source,
        eval_source,
        train_indices,
        eval_indices,
        num_classes(train_source),
        EpochStates(state_root, settings, accelerator),
        cache_dir,
    )


def _memory(config: ProbeConfig, module: nn.Module, accelerator: Accelerator, images: int) -> list[Need]:
    """What one process holds at least: a batch through the frozen backbone (its largest activation at a time), and
    the cached features of every image for knn and fast."""
    local, size = _local_batch(config, accelerator), config.image_size
    sizes = forward_sizes(module, size)
    needs = [
        Need(
            f"--batch-size {config.batch_size} at --image-size {size}",
            f"{local} images through the backbone",
            local * (3 * size**2 + 2 * sizes.largest) * 4,
        )
    ]
    if config.protocol != "linear":
        width = pooled_width(module)
        option = f"--max-images {config.max_images}" if config.max_images else "--max-images (every image now)"
        needs.append(Need(option, f"the features of {images} images ({width} floats each)", images * width * 4))
    return needs


def _linear(p: _Probe, progress: Any) -> Tensor:
    """The paper's protocol: the classifier trained on augmented images through the frozen backbone."""
    c = p.config
    hits = p.fit_and_score(
        make_classifier(int(p.info["num_features"]), p.num_classes, c.seed),
        lambda epoch: SeededItems(
            p.images(p.train_source, p.train_indices, p.train_tf), c.seed, "probe_augment", epoch
        ),
        p.images(p.eval_source, p.eval_indices, p.eval_tf),
        progress,
        encode=p.module,
        collate=image_batch,
        workers=c.workers,
    )
    p.decoded += (c.epochs - (p.extra["resumed_from_epoch"] or 0)) * len(p.train_indices) + len(p.eval_indices)
    return hits


def _on_cached_features(p: _Probe, progress: Any) -> Tensor:
    """knn and fast: features extracted once (and cached), then the vote or the classifier on them."""
    c = p.config
    with p.timed("features"):
        train_features, train_labels = p.features(p.train_source, p.train_indices, "train", progress)
        eval_features, eval_labels = (
            (train_features, train_labels)
            if p.eval_source is p.train_source
            else p.features(p.eval_source, p.eval_indices, c.split, progress)
        )
    if c.protocol == "knn":
        device = p.accelerator.device
        with p.timed("knn"):
            scores = knn_scores(
                train_features.to(device),
                train_labels.to(device),
                eval_features.to(device),
                p.num_classes,
                k=c.knn_k,
                temperature=c.knn_temperature,
            )
        p.extra["knn"] = {"k": min(c.knn_k, len(train_labels)), "temperature": c.knn_temperature}
        return topk_hits(scores, eval_labels.to(device)).sum(0).cpu()
    return p.fit_and_score(
        make_classifier(train_features.shape[1], p.num_classes, c.seed),
        lambda epoch: FeatureTensors(train_features, train_labels),
        FeatureTensors(eval_features, eval_labels),
        progress,
        encode=lambda x: x,
        collate=feature_batch,
        workers=0,
    )


def run_probe(
    source: str,
    config: ProbeConfig,
    *,
    accelerator: Accelerator | None = None,
    backbone: tuple[nn.Module, dict[str, Any]] | None = None,
    sources: tuple[ImageSource, ImageSource] | None = None,
    show: bool = True,
) -> dict[str, Any]:
    """Evaluate SOURCE's backbone with config.protocol. Returns the result written to --output (and, for a
    run directory, to RUN/probes/<name>.json). `accelerator`: an existing one (batches stay global either
    way); `backbone` (module, info) and `sources` (train, eval images) replace what SOURCE and --dataset would
    load, for tests and library callers; `show`: progress bars."""
    if config.dataset is None or config.image_size is None:  # left to the SOURCE: what it was trained on
        config = probe_config_for(source, **config.to_dict())
    p = _prepare(source, config, accelerator, backbone, sources)
    before = snapshot(p.module)
    with progress_bar(p.accelerator.is_main_process and show) as progress:
        hits = _linear(p, progress) if config.protocol == "linear" else _on_cached_features(p, progress)
    check_frozen(before, p.module)  # raises if anything but the classifier changed
    result = _result(p, hits)
    if p.skipped and p.accelerator.is_main_process:
        log.warning("%d unusable image(s) replaced by the next good one, e.g. %s", len(p.skipped), p.skipped[0])
    p.write(result, Path(config.output) if config.output else None, run_folder=PROBES, name=result_name(config))
    return result


def is_paper_protocol(config: ProbeConfig) -> bool:
    """The paper's linear protocol: augmented linear probe, every image, the ImageNet preset's schedule."""
    preset = PROBE_PRESETS.get(config.dataset or "") if config.dataset in PAPER_PROTOCOL_DATASETS else None
    return bool(
        config.protocol == "linear"
        and config.augment
        and config.max_images is None
        and preset
        and all(getattr(config, k) == (tuple(v) if isinstance(v, list) else v) for k, v in preset.items())
    )


def _result(p: _Probe, hits: Tensor) -> dict[str, Any]:
    c, n_eval = p.config, len(p.eval_indices)
    top1, top5 = (100.0 * hits / n_eval).tolist()
    numbers = {
        "top1": round(top1, 4),
        "top5": round(top5, 4),
        "top5_k": min(5, p.num_classes),
        "protocol": c.protocol,
        "paper_protocol": is_paper_protocol(c),
        "note": {"linear": "", "knn": KNN_NOTE, "fast": FAST_NOTE}[c.protocol],
        "dataset": c.dataset,
        "split": c.split,
        "split_name": getattr(p.eval_source, "split_name", c.split),
        "epochs": c.epochs if c.protocol != "knn" else None,
        "num_classes": p.num_classes,
        "class_order": _class_order(p.train_source),
        "train_images": len(p.train_indices),
        "eval_images": n_eval,
        "skipped_images": len(p.skipped),
        "skipped_examples": p.skipped[:10],
        "seed": c.seed,
        "train_transform": repr(p.train_tf),
        "eval_transform": repr(p.eval_tf),
        "frozen_backbone_check": "passed: no backbone weight or BatchNorm statistic changed",
        **p.extra,
    }
    result = p.result(numbers, {"images_seen": p.decoded, "images_skipped": len(p.skipped)})
    result["hyperparameters"]["augment"] = c.augment and c.protocol == "linear"  # what ran: fast and knn never augment
    return result
