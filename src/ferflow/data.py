"""The training and inference loader: WebDataset shards -> batches of uint8 images with labels.

One pipeline per variant and split (``<shard_dir>/<split>/shard-*.tar``). Each loader worker reads
its own share of the shards and runs, in order::

    tar members (names checked) -> samples grouped by key (as webdataset) -> labels from labels.parquet
    -> frame_step filter -> bootstrap repeats -> shuffle buffer -> [resume skip] -> batches of
    JPEG bytes -> per sample: decode, resize, crop / flip / affine, colour, erase, written into
    the batch's uint8 (B, H, W, 3) buffer

Workers return uint8 only (NCHW tensors with channels-last strides: what the GPU wants); the
model normalises on its device. Batches carry ``weight``: per-sample loss weights, 1 unless
``class_balance`` (inverse class frequency, see :func:`class_balance_weights`). A worker writes
its batches into a few reusable shared-memory slots and the main process copies each batch out
(:meth:`ShardStream.attach_ring`, :class:`Loader`): a fresh shared-memory tensor per batch, as
torch's DataLoader would make, costs about as much as decoding the batch. The training and
inference loops borrow the slot instead (``borrow=True``: the images are used where they are,
and the slot is given back when the next batch is asked for), which saves the main process a
copy of every image.

Speed. The image work is a few OpenCV calls per sample (:class:`ferflow.augment.Augment`), and
shards are read by a small tar reader (:func:`ferflow.shardio.read_tar`). ``bench/loader.py``
compares this with a torchvision folder loader and with plain JPEG decoding.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import cv2
import numpy as np
import polars as pl
import pyarrow as pa
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import schemas
from .augment import HashDraws, build_transform
from .labels import EXPR_UNANNOTATED, NUM_EXPRESSIONS
from .shardio import list_shards, shard_samples


SHUFFLE_BUFFER = 2000
PREFETCH = 4  # batches in flight per loader worker, when shared memory allows
SHM = "/dev/shm"  # where torch's shared-memory tensors live (shm_open)


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous part ``[start, stop)`` of a global batch of ``n`` that ``rank`` of ``world``
    trains on: every sample in exactly one rank's part, sizes differing by at most one."""
    return n * rank // world, n * (rank + 1) // world


