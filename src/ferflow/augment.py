"""Decoding and augmentation of face crops: JPEG bytes -> RGB uint8 HWC, with OpenCV.

The image work is a few OpenCV calls per sample on HWC uint8 (:class:`Augment`): JPEGs much
larger than the input are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, cheaper than a
full decode); crop and flip are a border copy and a flip (DAN's affine: one ``warpAffine`` for
all three); colour jitter is one 3x4 colour matrix (:func:`colour_matrix`) applied by one
``cv2.transform``, which also turns OpenCV's BGR into RGB. A sample's random draws come from
:class:`HashDraws`, a hash of (seed, epoch, key, repeat), so the same sample gets the same
augmentation in every run and on every worker count.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch


AUGMENTATIONS = ("flip", "crop", "color", "affine", "erase")


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
