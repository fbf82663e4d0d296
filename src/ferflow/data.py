"""The training and inference loader: WebDataset shards -> batches of uint8 images with labels.

One pipeline per variant and split (``<shard_dir>/<split>/shard-*.tar``). Each loader worker reads
its own share of the shards and runs, in order::

    tar members (names checked) -> samples grouped by key (webdataset) -> labels from labels.parquet
    -> frame_step filter -> bootstrap repeats -> shuffle buffer -> [resume skip]
    -> JPEG decode -> resize -> augment -> batches of uint8 NCHW tensors

Workers return uint8 only; the model normalises on its device.

Determinism. For a given seed, epoch and worker count everything is a function of the seed: the
shard order, which shards each worker reads, the shuffle buffer's generator, the bootstrap counts
(a hash of key and seed) and each sample's augmentation (its own generator seeded from a hash of
seed, epoch, key and repeat). Batches carry the *logical* worker that made them and their index in
that worker's stream. :class:`DataPosition` records how many batches of each logical worker were
consumed; a loader built with that position skips exactly those samples (before decoding) and
rotates the worker roles so that the DataLoader's round-robin continues with the right worker. The
resumed stream is therefore the exact continuation of the interrupted one.
"""

from __future__ import annotations

import hashlib
import math
import random
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import polars as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2
from webdataset.tariterators import group_by_keys

from . import schemas
from .labels import EXPR_UNANNOTATED

try:  # the fastest JPEG decoder here (environment notes); deprecated since torchvision 0.29
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # a torchvision without image ops: OpenCV
    decode_jpeg = None

AUGMENTATIONS = ("flip", "crop", "color", "affine", "erase")
SHUFFLE_BUFFER = 2000


class UnsafeMemberError(ValueError):
    """A tar member name that could escape the extraction folder (absolute path or ``..``)."""


# --------------------------------------------------------------------------------------------
# hashing helpers


def _hash64(*parts: object) -> int:
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def bootstrap_count(key: str, seed: int) -> int:
    """How many times ``key`` appears in the bootstrap sample of ``seed``: k ~ Poisson(1).

    Derived from a hash of (key, seed), so it needs no state and no copy of the data: the same
    key and seed give the same count in every process. k = 0 drops the sample.
    """
    u = (_hash64("bootstrap", seed, key) >> 11) / float(1 << 53)  # uniform in [0, 1)
    k, p = 0, math.exp(-1.0)
    cdf = p
    while u >= cdf and k < 30:
        k += 1
        p /= k
        cdf += p
    return k


def _seed_for(*parts: object) -> int:
    return _hash64(*parts) & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------
# shards and labels


def list_shards(shard_dir: str | Path, split: str) -> list[Path]:
    """The shard tars of ``split``, sorted by name; empty when the split has none."""
    folder = Path(shard_dir) / split
    return sorted(folder.glob("shard-*.tar")) if folder.is_dir() else []


def check_member_name(name: str, shard: str | Path) -> None:
    """Raise :class:`UnsafeMemberError` naming ``shard`` for an absolute or ``..`` member name."""
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise UnsafeMemberError(
            f"{shard}: unsafe tar member name {name!r} (absolute path or '..'); "
            "refusing to read this shard"
        )


@dataclass
class LabelIndex:
    """Labels of one split, looked up by sample key. Built once in the main process."""

    rows: dict[str, int]
    expr: np.ndarray  # (n,) int64, -1 = no expression label
    va: np.ndarray  # (n, 2) float32, NaN = no label
    keep: np.ndarray  # (n,) bool: kept by frame_step
    source: list[str]
    video: list[str]
    frame: np.ndarray  # (n,) int64
    shard: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, key: str, shard: str) -> int:
        try:
            return self.rows[key]
        except KeyError:
            raise KeyError(f"{shard}: sample {key!r} has no row in labels.parquet") from None


def read_labels(shard_dir: str | Path) -> pl.DataFrame:
    return schemas.read_table(Path(shard_dir) / "labels.parquet", schemas.LABELS)


def frame_step_mask(labels: pl.DataFrame, frame_step: int) -> np.ndarray:
    """Keep every ``frame_step``-th frame of each video (in frame order, starting with the first)."""
    if frame_step <= 1:
        return np.ones(labels.height, dtype=bool)
    rank = (
        labels.with_row_index("_row")
        .with_columns(
            pl.col("frame").rank("ordinal").over(["split", "source", "video"]).alias("_rank")
        )
        .sort("_row")["_rank"]
        .to_numpy()
    )
    return (rank - 1) % frame_step == 0


