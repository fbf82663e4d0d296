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

Speed. The image work is a few OpenCV calls per sample on HWC uint8 (:class:`Augment`): JPEGs much
larger than the input are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, cheaper than a
full decode); crop and flip are a border copy and a flip (DAN's affine: one ``warpAffine`` for
all three); colour jitter is one 3x4 colour matrix (:func:`colour_matrix`) applied by one
``cv2.transform``, which also turns OpenCV's BGR into RGB. Shards are read by a small tar reader
(:func:`read_tar`). ``bench/loader.py`` compares this with a torchvision folder loader and with
plain JPEG decoding.

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
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Sequence

import cv2
import numpy as np
import polars as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import schemas
from .labels import EXPR_UNANNOTATED, NUM_EXPRESSIONS

AUGMENTATIONS = ("flip", "crop", "color", "affine", "erase")
SHUFFLE_BUFFER = 2000
PREFETCH = 4  # batches in flight per loader worker


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


_INV_2_53 = 1.0 / (1 << 53)
_WORDS = struct.Struct("<8Q")  # a 64-byte digest as 8 words


class HashDraws:
    """A sample's random draws, from a hash of ``parts``: the ``random.Random`` methods that
    :class:`Augment` uses (``random``, ``uniform``, ``randint``), at a fraction of the cost of
    seeding a Mersenne Twister for every sample (its 2.5 kB state is rebuilt at each seeding).

    The draws are the 64-bit words of a chain of BLAKE2b digests (last word first): the first
    digest is that of ``parts``, each next one the digest of the one before. ``random()`` is a
    word's top 53 bits over 2**53, as ``random.Random`` makes its floats; ``randint(a, b)`` is
    ``a + floor(random() * (b - a + 1))``, off uniform by at most 2**-53 per value.
    """

    __slots__ = ("_digest", "_words")

    def __init__(self, *parts: object):
        self._digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode()).digest()
        self._words = list(_WORDS.unpack(self._digest))

    def random(self) -> float:
        if not self._words:  # the next 8 words
            self._digest = hashlib.blake2b(self._digest).digest()
            self._words = list(_WORDS.unpack(self._digest))
        return (self._words.pop() >> 11) * _INV_2_53

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()

    def randint(self, a: int, b: int) -> int:
        return a + int(self.random() * (b - a + 1))


# --------------------------------------------------------------------------------------------
# shards and labels


def list_shards(shard_dir: str | Path, split: str) -> list[Path]:
    """The shard tars of ``split``, sorted by name; empty when the split has none."""
    folder = Path(shard_dir) / split
    return sorted(folder.glob("shard-*.tar")) if folder.is_dir() else []


def check_member_name(name: str, shard: str | Path) -> None:
    """Raise :class:`UnsafeMemberError` naming ``shard`` for an absolute or ``..`` member name."""
    if ".." not in name and not name.startswith(("/", "\\")) and "\\" not in name:
        return  # the common case, without building a path
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
# decoding and augmentation (OpenCV, HWC uint8)

#: Colour jitter (the paper's): torchvision ColorJitter(0.3, 0.3, 0.3, 0.05), with probability 0.8.
COLOR_JITTER = {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.05, "p": 0.8}
#: Random crop (the paper's, as DAN's RandomCrop(224, padding=32)): a shift of up to 1/7 of the side
#: in x and y, the uncovered border black.
CROP_PADDING = 1 / 7
#: DAN's RandomApply([RandomAffine(20, translate=(0.2, 0.2), scale=(0.8, 1))], p=0.7).
AFFINE = {"degrees": 20.0, "translate": 0.2, "scale": (0.8, 1.0), "p": 0.7}
#: DAN's RandomErasing(p=0.5, scale=(0.02, 0.25)), ratio (0.3, 3.3), on the uint8 image with 0.
ERASE = {"p": 0.5, "scale": (0.02, 0.25), "ratio": (0.3, 3.3)}

