"""`mochi probe`: evaluate a frozen backbone, as the paper does (after MoCo), or faster.

    SOURCE -> load_backbone (eval mode, no grads) -> features -> linear classifier or kNN -> top-1, top-5
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

Whatever the protocol, the backbone is snapshotted before and compared after: if a single weight or
BatchNorm statistic changed, the result is not a frozen-backbone evaluation and the probe raises.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import __version__
from .augment import MEAN, STD, eval_transform, probe_train_transform
from .config import ProbeConfig
from .data import IMAGENET100_CMC_CLASSES, DecodedImages, HubImages, ImageFolder, ImageSource, resolve_dataset
from .features import (FeatureTensors, cache_key, dataset_fingerprint, default_cache_dir, extract, feature_batch,
                       image_batch, load_cached, save_cached)
from .sources import load_backbone
from .train import launched_accelerator

FAST_NOTE = ("fast: a linear classifier on cached features of un-augmented centre crops; "
             "NOT the paper's linear protocol (use --protocol linear for that)")
KNN_NOTE = "knn: weighted k-nearest-neighbour vote on L2-normalised features; not the paper's linear protocol"
# Settings a resumed classifier must share with the state it continues.
RESUME_MUST_MATCH = ("protocol", "dataset", "epochs", "batch_size", "lr", "lr_milestones", "lr_gamma", "sgd_momentum",
                     "weight_decay", "augment", "crop_min_scale", "image_size", "seed", "max_images", "mixed_precision")


class FrozenBackboneError(RuntimeError):
    """Something other than the classifier changed: the number is not a frozen-backbone evaluation."""


# --- the frozen backbone ---------------------------------------------------------------------------------

def freeze(backbone: nn.Module) -> nn.Module:
    """BatchNorm (and dropout) in eval mode, no gradients: the backbone is a fixed function."""
    backbone.eval()
    backbone.requires_grad_(False)
    return backbone


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter and buffer (BatchNorm running statistics and counters included)."""
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def check_frozen(before: dict[str, Tensor], module: nn.Module) -> None:
    """Raise FrozenBackboneError, naming the tensors, if any changed since `before` (bit for bit)."""
    after = module.state_dict()
    changed = sorted(set(before) ^ set(after))
    changed += [name for name in sorted(set(before) & set(after)) if not torch.equal(before[name], after[name])]
    training = [name or type(module).__name__ for name, m in module.named_modules() if m.training]
    if changed or training:
        detail = []
        if changed:
            detail.append(f"{len(changed)} tensor(s) changed, e.g. {', '.join(changed[:5])}")
        if training:
            detail.append(f"{len(training)} module(s) left in train mode, e.g. {', '.join(training[:3])}")
        raise FrozenBackboneError("the backbone was not frozen during the probe: " + "; ".join(detail) + ". "
                                  "Only the linear classifier may change (BatchNorm in eval mode, no optimizer "
                                  "over backbone weights); this result is not a frozen-backbone evaluation.")


# --- schedule, order, augmentation -----------------------------------------------------------------------

def lr_at(epoch: int, config: ProbeConfig) -> float:
    """Step schedule: lr x gamma at each milestone epoch already reached (epochs count from 0)."""
    return config.lr * config.lr_gamma ** sum(epoch >= m for m in config.lr_milestones)


def _seed(*parts: int) -> int:
    return hash(tuple(parts)) & 0x7FFF_FFFF_FFFF_FFFF


class EpochShuffle(Sampler[int]):
    """A permutation drawn from (seed, epoch) alone: a resumed run sees the order an uninterrupted one would,
    and training on images and on cached features of the same images visits them in the same order."""

    def __init__(self, size: int, seed: int, epoch: int):
        self.size, self.seed, self.epoch = size, seed, epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=generator).tolist())


class SeededItems(Dataset):
    """Image `i` of epoch `e` augmented from a generator seeded by (seed, e, i), whatever the worker count
    (torchvision draws from the global RNG, which is forked around each call)."""

    def __init__(self, images: DecodedImages, seed: int, epoch: int):
        self.images, self.seed, self.epoch = images, seed, epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: torch.manual_seed would also queue lazy CUDA/XPU/MTIA seeding, which
            # formats a stack trace per call (about 4 ms an image here).
            torch.default_generator.manual_seed(_seed(self.seed, self.epoch, index))
            return self.images[index]