def shm_free_bytes(path: str = SHM) -> int:
    """Free bytes of the shared-memory filesystem (``statvfs``); 0 when it cannot be read."""
    import os

    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def ring_slots(workers: int, slot_bytes: int, free: int) -> int:
    """Batch slots per loader worker: ``PREFETCH + 2`` when they take at most half of the free
    shared memory, fewer when not, down to 3 (one batch in flight, one being written, one in the
    main process). Raises RuntimeError, naming /dev/shm and the sizes, when even 3 slots per
    worker do not fit in ``free`` bytes (a container's default 64 MB /dev/shm: a bus error hours
    later otherwise)."""
    need = 3 * workers * slot_bytes
    if need > free:
        raise RuntimeError(
            f"{SHM} has {free / 2**20:.1f} MiB free; the loader needs {need / 2**20:.1f} MiB of shared memory "
            f"({workers} workers x 3 batch slots x {slot_bytes / 2**20:.2f} MiB): give the container more shared "
            f"memory (docker run --shm-size=..., or a larger /dev/shm), or use fewer workers")
    return int(max(3, min(PREFETCH + 2, (free // 2) // (workers * slot_bytes))))


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


def _poisson1_cdf() -> np.ndarray:
    """Poisson(1)'s CDF at k = 0..29, summed in :func:`bootstrap_count`'s order (bit for bit)."""
    cdf, p, out = 0.0, math.exp(-1.0), []
    for k in range(30):
        if k:
            p /= k
        cdf += p
        out.append(cdf)
    return np.array(out, dtype=np.float64)


_POISSON1_CDF = _poisson1_cdf()


def bootstrap_counts(keys: Iterable[bytes | str], seed: int) -> np.ndarray:
    """:func:`bootstrap_count` of many keys at once: (n,) int64, element for element equal to it.

    Still one blake2b call per key (that is what makes a count a function of key and seed alone),
    but no Python loop over the inverse CDF: k is the number of the CDF's running sums (the same
    floats as bootstrap_count's) at or below u, at most 30. ``keys``: str or their UTF-8 bytes
    (e.g. a :class:`LabelIndex`'s key array).
    """
    prefix = f"bootstrap\x1f{seed}\x1f".encode("utf-8")
    blake2b = hashlib.blake2b
    digests = b"".join(
        blake2b(prefix + (k if isinstance(k, bytes) else k.encode("utf-8")), digest_size=8).digest() for k in keys)
    u = (np.frombuffer(digests, dtype="<u8") >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.searchsorted(_POISSON1_CDF, u, side="right").astype(np.int64)


def _seed_for(*parts: object) -> int:
    return _hash64(*parts) & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------
# labels


@dataclass
class LabelIndex:
    """Labels of one split, looked up by sample key. Built once in the main process.

    No Python object per row: the loader's workers are forked and look a row up per sample, and
    touching a Python object (its reference count) in a forked worker copies the memory page it
    lies on, so a dict of keys or lists of strings per row would become a private copy of the whole
    index in every worker (pytorch/pytorch#13246, "DataLoader num_workers > 0 causes CPU memory from
    parent process to be replicated in all worker processes"; ``bench/label_index.py`` measures it
    here). Here every per-row column is one numpy array: the keys a sorted fixed-width
    bytes array searched with ``np.searchsorted``; source, video and shard int32 codes into
    sorted fixed-width bytes arrays of their distinct names (AffectNet and ExpW have a "video"
    per image: hundreds of thousands of names). Nothing here calls polars, whose thread pool a
    forked worker must not use. Rows are in labels.parquet's order (of the split).
    """

    keys: np.ndarray  # (n,) bytes "S<w>": the UTF-8 keys, sorted
    key_rows: np.ndarray  # (n,) int64: the row of keys[i]
    expr: np.ndarray  # (n,) int64, -1 = no expression label
    va: np.ndarray  # (n, 2) float32, NaN = no label
    keep: np.ndarray  # (n,) bool: kept by frame_step
    source_code: np.ndarray  # (n,) int32 into source_names
    video_code: np.ndarray  # (n,) int32 into video_names
    frame: np.ndarray  # (n,) int64
    shard_code: np.ndarray  # (n,) int32 into shard_names
    source_names: np.ndarray  # (sources,) bytes "S<w>": sorted distinct sources, UTF-8
    video_names: np.ndarray  # (videos,) bytes "S<w>": sorted distinct videos, UTF-8
    shard_names: np.ndarray  # (shards,) bytes "S<w>": sorted distinct shards ("<split>/shard-NNNNNN.tar")

    def __len__(self) -> int:
        return len(self.key_rows)

    def lookup(self, key: str, shard: str) -> int:
        """The row of ``key``; KeyError naming ``shard`` (where the sample was read) when the key
        is not in the split's labels."""
        kb = key.encode("utf-8")
        i = int(self.keys.searchsorted(kb))
        if i < len(self.keys) and self.keys[i] == kb:  # keys[i]: trailing NULs dropped, so b"k\0" != b"k"
            return int(self.key_rows[i])
        raise KeyError(f"{shard}: sample {key!r} has no row in labels.parquet")

    def rows_of(self, keys: Sequence[str], where: str = "labels.parquet") -> np.ndarray:
        """Rows of ``keys``: (len(keys),) int64; KeyError (as :meth:`lookup`, naming ``where``)
        for the first key that has no row."""
        return np.fromiter((self.lookup(k, where) for k in keys), dtype=np.int64, count=len(keys))

    def source_of(self, row: int) -> str:
        return self.source_names[self.source_code[row]].decode("utf-8")

    def video_of(self, row: int) -> str:
        return self.video_names[self.video_code[row]].decode("utf-8")

    def shard_of(self, row: int) -> str:
        """The shard (``<split>/shard-NNNNNN.tar``, as in labels.parquet) that holds ``row``."""
        return self.shard_names[self.shard_code[row]].decode("utf-8")


def read_labels(shard_dir: str | Path) -> pl.DataFrame:
    return schemas.read_table(Path(shard_dir) / "labels.parquet", schemas.LABELS)


def frame_step_mask(labels: pl.DataFrame, frame_step: int) -> np.ndarray:
    """Keep every ``frame_step``-th frame of each video (in frame order, starting with the first);
    faces of still images (``still``, image sources) are all kept."""
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
    keep = (rank - 1) % frame_step == 0
    if "still" in labels.columns:
        keep |= labels["still"].fill_null(False).to_numpy()
    return keep


#: Arrow's variable-size binary layouts: validity, offsets (this dtype), data
_ARROW_OFFSETS = {pa.large_string(): np.dtype(np.int64), pa.large_binary(): np.dtype(np.int64),
                  pa.string(): np.dtype(np.int32), pa.binary(): np.dtype(np.int32)}


def fixed_width_bytes(strings: pl.Series, order: np.ndarray | None = None, chunk: int = 1 << 16) -> np.ndarray:
    """A String Series (its elements in ``order`` when given) as a numpy fixed-width bytes array
    ``S<w>`` (w: the longest UTF-8 length), copied from the Arrow buffers of ``chunk`` elements at a
    time: no Python object per element, and little memory besides the result. Raises ValueError
    when an element is null or contains a NUL byte ('S' arrays drop trailing NULs)."""
    if strings.null_count():
        raise ValueError(f"{strings.null_count()} null values")
    n = len(strings) if order is None else len(order)
    width = max(1, int(strings.str.len_bytes().max() or 0))
    out = np.zeros((n, width), dtype=np.uint8)
    for start in range(0, n, chunk):
        part = strings.slice(start, chunk) if order is None else strings.gather(order[start:start + chunk])
        arr = part.to_arrow()
        arr = arr.combine_chunks() if hasattr(arr, "combine_chunks") else arr
        if arr.type not in _ARROW_OFFSETS:  # e.g. string_view; a cast costs ~50 MB of kernels once
            arr = arr.cast(pa.large_binary())
        off = _ARROW_OFFSETS[arr.type]
        offsets = np.frombuffer(arr.buffers()[1], dtype=off, count=len(arr) + 1, offset=arr.offset * off.itemsize)
        data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
        if (data == 0).any():
            raise ValueError("a value contains a NUL byte")
        lengths = np.diff(offsets)
        # row-major: the masked bytes of the rows are the values one after the other
        out[start:start + len(arr)][np.arange(width) < lengths[:, None]] = data
    return out.view(f"S{width}").reshape(n)


def _codes(values: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(int32 codes, sorted distinct values as :func:`fixed_width_bytes`) of a String Series:
    ``values[i] == names[codes[i]].decode()``. Raises ValueError naming the column when a value is
    null or holds a NUL byte."""
    names = values.unique().sort()
    try:
        fixed = fixed_width_bytes(names)
    except ValueError as exc:
        raise ValueError(f"labels.parquet: {values.name} column: {exc}") from None
    return values.cast(pl.Enum(names)).to_physical().to_numpy().astype(np.int32), fixed


def label_index(labels: pl.DataFrame, split: str, frame_step: int = 1) -> LabelIndex:
    """The :class:`LabelIndex` of ``split``'s rows of ``labels`` (LABELS columns), with
    :func:`frame_step_mask`'s ``keep``. Raises ValueError "labels.parquet: duplicate keys" when a
    key is in the split twice, or naming the problem when a key is null or holds a NUL byte."""
    labels = labels.filter(pl.col("split") == split)
    order = labels["key"].arg_sort().to_numpy().astype(np.int64)
    try:
        keys = fixed_width_bytes(labels["key"], order)
    except ValueError as exc:
        raise ValueError(f"labels.parquet: key column: {exc}") from None
    if not (keys[:-1] <= keys[1:]).all():  # polars' order is bytewise; numpy's searchsorted needs its own
        resort = np.argsort(keys, kind="stable")
        order, keys = order[resort], keys[resort]
    if (keys[:-1] == keys[1:]).any():
        raise ValueError("labels.parquet: duplicate keys")
    expr = labels["expression"].cast(pl.Int64).fill_null(EXPR_UNANNOTATED).to_numpy()
    va = np.stack(
        [
            labels["valence"].cast(pl.Float32).fill_null(float("nan")).to_numpy(),
            labels["arousal"].cast(pl.Float32).fill_null(float("nan")).to_numpy(),
        ],
        axis=1,
    ).astype(np.float32)
    source_code, source_names = _codes(labels["source"])
    video_code, video_names = _codes(labels["video"])
    shard_code, shard_names = _codes(labels["shard"])
    return LabelIndex(
        keys=keys,
        key_rows=order,
        expr=np.ascontiguousarray(expr, dtype=np.int64),
        va=np.ascontiguousarray(va.reshape(-1, 2)),
        keep=frame_step_mask(labels, frame_step),
        source_code=source_code,
        video_code=video_code,
        frame=labels["frame"].to_numpy().astype(np.int64),
        shard_code=shard_code,
        source_names=source_names,
        video_names=video_names,
        shard_names=shard_names,
    )


# --------------------------------------------------------------------------------------------
# class balance


def class_balance_weights(expr: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Per-sample weights ``n / (k * n_c)`` (float32): each of the ``k`` classes present among the
    kept labelled samples gets the same total weight, and the mean weight of those samples is 1.
    Samples without an expression label (``-1``: VA only) keep weight 1."""
    expr = np.asarray(expr, dtype=np.int64)
    keep = np.ones(expr.shape, bool) if keep is None else np.asarray(keep, bool)
    labelled = expr >= 0
    counts = np.bincount(expr[labelled & keep], minlength=NUM_EXPRESSIONS).astype(np.float64)
    present = counts > 0
    per_class = np.zeros(counts.shape, np.float64)
    per_class[present] = counts.sum() / (present.sum() * counts[present])
    weights = np.ones(expr.shape, np.float32)
    weights[labelled] = per_class[expr[labelled]]
    return weights


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
    class_balance: bool = False
    rank: int = 0
    world: int = 1
    _transform: Any = field(default=None, repr=False)
    _weight: Any = field(default=None, repr=False)
    _ring: Any = field(default=None, repr=False)  # per worker: (slots, B, H, W, 3) uint8 in shared memory
    _free: Any = field(default=None, repr=False)  # per worker: semaphore counting its free slots
    _next_slot: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.augment = tuple(self.augment)
        self._transform = build_transform(self.input_size, self.augment)
        if self.class_balance:
            self._weight = class_balance_weights(self.index.expr, self.index.keep if self.train else None)
        else:
            self._weight = np.ones(len(self.index.expr), np.float32)
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

    def _collate(self, samples: list[dict]) -> dict:
        """Decode and augment a batch of raw samples straight into one uint8 (B, H, W, 3) buffer
        (in shared memory inside a worker, so that it reaches the main process without another
        copy, as torch's default_collate does), returned as NCHW with channels-last strides."""
        n, size = len(samples), self.input_size
        a, b = rank_slice(n, self.rank, self.world)  # this rank decodes only its part; labels: all
        images, slot = self._images(b - a)
        buf = images.numpy()
        for i, s in enumerate(samples[a:b]):
            rng = None
            if self.train and self.augment:
                rng = HashDraws("aug", self.seed, self.epoch, s["key"], s["rep"])
            try:
                self._transform(s["jpg"], rng, buf[i])
            except ValueError as exc:
                raise ValueError(f"{self.index.shard_of(s['row'])}: sample {s['key']!r}: {exc}") from None
        rows = np.array([s["row"] for s in samples], dtype=np.int64)
        part = {"part": (a, b)} if self.world > 1 else {}
        if slot is not None:  # numpy, not tensors: a tensor sent by a worker costs a shared-memory segment
            return {"expr": self.index.expr[rows], "va": self.index.va[rows], "weight": self._weight[rows],
                    "key": [s["key"] for s in samples], "_slot": slot, **part}
        return {
            "image": images.permute(0, 3, 1, 2),
            "expr": torch.from_numpy(self.index.expr[rows]),
            "va": torch.from_numpy(self.index.va[rows]),
            "weight": torch.from_numpy(self._weight[rows]),
            "key": [s["key"] for s in samples],
            **part,
        }

    # --- the batch images' memory

    def attach_ring(self, slots: int) -> None:
        """Give each worker ``slots`` reusable batch buffers in shared memory (made here, before
        the workers start). A worker writes a batch into its next free slot and sends only the
        slot's number; :class:`Loader` copies the images out in the main process and frees the
        slot. This replaces a fresh shared-memory tensor per batch (new pages, mapped and zeroed
        for every batch: as costly as decoding the images, see ``bench/loader.py``)."""
        s, b = self.input_size, self.slot_images()
        ctx = torch.multiprocessing.get_context()
        self._ring = [torch.empty((slots, b, s, s, 3), dtype=torch.uint8).share_memory_() for _ in range(self.workers)]
        self._free = [ctx.BoundedSemaphore(slots) for _ in range(self.workers)]

    def slot_images(self) -> int:
        """Images per batch slot: this rank's largest part of a batch."""
        return max(b - a for a, b in (rank_slice(self.batch_size, r, self.world) for r in range(self.world)))

    def slot_bytes(self) -> int:
        return self.slot_images() * self.input_size**2 * 3

    def _images(self, n: int) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
        info = get_worker_info()
        if self._ring is None or info is None:
            return torch.empty((n, self.input_size, self.input_size, 3), dtype=torch.uint8), None
        worker = info.id
        if not self._free[worker].acquire(timeout=600):
            raise RuntimeError(f"loader worker {worker}: no batch slot freed in 600 s (is the main process reading?)")
        k = self._next_slot
        self._next_slot = (k + 1) % self._ring[worker].shape[0]
        return self._ring[worker][k, :n], (worker, k, n)

    def take(self, batch: dict, pin_memory: bool = False, borrow: bool = False) -> tuple[dict, tuple | None]:
        """In the main process: the images of a batch made in a slot, as tensors.

        Copied out of the slot, which is freed (into pinned memory with ``pin_memory``: CUDA's
        caching host allocator reuses pinned blocks); or, with ``borrow``, a view of the slot
        itself: no copy, and the slot stays taken until :meth:`release` of the returned slot.
        Returns the batch and the slot still taken (None when freed).
        """
        slot = batch.pop("_slot", None)
        if slot is None:
            return batch, None
        worker, k, n = slot
        images = self._ring[worker][k, :n]
        lent = borrow and not pin_memory
        if pin_memory:
            images = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True).copy_(images)
        elif not lent:  # numpy's (malloc's) memory is reused from batch to batch, and its copy is
            # one plain memcpy (torch's copy_ spreads it over intra-op threads that the workers use)
            images = torch.from_numpy(images.numpy().copy())
        batch["image"] = images.permute(0, 3, 1, 2)
        for name in ("expr", "va", "weight"):
            batch[name] = torch.as_tensor(batch[name])
        if lent:
            return batch, slot
        self.release(slot)
        return batch, None

    def release(self, slot: tuple) -> None:
        """Free a slot that :meth:`take` lent (its images must no longer be used)."""
        self._free[slot[0]].release()

    def _batches(self, logical: int) -> Iterator[dict]:
        assert self.position is not None
        done = self.position.batches[logical]
        skip = done * self.batch_size
        urls = [str(p) for p in self.worker_shards(logical)]
        stages: list[Any] = [
            lambda: (sample for url in urls for sample in shard_samples(url)),
            self._attach,
        ]
        if self.train:
            rng = random.Random(_seed_for("buffer", self.seed, self.epoch, logical))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        if skip:
            stages.append(lambda src: self._skip(src, skip))
        stages.append(wds.batched(self.batch_size, collation_fn=self._collate))
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
        """Samples each logical worker yields this epoch (kept rows times their bootstrap counts,
        summed over the worker's shards), from the label index alone."""
        index = self.index
        kept = index.keep if self.train else np.ones(len(index), bool)
        if self.train and self.bootstrap:
            k = np.zeros(len(index), np.int64)
            at = np.flatnonzero(kept[index.key_rows])  # positions in the key array of the kept rows
            for a in range(0, len(at), 1 << 16):  # a chunk's keys at a time (not a copy of them all)
                part = at[a:a + (1 << 16)]
                k[index.key_rows[part]] = bootstrap_counts(index.keys[part], self.seed)
        else:
            k = kept.astype(np.int64)
        per_code = np.bincount(index.shard_code, weights=k, minlength=len(index.shard_names))
        names = [n.decode("utf-8") for n in index.shard_names]
        per_shard = dict(zip(names, per_code.round().astype(np.int64).tolist()))
        return [sum(per_shard.get(_relative_shard(p), 0) for p in self.worker_shards(w))
                for w in range(self.n_logical)]

    def batches_per_worker(self) -> list[int]:
        return [math.ceil(n / self.batch_size) for n in self.samples_per_worker()]


def _one_thread(worker_id: int) -> None:
    """Loader workers run OpenCV single-threaded: the workers are the parallelism (as torch does)."""
    cv2.setNumThreads(1)


def _as_made(batch: dict) -> dict:
    """The DataLoader's collate_fn: batches are made by the stream (no conversion of numpy arrays
    into tensors in the worker, which would cost a shared-memory segment each)."""
    return batch


class Loader:
    """Iterates a DataLoader over a :class:`ShardStream` (the training and evaluation loader).

    Batches made by workers in shared-memory slots (:meth:`ShardStream.attach_ring`) are copied
    out here, so that every batch the caller gets owns its memory and may be kept. With
    ``borrow``, a batch's images are instead a view of the worker's slot, valid until the caller
    asks for the next batch (the slot is then given back to its worker): no copy of every image
    in the main process, for a caller that is done with a batch before it asks for the next (the
    training step, inference). On CUDA (``pin_memory``) images are always copied, into pinned
    memory.
    """

    def __init__(self, dataloader: DataLoader, stream: "ShardStream", pin_memory: bool = False,
                 borrow: bool = False):
        self.dataloader = dataloader
        self.stream = stream
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.borrow = borrow

    def __iter__(self) -> Iterator[dict]:
        lent = None
        # OpenCV's thread pool does not survive fork(): a worker forked while one of this process's
        # pool threads holds the pool's lock hangs in its first OpenCV call (_one_thread). It was
        # seen in the test suite, where OpenCV ran multi-threaded in the same process before a
        # loader was made. So the pool is stopped (one thread) while the workers are forked, and
        # restored once they are started.
        threads = cv2.getNumThreads() if self.dataloader.num_workers > 0 else None
        if threads is not None:
            cv2.setNumThreads(1)
        try:
            try:
                batches = iter(self.dataloader)  # forks the workers
            finally:
                if threads is not None:
                    cv2.setNumThreads(threads)
            for batch in batches:
                if lent is not None:  # the caller asked for this batch: it is done with the last
                    self.stream.release(lent)
                batch, lent = self.stream.take(batch, self.pin_memory, self.borrow)
                yield batch
        finally:
            if lent is not None:
                self.stream.release(lent)


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
    class_balance: bool = False,
    borrow: bool = False,
    rank: int = 0,
    world: int = 1,
) -> tuple[Loader, ShardStream]:
    """A DataLoader over ``split`` and the ShardStream behind it (for sizes and positions).

    ``train=False`` reads every sample once, in shard order, without augmentation, bootstrap or
    frame subsampling (validation, prediction). ``class_balance``: batches' ``weight`` are inverse
    class frequencies (over the samples the stream keeps), for the loss's ``sample_weight``.
    ``borrow``: each batch's images are valid only until the next batch is asked for (see
    :class:`Loader`); for a loop that is done with a batch before it asks for the next.
    ``rank``/``world``: every rank reads the same global batches (same order, same draws) and
    decodes only its part (:func:`rank_slice`): ``image`` holds that part, ``part`` its bounds,
    and ``expr``/``va``/``weight``/``key`` stay the whole batch's (the loss's denominators).
    With workers, each keeps a few batch slots in shared memory (:func:`ring_slots`, sized from
    the batch, the workers and the free space of /dev/shm; an error at once when too small).
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
        class_balance=class_balance,
        rank=rank,
        world=world,
    )
    kwargs: dict[str, Any] = {}
    if workers > 0:
        slots = ring_slots(workers, stream.slot_bytes(), shm_free_bytes())
        # each worker has at most slots - 2 batches in flight, one being written, and the main
        # process holds one
        kwargs.update(prefetch_factor=slots - 2, persistent_workers=False)
        stream.attach_ring(slots)
    if position is not None:  # the stream reads it; the caller's copy advances independently
        stream.position = DataPosition.from_state(position.state_dict())
    # pinning happens when the images are copied out of their slot (workers) or below (no workers)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory and workers == 0,
                        collate_fn=_as_made, worker_init_fn=_one_thread if workers else None, **kwargs)
    return Loader(loader, stream, pin_memory and workers > 0, borrow), stream