_GREY = np.array([0.299, 0.587, 0.114])  # RGB -> grey, as torchvision (= YIQ's Y)
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)
# In YIQ, ColorJitter's steps act on Y and on the chroma plane (I, Q) separately; as RGB matrices:
# the grey projector (Y), the chroma projector (I, Q) and the chroma rotation by 90 degrees.
_Y_PART, _IQ_PART, _IQ_ROT = (_YIQ2RGB @ m @ _RGB2YIQ for m in (
    np.diag([1.0, 0, 0]), np.diag([0, 1.0, 1.0]), np.array([[0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])))
_Y_ROWS, _IQ_ROWS, _ROT_ROWS = (m.tolist() for m in (_Y_PART, _IQ_PART, _IQ_ROT))
_GREY_RGB = _GREY.tolist()
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, without decoding; None if not found."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF_MARKERS:
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def decode_bgr(data: bytes, at_least: int = 0) -> np.ndarray:
    """JPEG (or any image OpenCV reads) -> BGR uint8 HWC. With ``at_least``, a JPEG whose shorter
    side is at least 2, 4 or 8 times that is decoded at that fraction of its size (DCT scaling)."""
    factor = 1
    if at_least:
        size = jpeg_size(data)
        if size:
            while factor < 8 and min(size) // (factor * 2) >= at_least:
                factor *= 2
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[factor])
    if img is None:
        raise ValueError("not a decodable image")
    return img


def decode_image(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 RGB (3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(decode_bgr(data)[:, :, ::-1].transpose(2, 0, 1)))


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    ih, iw = img.shape[:2]
    if (iw, ih) == (size, size):
        return img
    shrink = min(iw, ih) / size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink > 1.25 else cv2.INTER_LINEAR)


def colour_matrix(rng: random.Random, mean_grey: float) -> np.ndarray:
    """ColorJitter as one 3x4 matrix ``[A | b]`` (RGB in, RGB out): ``A x + b``.

    Factors as torchvision draws them: brightness ``f_b``, contrast ``f_c``, saturation ``f_s`` in
    [0.7, 1.3], hue ``h`` in [-0.05, 0.05]. In YIQ space brightness scales everything, contrast
    scales everything and moves grey towards the image's mean grey, saturation scales the chroma
    plane (I, Q) and hue rotates it by ``2 pi h``. Without clipping between the steps, these commute
    (brightness scales the mean grey that contrast uses too), so torchvision's random order does not
    matter: grey ``Y -> f_b (f_c Y + (1 - f_c) mean)``, chroma ``-> f_b f_c f_s R(2 pi h) chroma``.
    Values are clipped once, when the matrix is applied. Hue is YIQ's rotation, not HSV's.
    """
    return np.array(_colour_rows(rng, mean_grey, (0, 1, 2)))


def _colour_rows(rng, mean_grey: float, columns: tuple[int, int, int]) -> list[list[float]]:
    """:func:`colour_matrix` as rows of Python floats, its input columns in the order ``columns``
    (``(2, 1, 0)``: takes BGR in, gives RGB out). Plain floats: numpy's 3x3 arithmetic costs more
    than the colour transform of a 112 px image."""
    cj = COLOR_JITTER
    fb = rng.uniform(1 - cj["brightness"], 1 + cj["brightness"])
    fc = rng.uniform(1 - cj["contrast"], 1 + cj["contrast"])
    fs = rng.uniform(1 - cj["saturation"], 1 + cj["saturation"])
    h = rng.uniform(-cj["hue"], cj["hue"]) * 2 * math.pi
    grey, chroma = fb * fc, fb * fc * fs
    cos, sin, offset = chroma * math.cos(h), chroma * math.sin(h), fb * (1 - fc) * mean_grey
    return [[grey * y[k] + cos * iq[k] + sin * rot[k] for k in columns] + [offset]
            for y, iq, rot in zip(_Y_ROWS, _IQ_ROWS, _ROT_ROWS)]