def label_index(labels: pl.DataFrame, split: str, frame_step: int = 1) -> LabelIndex:
    labels = labels.filter(pl.col("split") == split)
    keys = labels["key"].to_list()
    rows = {k: i for i, k in enumerate(keys)}
    if len(rows) != len(keys):
        raise ValueError("labels.parquet: duplicate keys")
    expr = labels["expression"].cast(pl.Int64).fill_null(EXPR_UNANNOTATED).to_numpy()
    va = np.stack(
        [
            labels["valence"].cast(pl.Float32).fill_null(float("nan")).to_numpy(),
            labels["arousal"].cast(pl.Float32).fill_null(float("nan")).to_numpy(),
        ],
        axis=1,
    ).astype(np.float32)
    return LabelIndex(
        rows=rows,
        expr=np.ascontiguousarray(expr, dtype=np.int64),
        va=np.ascontiguousarray(va.reshape(-1, 2)),
        keep=frame_step_mask(labels, frame_step),
        source=labels["source"].to_list(),
        video=labels["video"].to_list(),
        frame=labels["frame"].to_numpy().astype(np.int64),
        shard=labels["shard"].to_list(),
    )


# --------------------------------------------------------------------------------------------
# transforms


def build_transform(input_size: int, augment: Sequence[str] = ()) -> v2.Compose:
    """Resize to ``input_size`` then the listed augmentations, all on uint8 CHW tensors."""
    unknown = [a for a in augment if a not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentations {unknown}; valid: {', '.join(AUGMENTATIONS)}")
    s = int(input_size)
    steps: list[Any] = [v2.Resize((s, s), antialias=True)]
    if "crop" in augment:  # the paper's random crop
        steps.append(v2.RandomResizedCrop(s, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True))
    if "flip" in augment:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if "color" in augment:  # the paper's colour jitter
        steps.append(v2.RandomApply([v2.ColorJitter(0.3, 0.3, 0.3, 0.05)], p=0.8))
    if "affine" in augment:  # DAN
        steps.append(
            v2.RandomApply([v2.RandomAffine(20, translate=(0.2, 0.2), scale=(0.8, 1.0))], p=0.7)
        )
    if "erase" in augment:  # DAN, on the uint8 image (value 0)
        steps.append(v2.RandomErasing(p=0.5, scale=(0.02, 0.25), value=0))
    return v2.Compose(steps)


def decode_image(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 RGB (3, H, W)."""
    if decode_jpeg is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not a decodable JPEG")
    return torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1)))


# --------------------------------------------------------------------------------------------
# the stream


@dataclass
class DataPosition:
    """Where a training epoch's stream stands: batches consumed per logical worker.

    ``next_worker`` is the logical worker whose batch the DataLoader's round-robin asks for next.
    """

    epoch: int
    batches: list[int]
    next_worker: int = 0

    def advance(self, worker: int) -> None:
        self.batches[worker] += 1
        self.next_worker = (worker + 1) % len(self.batches)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": list(self.batches), "next_worker": self.next_worker}

    @classmethod
    def from_state(cls, state: dict) -> "DataPosition":
        return cls(int(state["epoch"]), [int(b) for b in state["batches"]], int(state["next_worker"]))

    @classmethod
    def start(cls, epoch: int, workers: int) -> "DataPosition":
        return cls(epoch, [0] * max(1, workers), 0)


def _tar_members(sources: Iterable[dict]) -> Iterator[dict]:
    """Members of each shard as {fname, data, __url__}, an empty dict after each shard."""
    for src in sources:
        url = src["url"]
        with open(url, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for info in tar:
                check_member_name(info.name, url)
                if info.isreg():
                    member = tar.extractfile(info)
                    assert member is not None
                    yield {"fname": info.name, "data": member.read(), "__url__": url}
                tar.members = []  # streaming: do not keep every TarInfo
        yield {}  # end of shard: webdataset's group_by_keys never joins samples across shards


@dataclass
class ShardStream(IterableDataset):
    """An IterableDataset over one split's shards; yields collated batches (see module doc)."""

    shards: list[Path]
    index: LabelIndex
    batch_size: int
    input_size: int
    augment: tuple[str, ...] = ()
    train: bool = False
    seed: int = 0
    epoch: int = 0
    bootstrap: bool = False
    workers: int = 0
    shuffle_buffer: int = SHUFFLE_BUFFER
    position: DataPosition | None = None
    _transform: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.augment = tuple(self.augment)
        self._transform = build_transform(self.input_size, self.augment)
        if self.position is None:
            self.position = DataPosition.start(self.epoch, self.workers)
        if len(self.position.batches) != self.n_logical:
            raise ValueError(
                f"data position has {len(self.position.batches)} workers, loader has {self.n_logical}"
            )

    @property
    def n_logical(self) -> int:
        return max(1, self.workers)

    def shard_order(self) -> list[Path]:
        shards = sorted(self.shards)
        if self.train:
            random.Random(_seed_for("shards", self.seed, self.epoch)).shuffle(shards)
        return shards

    def worker_shards(self, logical: int) -> list[Path]:
        return self.shard_order()[logical :: self.n_logical]

    def repeats(self, key: str) -> int:
        return bootstrap_count(key, self.seed) if (self.train and self.bootstrap) else 1

    # --- pipeline stages (generators over samples)

    def _attach(self, samples: Iterable[dict]) -> Iterator[dict]:
        for s in samples:
            key, url = s["__key__"], s["__url__"]
            if "jpg" not in s:
                raise ValueError(f"{url}: sample {key!r} has no .jpg member")
            row = self.index.lookup(key, url)
            if self.train and not self.index.keep[row]:
                continue
            for rep in range(self.repeats(key)):
                yield {"key": key, "row": row, "rep": rep, "jpg": s["jpg"]}

    def _skip(self, samples: Iterable[dict], n: int) -> Iterator[dict]:
        for i, s in enumerate(samples):
            if i >= n:
                yield s

    def _decode(self, s: dict) -> dict:
        img = decode_image(s["jpg"])
        if self.train and self.augment:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(_seed_for("aug", self.seed, self.epoch, s["key"], s["rep"]))
                img = self._transform(img)
        else:
            img = self._transform(img)
        return {"key": s["key"], "row": s["row"], "image": img}

    def _collate(self, samples: list[dict]) -> dict:
        rows = np.array([s["row"] for s in samples], dtype=np.int64)
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "expr": torch.from_numpy(self.index.expr[rows]),
            "va": torch.from_numpy(self.index.va[rows]),
            "key": [s["key"] for s in samples],
        }

    def _batches(self, logical: int) -> Iterator[dict]:
        assert self.position is not None
        done = self.position.batches[logical]
        skip = done * self.batch_size
        urls = [{"url": str(p)} for p in self.worker_shards(logical)]
        stages: list[Any] = [
            lambda: iter(urls),
            _tar_members,
            group_by_keys,
            self._attach,
        ]
        if self.train:
            rng = random.Random(_seed_for("buffer", self.seed, self.epoch, logical))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        if skip:
            stages.append(lambda src: self._skip(src, skip))
        stages += [wds.map(self._decode), wds.batched(self.batch_size, collation_fn=self._collate)]
        for i, batch in enumerate(wds.DataPipeline(*stages)):
            batch["worker"] = logical
            batch["index"] = done + i
            yield batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, n_physical = (0, 1) if info is None else (info.id, info.num_workers)
        if n_physical != self.n_logical:
            raise RuntimeError(f"loader built for {self.n_logical} workers runs on {n_physical}")
        assert self.position is not None
        # The DataLoader asks physical workers 0, 1, ... in turn; physical 0 plays the logical
        # worker whose batch comes next, so a resumed stream continues the round-robin exactly.
        logical = (physical + self.position.next_worker) % self.n_logical
        yield from self._batches(logical)

    # --- sizes, from labels.parquet (no shard is opened)

    def samples_per_worker(self) -> list[int]:
        per_shard: dict[str, int] = {}
        for row, key in enumerate(self.index.rows):
            if self.train and not self.index.keep[row]:
                continue
            per_shard[self.index.shard[row]] = per_shard.get(self.index.shard[row], 0) + self.repeats(key)
        counts = []
        for w in range(self.n_logical):
            counts.append(sum(per_shard.get(_relative_shard(p), 0) for p in self.worker_shards(w)))
        return counts

    def batches_per_worker(self) -> list[int]:
        return [math.ceil(n / self.batch_size) for n in self.samples_per_worker()]


def _relative_shard(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def make_loader(
    shard_dir: str | Path,
    split: str,
    *,
    batch_size: int,
    input_size: int,
    train: bool,
    augment: Sequence[str] = (),
    seed: int = 0,
    epoch: int = 0,
    bootstrap: bool = False,
    frame_step: int = 1,
    workers: int = 0,
    position: DataPosition | None = None,
    labels: pl.DataFrame | None = None,
    index: LabelIndex | None = None,
    pin_memory: bool = False,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> tuple[DataLoader, ShardStream]:
    """A DataLoader over ``split`` and the ShardStream behind it (for sizes and positions).

    ``train=False`` reads every sample once, in shard order, without augmentation, bootstrap or
    frame subsampling (validation, prediction).
    """
    shards = list_shards(shard_dir, split)
    if not shards:
        raise FileNotFoundError(f"{Path(shard_dir) / split}: no shard-*.tar files")
    if index is None:
        index = label_index(read_labels(shard_dir) if labels is None else labels, split, frame_step if train else 1)
    stream = ShardStream(
        shards=shards,
        index=index,
        batch_size=batch_size,
        input_size=input_size,
        augment=tuple(augment) if train else (),
        train=train,
        seed=seed,
        epoch=epoch,
        bootstrap=bootstrap,
        workers=workers,
        shuffle_buffer=shuffle_buffer,
        position=position,
    )
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=False)
    if position is not None:  # the stream reads it; the caller's copy advances independently
        stream.position = DataPosition.from_state(position.state_dict())
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, **kwargs)
    return loader, stream
