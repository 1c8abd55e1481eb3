"""Parquet/Arrow shards read as bytes: a Hub dataset id, or a local folder in the Hub's layout
(`data/<split>-NNNNN-of-MMMMM.parquet` with an `image` and a `label` column, as `datasets` writes it).

Map-style (the default; datasets.HubImages): `datasets` converts the shards once into its Arrow cache and
memory-maps it; every process sees every row, GlobalBatches gives each its share, and a resumed run continues
exactly where it stopped.

Streaming (`--streaming`, `ShardStream`): nothing is converted or downloaded ahead. Each process reads its own shards
(`datasets.distributed.split_dataset_by_node`: whole shards when their number divides by the processes, else every
process reads all and keeps one row in `world`), each loader worker its own part of those, in a seeded shuffle (the
shard order, then a buffer of rows) that changes with the epoch (`set_epoch`). An epoch is len // batch steps on
every process: a process whose shards run out first starts them again, so no process waits for another. A resumed
run skips, in each worker, the rows that worker had delivered (read, not decoded; the few batches of the round that
started before the resume point are decoded and dropped): exact when the number of processes and loader workers is
the same and every worker has shards; otherwise it continues with rows of the same epoch's stream, not the same ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from mochi_hub.config import TrainConfig
from mochi_hub.core.seeding import stream_seed
from mochi_hub.data.augment import TwoViews, moco_v2_transform
from mochi_hub.data.datasets import (
    HUB_SOURCES,
    SUBSETS,
    UNUSABLE,
    BadImageError,
    Sample,
    check_dataset_spec,
    decode_rgb,
    image_bytes,
    is_shard_folder,
    load_split,
    subset_labels,
)
from mochi_hub.data.decode import min_decoded_side, worker_image
from mochi_hub.data.sampling import seeded_rng
from mochi_hub.errors import InputError, OptionError

SHUFFLE_BUFFER = 10_000  # rows shuffled together in a stream, after the shard order is shuffled


class ShardStream:
    """A split's shards as a stream of (encoded image, label) rows (`--streaming`), with what the loop needs to
    know ahead: the number of images (len), the classes."""

    def __init__(self, spec: str, split: str, *, keep: list[str] | None = None):
        import datasets

        stream, self.split_name = load_split(spec, split, streaming=True)
        self.name, features = spec, stream.features
        self.image_column = next((c for c in ("image", "img", "jpg", "png") if c in features), None)
        self.label_column = next((c for c in ("label", "labels", "cls", "fine_label") if c in features), None)
        if self.image_column is None:
            raise InputError(f"--dataset {spec}: no image column among {list(features)}")
        if isinstance(features[self.image_column], datasets.Image):
            stream = stream.cast_column(self.image_column, datasets.Image(decode=False))
        label_feature = features.get(self.label_column) if self.label_column else None
        self.classes = list(getattr(label_feature, "names", None) or [])
        self.label_map = subset_labels(self.classes, keep, spec) if keep is not None else None
        if self.label_map is not None:
            wanted = set(self.label_map)
            stream = stream.filter(lambda label: label in wanted, input_columns=self.label_column)
            self.classes = list(keep)
        self.stream, self.size = stream, self._count(spec)

    def _count(self, spec: str) -> int:
        """The split's images: from the shards' own metadata (local Parquet; with a subset, its label column
        alone), else from the dataset's info on the Hub."""
        files = sorted((Path(spec).expanduser() / "data").glob(f"{self.split_name}-*.parquet"))
        if files:
            import pyarrow.parquet as pq

            if self.label_map is None:
                return sum(pq.read_metadata(f).num_rows for f in files)
            labels = (pq.read_table(f, columns=[self.label_column]).column(0).to_pylist() for f in files)
            return sum(label in self.label_map for column in labels for label in column)
        splits = self.stream.info.splits or {}
        if self.label_map is None and self.split_name in splits and splits[self.split_name].num_examples:
            return splits[self.split_name].num_examples
        raise InputError(
            f"--streaming: the number of images in {spec} ({self.split_name}) is not known without reading it all "
            "(its card gives no split sizes, or a subset is asked of a Hub copy); download it (no --streaming) or "
            "use local shards"
        )

    def __len__(self) -> int:
        return self.size

    def describe(self, where: str) -> str:
        """An image's id for reports: the split and its place in the stream (a stream has no indices)."""
        return f"{self.name}[{self.split_name}, {where}]"

    def views(self, config: TrainConfig, output: str) -> StreamingViews:
        if config.max_train_images is not None:
            raise OptionError("--max-train-images takes the first images of a map-style source: not with --streaming")
        return StreamingViews(self, config, output)