def subset(size: int, max_images: int | None, seed: int, stream: int) -> list[int]:
    """All indices, or a seeded random subset of max_images of them (in dataset order)."""
    if max_images is None or max_images >= size:
        return list(range(size))
    pick = torch.randperm(size, generator=torch.Generator().manual_seed(_seed(seed, stream, 7)))[:max_images]
    return sorted(pick.tolist())


# --- the classifier, kNN, accuracy -----------------------------------------------------------------------

def make_classifier(num_features: int, num_classes: int, seed: int) -> nn.Linear:
    """MoCo's linear classifier initialisation: weights N(0, 0.01), bias 0, from the probe's seed."""
    classifier = nn.Linear(num_features, num_classes)
    with torch.no_grad():
        classifier.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(_seed(seed, 11)))
        classifier.bias.zero_()
    return classifier


def topk_hits(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """[B, C] scores, [B] labels -> [B, len(ks)] 1.0 where the label is among the top k (k capped at C)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # [B, k]
    match = top == labels[:, None]  # [B, k]
    return torch.stack([match[:, :k].any(dim=1) for k in ks], dim=1).float()


@torch.no_grad()
def knn_scores(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, *, k: int, temperature: float,
               chunk: int = 512) -> Tensor:
    """Weighted kNN votes [Q, C]: per query, the k most cosine-similar bank features each add
    exp(sim / temperature) to their class (InstDisc, Wu et al. 2018; as in MoCo's kNN monitor)."""
    bank = F.normalize(bank.float(), dim=1)  # [N, D]
    k = min(k, bank.shape[0])
    votes = []
    for part in F.normalize(queries.float(), dim=1).split(chunk):  # [q, D]
        sim, index = (part @ bank.T).topk(k, dim=1)  # [q, k]
        weights = (sim / temperature).exp()  # [q, k]
        votes.append(torch.zeros(part.shape[0], num_classes, device=part.device).scatter_add_(
            1, bank_labels[index], weights))  # [q, C]
    return torch.cat(votes)


# --- resumable classifier state --------------------------------------------------------------------------

def _complete_states(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [p for p in root.glob("epoch-*") if not p.name.endswith(".tmp") and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_state(root: Path, epoch: int, classifier: nn.Module, optimizer: torch.optim.Optimizer,
               meta: dict[str, Any]) -> Path:
    """After `epoch` epochs: classifier and optimizer (safetensors + JSON), written to a .tmp folder and
    renamed, then older states removed. Main process only."""
    final = root / f"epoch-{epoch:04d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}, tmp / "classifier.safetensors")
    opt = optimizer.state_dict()
    tensors = {f"{i}.{name}": v.detach().cpu().contiguous() for i, state in opt["state"].items()
               for name, v in state.items() if torch.is_tensor(v)}
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({**meta, "epoch": epoch, "param_groups": opt["param_groups"]}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in _complete_states(root):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: Path, classifier: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    meta = json.loads((path / "state.json").read_text())
    classifier.load_state_dict(load_file(path / "classifier.safetensors"))
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in load_file(path / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def _resume_from(root: Path, meta: dict[str, Any]) -> Path | None:
    states = _complete_states(root)
    if not states:
        return None
    saved = json.loads((states[-1] / "state.json").read_text())
    different = [f"{name}: saved {saved.get(name)!r}, now {meta[name]!r}" for name in meta if saved.get(name) != meta[name]]
    if different:
        raise ValueError(f"--resume {states[-1]}: the saved classifier was trained differently ({'; '.join(different)}); "
                         "run without --resume to start over")
    return states[-1]


# --- training and evaluation loops -----------------------------------------------------------------------

def fit_classifier(classifier: nn.Module, make_dataset: Callable[[int], Dataset], *, encode: Callable[[Tensor], Tensor],
                   collate: Callable, config: ProbeConfig, accelerator: Accelerator, state_root: Path,
                   state_meta: dict[str, Any], workers: int, progress: Any) -> dict[str, Any]:
    """SGD on the classifier alone, one seeded shuffle per epoch, lr by `lr_at`; a state saved after each epoch.
    `make_dataset(epoch)` gives that epoch's dataset; `encode` maps its inputs to features (no grad)."""
    optimizer = torch.optim.SGD(classifier.parameters(), lr=config.lr, momentum=config.sgd_momentum,
                                weight_decay=config.weight_decay)
    classifier, optimizer = accelerator.prepare(classifier, optimizer)
    start, resumed = 0, None
    if config.resume:
        path = _resume_from(state_root, state_meta)
        if path is not None:
            start = load_state(path, accelerator.unwrap_model(classifier), optimizer)["epoch"]
            resumed = start
            accelerator.print(f"resumed the classifier from {path} (epoch {start} of {config.epochs})")
    if resumed is None and accelerator.is_main_process:
        shutil.rmtree(state_root, ignore_errors=True)  # a fresh start: states of an earlier probe are stale
    accelerator.wait_for_everyone()
    losses: list[float] = []
    skipped: set[str] = set()  # the same bad image is met every epoch: report it once
    epochs_bar = progress.add_task("epochs", total=config.epochs, completed=start)
    for epoch in range(start, config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, config)
        dataset = make_dataset(epoch)
        loader = accelerator.prepare_data_loader(DataLoader(
            dataset, batch_size=config.batch_size, sampler=EpochShuffle(len(dataset), config.seed, epoch),
            num_workers=workers, collate_fn=collate))
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
        losses.append(float(accelerator.reduce(total, "sum")) / max(1, int(accelerator.reduce(
            torch.tensor(count, device=accelerator.device), "sum"))))
        if accelerator.is_main_process:
            save_state(state_root, epoch + 1, accelerator.unwrap_model(classifier), optimizer, state_meta)
        accelerator.wait_for_everyone()
        progress.advance(epochs_bar)
    return {"classifier": classifier, "epoch_losses": losses, "resumed_from_epoch": resumed, "skipped": sorted(skipped)}


@torch.no_grad()
def evaluate_classifier(classifier: nn.Module, dataset: Dataset, *, encode: Callable[[Tensor], Tensor], collate: Callable,
                        config: ProbeConfig, accelerator: Accelerator, workers: int,
                        progress: Any) -> tuple[Tensor, list[str]]:
    """Top-1 and top-5 hits summed over the dataset, [2], every image counted once on every process."""
    loader = accelerator.prepare_data_loader(DataLoader(dataset, batch_size=config.batch_size, shuffle=False,
                                                        num_workers=workers, collate_fn=collate))
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


# --- putting it together ---------------------------------------------------------------------------------

def make_accelerator(config: ProbeConfig) -> Accelerator:
    """Batches are global: each is split over the processes."""
    return launched_accelerator(config.batch_size, mixed_precision=config.mixed_precision,
                                dataloader_config=DataLoaderConfiguration(split_batches=True))


def dataset_slug(spec: str) -> str:
    path = Path(spec).expanduser()
    name = path.resolve().name if path.is_dir() else spec
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "dataset"


def result_name(config: ProbeConfig) -> str:
    """<protocol>-<dataset-slug>-<split>, with -max<N> for a subset run (so it never overwrites a full one)."""
    name = f"{config.protocol}-{dataset_slug(config.dataset)}-{config.split}"
    return name + (f"-max{config.max_images}" if config.max_images is not None else "")


def _resolve_sources(config: ProbeConfig) -> tuple[ImageSource, ImageSource]:
    train = resolve_dataset(config.dataset, "train")
    if config.split == "train":
        return train, train
    classes = train.classes if isinstance(train, ImageFolder) else None  # val labels must mean what train's do
    return train, resolve_dataset(config.dataset, "val", classes=classes)


def _num_classes(source: ImageSource) -> int:
    if source.classes:
        return len(source.classes)
    if isinstance(source, HubImages) and source.label_column:
        return int(max(source.dataset[source.label_column])) + 1
    raise ValueError("the dataset has no class labels: a probe needs labelled images")


def _class_order(source: ImageSource) -> str:
    if isinstance(source, ImageFolder):
        if source.classes is IMAGENET100_CMC_CLASSES:
            return "ImageNet-100, CMC order (HobbitLong/CMC imagenet100.txt)"
        return "sorted class-folder names"
    return "the dataset's own labels"


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mochi probe: {result['source']}")
    for column in ("protocol", "dataset", "split", "top-1 %", "top-5 %", "train", "eval", "seconds"):
        table.add_column(column, justify="left" if column in ("protocol", "dataset", "split") else "right",
                         overflow="fold")
    table.add_row(result["protocol"], result["dataset"], result["split"], f"{result['top1']:.2f}", f"{result['top5']:.2f}",
                  str(result["train_images"]), str(result["eval_images"]), f"{result['time']['seconds']:.1f}")
    console = Console()
    console.print(table)
    if result.get("note"):
        console.print(result["note"], markup=False, soft_wrap=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def run_probe(source: str, config: ProbeConfig, *, backbone: tuple[nn.Module, dict[str, Any]] | None = None,
              sources: tuple[ImageSource, ImageSource] | None = None, show: bool = True) -> dict[str, Any]:
    """Evaluate SOURCE's backbone with config.protocol. Returns the result written to --output (and, for a
    run directory, to RUN/probes/<name>.json). `backbone` (module, info) and `sources` (train, eval images)
    replace what SOURCE and --dataset would load; for tests and library callers."""
    started_at, clock = datetime.now(timezone.utc), time.perf_counter()
    timings: dict[str, float] = {}
    accelerator = make_accelerator(config)
    is_main = accelerator.is_main_process

    # Backbone: loaded, frozen, snapshotted.
    module, info = backbone if backbone is not None else load_backbone(source)
    module = freeze(module).to(accelerator.device)
    before = snapshot(module)
    if is_main and (info.get("declared_mean", list(MEAN)) != list(MEAN) or info.get("declared_std", list(STD)) != list(STD)):
        accelerator.print(f"note: the weights declare mean {info['declared_mean']} / std {info['declared_std']}; "
                          f"the probe normalises with ImageNet's {list(MEAN)} / {list(STD)}, as pretraining did")

    # Data: train (fitted) and the reported split, optionally a seeded subset of each.
    train_source, eval_source = sources if sources is not None else _resolve_sources(config)
    num_classes = _num_classes(train_source)
    train_indices = subset(len(train_source), config.max_images, config.seed, 0)
    eval_indices = (train_indices if eval_source is train_source
                    else subset(len(eval_source), config.max_images, config.seed, 1))
    eval_tf = eval_transform(config.image_size)
    train_tf = probe_train_transform(config.image_size, config.crop_min_scale) if config.augment and config.protocol == "linear" else eval_tf
    workers = config.workers
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir() / "features"
    name = result_name(config)
    run_dir = Path(info["run_dir"]) if "run_dir" in info else None
    if run_dir is not None:
        state_root = run_dir / "probes" / f"{name}.state"
    elif config.output:
        state_root = Path(config.output).parent / f"{Path(config.output).stem}.state"
    else:
        state_root = default_cache_dir() / "probe-state" / f"{name}-{info['weights_sha256'][:12]}"
    state_meta = {**{k: config.to_dict()[k] for k in RESUME_MUST_MATCH}, "weights_sha256": info["weights_sha256"],
                  "train_data": dataset_fingerprint(train_source, config.dataset)}
    extra: dict[str, Any] = {}
    skipped: list[str] = []
    decoded = 0  # images decoded and run through the backbone (cached features cost none)

    with _progress(is_main and show) as progress:

        def features_of(images_source: ImageSource, indices: list[int], split: str) -> tuple[Tensor, Tensor]:
            """Cached features of un-augmented centre crops, extracted on a miss."""
            parts = {"weights_sha256": info["weights_sha256"], "data": dataset_fingerprint(images_source, config.dataset),
                     "split": split, "indices": indices if len(indices) != len(images_source) else "all",
                     "transform": repr(eval_tf), "mixed_precision": config.mixed_precision}
            key = cache_key(parts)
            hit = load_cached(cache_dir, key)
            extra.setdefault("feature_cache", {})[split] = {"key": key, "hit": hit is not None, "dir": str(cache_dir)}
            if hit is not None:
                return hit
            nonlocal decoded
            decoded += len(indices)
            task = progress.add_task(f"features {split}", total=len(indices))
            images = DecodedImages(images_source, eval_tf, strict=config.strict_data, indices=indices)
            features, labels, bad = extract(module, images,
                                            accelerator=accelerator, batch_size=config.batch_size, workers=workers,
                                            on_batch=lambda n: progress.advance(task, n))
            skipped.extend(bad)
            if is_main:
                save_cached(cache_dir, key, features, labels, parts)
            accelerator.wait_for_everyone()
            return features, labels

        if config.protocol == "linear":
            t = time.perf_counter()
            fit = fit_classifier(
                make_classifier(int(info["num_features"]), num_classes, config.seed),
                lambda epoch: SeededItems(DecodedImages(train_source, train_tf, strict=config.strict_data,
                                                        indices=train_indices), config.seed, epoch),
                encode=module, collate=image_batch, config=config, accelerator=accelerator, state_root=state_root,
                state_meta=state_meta, workers=workers, progress=progress)
            timings["train_s"] = time.perf_counter() - t
            skipped += fit["skipped"]
            t = time.perf_counter()
            hits, bad = evaluate_classifier(fit["classifier"], DecodedImages(eval_source, eval_tf, strict=config.strict_data,
                                                                             indices=eval_indices),
                                            encode=module, collate=image_batch, config=config, accelerator=accelerator,
                                            workers=workers, progress=progress)
            skipped += bad
            timings["eval_s"] = time.perf_counter() - t
            extra.update(epoch_losses=fit["epoch_losses"], resumed_from_epoch=fit["resumed_from_epoch"],
                         state_dir=str(state_root))
            decoded += (config.epochs - (fit["resumed_from_epoch"] or 0)) * len(train_indices) + len(eval_indices)
        else:
            t = time.perf_counter()
            train_features, train_labels = features_of(train_source, train_indices, "train")
            eval_features, eval_labels = (train_features, train_labels) if eval_source is train_source else \
                features_of(eval_source, eval_indices, config.split)
            timings["features_s"] = time.perf_counter() - t
            t = time.perf_counter()
            if config.protocol == "knn":
                device = accelerator.device
                scores = knn_scores(train_features.to(device), train_labels.to(device), eval_features.to(device),
                                    num_classes, k=config.knn_k, temperature=config.knn_temperature)
                hits = topk_hits(scores, eval_labels.to(device)).sum(0).cpu()
                extra["knn"] = {"k": min(config.knn_k, len(train_labels)), "temperature": config.knn_temperature}
                timings["knn_s"] = time.perf_counter() - t
            else:
                fit = fit_classifier(
                    make_classifier(train_features.shape[1], num_classes, config.seed),
                    lambda epoch: FeatureTensors(train_features, train_labels), encode=lambda x: x, collate=feature_batch,
                    config=config, accelerator=accelerator, state_root=state_root, state_meta=state_meta, workers=0,
                    progress=progress)
                timings["train_s"] = time.perf_counter() - t
                t = time.perf_counter()
                hits, _ = evaluate_classifier(fit["classifier"], FeatureTensors(eval_features, eval_labels),
                                              encode=lambda x: x,
                                              collate=feature_batch, config=config, accelerator=accelerator, workers=0,
                                              progress=progress)
                timings["eval_s"] = time.perf_counter() - t
                extra.update(epoch_losses=fit["epoch_losses"], resumed_from_epoch=fit["resumed_from_epoch"],
                             state_dir=str(state_root))

    check_frozen(before, module)  # raises if anything but the classifier changed

    n_eval = len(eval_indices)
    top1, top5 = (100.0 * hits / n_eval).tolist()
    note = {"linear": "", "knn": KNN_NOTE, "fast": FAST_NOTE}[config.protocol]
    result = {
        "top1": round(top1, 4), "top5": round(top5, 4), "top5_k": min(5, num_classes),
        "protocol": config.protocol, "paper_protocol": config.protocol == "linear" and config.augment, "note": note,
        "source": source, "source_info": info, "dataset": config.dataset, "split": config.split,
        "num_classes": num_classes, "class_order": _class_order(train_source),
        "train_images": len(train_indices), "eval_images": n_eval,
        "skipped_images": len(skipped), "skipped_examples": skipped[:10],
        "hyperparameters": config.to_dict(), "seed": config.seed,
        "train_transform": repr(train_tf), "eval_transform": repr(eval_tf),
        "frozen_backbone_check": "passed: no backbone weight or BatchNorm statistic changed",
        "num_processes": accelerator.num_processes, "device": str(accelerator.device),
        "versions": {"mochi_hub": __version__, "torch": torch.__version__, "timm": __import__("timm").__version__},
        **extra,
        "summary": {"images_seen": decoded, "images_skipped": len(skipped),
                    "resumes": int(extra.get("resumed_from_epoch") is not None),
                    "wall_time_s": round(time.perf_counter() - clock, 2),
                    "images_per_sec": round(decoded / (time.perf_counter() - clock), 2)},
        "time": {"started": started_at.isoformat(timespec="seconds"),
                 "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "seconds": round(time.perf_counter() - clock, 3), **{k: round(v, 3) for k, v in timings.items()}},
    }
    if is_main:
        if skipped:
            accelerator.print(f"{len(skipped)} unusable image(s) replaced by the next good one, e.g. {skipped[0]}")
        if config.output:
            _write_json(Path(config.output), result)
        if run_dir is not None:
            _write_json(run_dir / "probes" / f"{name}.json", result)
        if show:
            print_table(result)
    return result