@dataclass(frozen=True)
class Augment:
    """JPEG bytes -> RGB uint8 ``(size, size, 3)``: resized, and augmented when given a generator.

    ``augment`` lists what :data:`AUGMENTATIONS` names: ``crop`` a random crop (a shift of up to
    1/7 of the side, as DAN's RandomCrop(224, padding=32)), ``flip`` a horizontal flip (p 0.5),
    ``color`` colour jitter (p 0.8, :func:`colour_matrix`), DAN's ``affine`` (rotation 20 degrees,
    translation 0.2, scale 0.8-1; p 0.7) and ``erase`` (p 0.5; 2-25% of the image set to 0), in
    that order, as torchvision would apply them. Without a generator (evaluation) the image is only
    resized. ``out``: an array to write the result into (e.g. a slot of the batch).
    """

    size: int
    augment: tuple[str, ...] = ()

    def __call__(self, data: bytes, rng: random.Random | None = None, out: np.ndarray | None = None) -> np.ndarray:
        s = self.size
        aug = self.augment if rng is not None else ()
        img = _resize(decode_bgr(data, at_least=s), s)
        if out is None:
            out = np.empty((s, s, 3), np.uint8)
        # the draws, always in this order (a sample's augmentation depends on its generator only)
        shift = self._shift(rng) if "crop" in aug else (0, 0)
        flip = "flip" in aug and rng.random() < 0.5
        colour = "color" in aug and rng.random() < COLOR_JITTER["p"]
        affine = self._affine(rng) if "affine" in aug and rng.random() < AFFINE["p"] else None
        if affine is not None:
            # crop, flip and the affine as one warp; colour first, so that the border stays black
            img = self._colour(img, rng) if colour else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            m = affine @ self._shift_flip_matrix(shift, flip)
            cv2.warpAffine(img, m[:2], (s, s), dst=out, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        else:
            if flip:
                img = cv2.flip(img, 1)
            if shift != (0, 0):
                img = self._translate(img, *shift)
            if colour:
                self._colour(img, rng, out)
            else:
                cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=out)
        if "erase" in aug and rng.random() < ERASE["p"]:
            self._erase(out, rng)
        return out

    def _shift(self, rng: random.Random) -> tuple[int, int]:
        p = round(self.size * CROP_PADDING)
        return rng.randint(-p, p), rng.randint(-p, p)

    @staticmethod
    def _translate(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
        h, w = img.shape[:2]
        window = img[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        return cv2.copyMakeBorder(window, max(0, dy), max(0, -dy), max(0, dx), max(0, -dx),
                                  cv2.BORDER_CONSTANT, value=0)

    def _shift_flip_matrix(self, shift: tuple[int, int], flip: bool) -> np.ndarray:
        m = np.array([[1.0, 0, shift[0]], [0, 1.0, shift[1]], [0, 0, 1]])
        if flip:
            m = m @ np.array([[-1.0, 0, self.size - 1], [0, 1, 0], [0, 0, 1]])
        return m

    def _affine(self, rng: random.Random) -> np.ndarray:
        s = self.size
        angle = rng.uniform(-AFFINE["degrees"], AFFINE["degrees"])
        scale = rng.uniform(*AFFINE["scale"])
        t = AFFINE["translate"] * s
        tx, ty = round(rng.uniform(-t, t)), round(rng.uniform(-t, t))
        m = np.vstack([cv2.getRotationMatrix2D(((s - 1) / 2, (s - 1) / 2), angle, scale), [0, 0, 1]])
        m[:2, 2] += (tx, ty)
        return m

    @staticmethod
    def _colour(bgr: np.ndarray, rng, out: np.ndarray | None = None) -> np.ndarray:
        """Colour jitter of a BGR image, RGB out: one ``cv2.transform`` with the 3x4 matrix of
        :func:`colour_matrix` (its columns reordered to take BGR)."""
        small = cv2.resize(bgr, (16, 16), interpolation=cv2.INTER_NEAREST)  # 256 pixels are plenty
        b, g, r = cv2.mean(small)[:3]
        grey = _GREY_RGB[0] * r + _GREY_RGB[1] * g + _GREY_RGB[2] * b
        return cv2.transform(bgr, np.array(_colour_rows(rng, grey, (2, 1, 0)), np.float32), dst=out)

    @staticmethod
    def _erase(img: np.ndarray, rng: random.Random) -> None:
        h, w = img.shape[:2]
        lo, hi = math.log(ERASE["ratio"][0]), math.log(ERASE["ratio"][1])
        for _ in range(10):
            target = h * w * rng.uniform(*ERASE["scale"])
            ratio = math.exp(rng.uniform(lo, hi))
            eh, ew = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < eh < h and 0 < ew < w:
                i, j = rng.randint(0, h - eh), rng.randint(0, w - ew)
                img[i:i + eh, j:j + ew] = 0
                return


def build_transform(input_size: int, augment: Sequence[str] = ()) -> Augment:
    """The per-sample image function: JPEG bytes (+ a generator when augmenting) -> RGB HWC uint8."""
    unknown = [a for a in augment if a not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentations {unknown}; valid: {', '.join(AUGMENTATIONS)}")
    return Augment(int(input_size), tuple(augment))


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


class ShardError(ValueError):
    """A shard that is not a readable tar file (truncated, corrupt header)."""


def _octal(field: bytes, url, offset: int) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardError(f"{url}: corrupt tar header at byte {offset}") from None


def _pax_path(records: bytes, url, offset: int) -> str | None:
    """The ``path`` of a PAX extended header (records ``<length> <key>=<value>`` and a newline)."""
    path, i = None, 0
    try:
        while i < len(records):
            space = records.find(b" ", i)
            if space < 0:
                break
            length = int(records[i:space])
            if length <= 0:
                raise ValueError("bad record length")
            key, _, value = records[space + 1:i + length - 1].partition(b"=")
            if key == b"path":
                path = value.decode("utf-8")
            i += length
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardError(f"{url}: corrupt PAX header at byte {offset} ({exc})") from None
    return path


def read_tar(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar, in order; names checked with
    :func:`check_member_name`. A small reader of ustar/GNU/PAX headers (long names from PAX
    ``path`` or GNU ``L`` records): several times faster than ``tarfile`` per member, which
    matters for shards of small JPEGs. Corrupt headers (bad checksum) raise :class:`ShardError`."""
    with open(url, "rb", buffering=1 << 20) as fh:
        offset = 0
        long_name: str | None = None
        while True:
            header = fh.read(512)
            if len(header) < 512 or header == bytes(512):
                if 0 < len(header) < 512:
                    raise ShardError(f"{url}: truncated tar header at byte {offset}")
                return
            stored = _octal(header[148:156], url, offset)
            if stored != sum(header) - sum(header[148:156]) + 256:  # the checksum field counts as spaces
                raise ShardError(f"{url}: corrupt tar header at byte {offset} (checksum)")
            size = _octal(header[124:136], url, offset)
            kind = header[156:157]
            padded = size + (-size) % 512
            payload = fh.read(padded)  # the data and the padding to the next header, in one read
            if len(payload) < padded:
                raise ShardError(f"{url}: truncated member at byte {offset}")
            if padded != size:
                payload = payload[:size]
            at, offset = offset, offset + 512 + padded
            try:
                if kind == b"x":
                    long_name = _pax_path(payload, url, at) or long_name
                    continue
                if kind == b"L":
                    long_name = payload.rstrip(b"\0").decode("utf-8")
                    continue
                if kind in (b"g", b"K"):
                    continue
                name = long_name
                long_name = None
                if name is None:
                    name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                    prefix = header[345:500].split(b"\0", 1)[0]
                    if header[257:262] == b"ustar" and prefix:
                        name = prefix.decode("utf-8") + "/" + name
            except UnicodeDecodeError:
                raise ShardError(f"{url}: member name at byte {at} is not UTF-8") from None
            check_member_name(name, url)
            if kind in (b"0", b"\0", b"7"):
                yield name, payload


def shard_samples(url: str) -> Iterator[dict]:
    """The samples of one shard, as WebDataset groups them: consecutive members sharing a key
    (the name up to the first dot of its base name) form ``{"__key__", "__url__", ext: bytes}``,
    extensions lower-cased; members without an extension are skipped, a repeated one is an error."""
    sample: dict | None = None
    for name, payload in read_tar(url):
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        if dot <= slash:
            continue
        key, ext = name[:dot], name[dot + 1:].lower()
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        elif ext in sample:
            raise ValueError(f"{url}: duplicate member {name!r}")
        sample[ext] = payload
    if sample is not None:
        yield sample


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
        images, slot = self._images(n)
        buf = images.numpy()
        for i, s in enumerate(samples):
            rng = None
            if self.train and self.augment:
                rng = HashDraws("aug", self.seed, self.epoch, s["key"], s["rep"])
            try:
                self._transform(s["jpg"], rng, buf[i])
            except ValueError as exc:
                raise ValueError(f"{self.index.shard[s['row']]}: sample {s['key']!r}: {exc}") from None
        rows = np.array([s["row"] for s in samples], dtype=np.int64)
        if slot is not None:  # numpy, not tensors: a tensor sent by a worker costs a shared-memory segment
            return {"expr": self.index.expr[rows], "va": self.index.va[rows], "weight": self._weight[rows],
                    "key": [s["key"] for s in samples], "_slot": slot}
        return {
            "image": images.permute(0, 3, 1, 2),
            "expr": torch.from_numpy(self.index.expr[rows]),
            "va": torch.from_numpy(self.index.va[rows]),
            "weight": torch.from_numpy(self._weight[rows]),
            "key": [s["key"] for s in samples],
        }

    # --- the batch images' memory

    def attach_ring(self, slots: int) -> None:
        """Give each worker ``slots`` reusable batch buffers in shared memory (made here, before
        the workers start). A worker writes a batch into its next free slot and sends only the
        slot's number; :class:`Loader` copies the images out in the main process and frees the
        slot. This replaces a fresh shared-memory tensor per batch (new pages, mapped and zeroed
        for every batch: as costly as decoding the images, see ``bench/loader.py``)."""
        s, b = self.input_size, self.batch_size
        ctx = torch.multiprocessing.get_context()
        self._ring = [torch.empty((slots, b, s, s, 3), dtype=torch.uint8).share_memory_() for _ in range(self.workers)]
        self._free = [ctx.BoundedSemaphore(slots) for _ in range(self.workers)]

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
        try:
            for batch in self.dataloader:
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
) -> tuple[Loader, ShardStream]:
    """A DataLoader over ``split`` and the ShardStream behind it (for sizes and positions).

    ``train=False`` reads every sample once, in shard order, without augmentation, bootstrap or
    frame subsampling (validation, prediction). ``class_balance``: batches' ``weight`` are inverse
    class frequencies (over the samples the stream keeps), for the loss's ``sample_weight``.
    ``borrow``: each batch's images are valid only until the next batch is asked for (see
    :class:`Loader`); for a loop that is done with a batch before it asks for the next.
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
    )
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=PREFETCH, persistent_workers=False)
        # each worker has at most PREFETCH batches in flight, and the main process copies one
        stream.attach_ring(PREFETCH + 2)
    if position is not None:  # the stream reads it; the caller's copy advances independently
        stream.position = DataPosition.from_state(position.state_dict())
    # pinning happens when the images are copied out of their slot (workers) or below (no workers)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory and workers == 0,
                        collate_fn=_as_made, worker_init_fn=_one_thread if workers else None, **kwargs)
    return Loader(loader, stream, pin_memory and workers > 0, borrow), stream