class StreamingViews(IterableDataset):
    """A ShardStream -> Samples, as `pretraining_views` makes them from a map-style source (views, pixels or bytes).
    PretrainingLoader sets `rank`/`world` once and `epoch`/`start` before each epoch's workers are forked. The
    worker path's views are seeded by (seed, epoch, rank, worker, position in the worker's stream)."""

    def __init__(self, shards: ShardStream, config: TrainConfig, output: str):
        self.shards, self.config, self.output = shards, config, output
        self.rank, self.world, self.epoch, self.start = 0, 1, 0, 0
        if output == "views":
            self.transform = TwoViews(moco_v2_transform(config.image_size))
            self.decode = partial(decode_rgb, min_side=min_decoded_side(config.image_size))
        else:
            self.transform = partial(
                worker_image, min_side=min_decoded_side(config.image_size), keep_jpeg=output == "bytes"
            )
            self.decode = None

    def __len__(self) -> int:
        return len(self.shards)

    def _rows(self, worker: int) -> Iterator[dict[str, Any]]:
        """This worker's rows of the epoch, again from the start whenever they run out (never empty-handed)."""
        from datasets.distributed import split_dataset_by_node

        stream = split_dataset_by_node(self.shards.stream, rank=self.rank, world_size=self.world)
        stream = stream.shuffle(seed=stream_seed(self.config.seed, "data_order") % 2**32, buffer_size=SHUFFLE_BUFFER)
        stream.set_epoch(self.epoch)
        while True:
            rows = 0
            for row in stream:
                rows += 1
                yield row
            if rows == 0:
                return  # a worker without shards (more workers than this process's shards)

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        local_batch = self.config.batch_size // self.world
        # Workers take turns, batch by batch, from worker 0: a start mid-epoch resumes each worker at the round that
        # holds batch `start` (PretrainingLoader drops that round's batches before it).
        position = self.start // workers * local_batch
        rows = self._rows(worker)
        for _ in range(position):
            if next(rows, None) is None:
                return
        skipped = []
        for row in rows:
            name = self.shards.describe(f"rank {self.rank}, worker {worker}, row {position}")
            try:
                raw = image_bytes(row[self.shards.image_column])
                if self.decode is None:
                    image = self.transform(raw)
                else:
                    key = stream_seed(self.config.seed, "augment", self.epoch, self.rank, worker, position)
                    with seeded_rng(key):
                        image = self.transform(self.decode(raw))
            except UNUSABLE as error:
                reason = f"{name}: {type(error).__name__}: {error}"
                if self.config.strict_data:
                    raise BadImageError(f"unusable image (--strict-data): {reason}") from error
                skipped.append(reason)
                continue
            finally:
                position += 1
            yield Sample(image, self._label(row), skipped, name)
            skipped = []

    def _label(self, row: dict[str, Any]) -> int:
        if not self.shards.label_column:
            return -1
        label = int(row[self.shards.label_column])
        return self.shards.label_map[label] if self.shards.label_map is not None else label


def resolve_stream(spec: str, split: str, data_root: str | None = None) -> ShardStream:
    """`--dataset ... --streaming` -> a ShardStream: a Hub id or a folder of shards, or a named source read out of
    the shards in --data-root (a subset keeps its own class order)."""
    check_dataset_spec(spec, data_root)
    if data_root is not None:
        root = Path(data_root).expanduser()
        if not is_shard_folder(root):
            raise OptionError(
                f"--streaming reads shards: --data-root {root} has no data/{split}-*.parquet (an image folder is read "
                "without --streaming, file by file)"
            )
        return ShardStream(str(root), split, keep=SUBSETS.get(spec))
    path = Path(spec).expanduser()
    if path.is_dir() and not is_shard_folder(path):
        raise OptionError(
            f"--streaming reads shards: --dataset {spec} has no data/{split}-*.parquet (an image folder is read "
            "without --streaming, file by file)"
        )
    return ShardStream(HUB_SOURCES.get(spec, spec), split)
