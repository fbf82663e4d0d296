"""Demo data: small Aff-Wild2, AffectNet and ExpW copies in their native layouts, made from a seed.

``python -m ferflow.demo --root demo_data --seed 0 --size small`` writes, in a few seconds:

- ``affwild2/videos/*.mp4|.avi`` (OpenCV ``mp4v`` / ``MJPG``) with
  ``affwild2/{EXPR_Classification_Challenge,VA_Estimation_Challenge}/{Train_Set,Validation_Set}/<name>.txt``;
  one two-person video (``<stem>_left.txt`` / ``<stem>_right.txt``), one annotation with 3 lines
  more than the video has frames and one with 2 lines fewer, ``-1`` and ``-5,-5`` runs;
- ``affectnet/Manually_Annotated_file_lists/{training,validation}.csv`` and
  ``affectnet/Manually_Annotated_Images/<sub>/<sha224>.jpg`` (native codes, incl. 7-10 and -2);
- ``expw/label/label.lst`` and ``expw/image/origin/*.jpg`` (native codes 0-6, some two-face images);
- ``demo.json`` (size, seed, units), written last.

:func:`plan` lists every file and every Aff-Wild2 unit without writing anything (the workflow builds
its DAG from it); :func:`generate` writes exactly those files, each atomically.

The faces are one real photograph (``assets/demo_face.jpg``: Grace Hopper, official U.S. Navy
portrait, a work of the U.S. federal government and so in the public domain; the same picture
matplotlib ships as ``sample_data/grace_hopper.jpg``), shown as different "people" (scale, tint,
brightness, mirror, width) moving slowly over a smooth background. OpenCV's Haar cascade finds
it in practically every frame. The labels are drawn on the lower face, inside the detector's box,
large enough to survive a 112 px crop:

- expression: a mouth glyph with a shape and colour per class (see ``_GLYPHS``);
- valence: the colour of two cheek disks, blue (-1) through purple to red (+1);
- arousal: the radius of the cheek disks and the size of the mouth glyph.

Within each video the class changes every ~10-30 frames and valence/arousal vary continuously,
loosely tied to the class, so a frame/label misalignment shows in the metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from .atomic import write_bytes, write_text
from .inputcheck import prog_of
from .labels import EXPR_HEADER, NUM_EXPRESSIONS, VA_HEADER

SIZES = ("tiny", "small")
SPLIT_DIRS = {"train": "Train_Set", "validation": "Validation_Set"}
EXPR_DIR = "affwild2/EXPR_Classification_Challenge"
VA_DIR = "affwild2/VA_Estimation_Challenge"
VIDEO_DIR = "affwild2/videos"
FPS = 30
FOURCC = {".mp4": "mp4v", ".avi": "MJPG"}

AFFECTNET_HEADER = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
#: AffectNet native code -> ABAW class drawn in the image (8 None and 9 Uncertain: any class; 10 No-Face: none).
AFFECTNET_TO_ABAW = {0: 0, 1: 4, 2: 5, 3: 6, 4: 3, 5: 2, 6: 1, 7: 7}
#: ExpW native code -> ABAW class (ExpW has no "Other").
EXPW_TO_ABAW = {0: 1, 1: 2, 2: 3, 3: 4, 4: 5, 5: 6, 6: 0}
_EXPW_QUERY = ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral")
_EXPW_NOUN = ("actor", "woman", "man", "student", "baby", "teacher", "player")


# ---- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Annotation:
    """One annotated person of a video: an EXPR file and a VA file of ``n_lines`` lines each."""

    name: str  # annotation file stem, e.g. "105-30-480x270_left"
    person: str  # "", "left" or "right"
    split: str  # "train" | "validation"
    n_lines: int  # lines after the header (may differ from the video's n_frames)
    expr_file: str  # relative to the demo root
    va_file: str


@dataclass(frozen=True)
class VideoUnit:
    """One video file (an extraction unit) and the people annotated in it."""

    stem: str  # video file stem = unit name
    file: str  # relative to the demo root, e.g. "affwild2/videos/105-30-480x270.mp4"
    split: str
    n_frames: int  # frames written (and decoded back by OpenCV)
    width: int
    height: int
    fps: int
    annotations: tuple[Annotation, ...]


@dataclass(frozen=True)
class ImageItem:
    """One image of an image source and the faces in it (labels are native codes)."""

    file: str  # relative to the demo root
    split: str  # AffectNet: "training" | "validation"; ExpW: "" (ExpW has no split)
    codes: tuple[int, ...]  # native expression code of each face, in face order


@dataclass(frozen=True)
class DemoPlan:
    size: str
    files: tuple[str, ...]  # every file generate() writes, relative to the root, sorted
    units: tuple[VideoUnit, ...]  # Aff-Wild2 videos, train first
    affectnet: tuple[ImageItem, ...]
    expw: tuple[ImageItem, ...]

    def unit(self, stem: str) -> VideoUnit:
        for u in self.units:
            if u.stem == stem:
                return u
        raise KeyError(f"no demo video {stem!r}; have {[u.stem for u in self.units]}")

    @property
    def annotations(self) -> tuple[Annotation, ...]:
        return tuple(a for u in self.units for a in u.annotations)


@dataclass(frozen=True)
class _VideoSpec:
    stem: str
    ext: str
    split: str
    n_frames: int
    width: int = 320
    height: int = 240
    two_people: bool = False
    line_delta: int = 0  # annotation lines minus video frames


_VIDEOS = {
    "small": (
        _VideoSpec("101-30-320x240", ".mp4", "train", 150),
        _VideoSpec("102-30-320x240", ".avi", "train", 140, line_delta=3),
        _VideoSpec("103-30-320x240", ".mp4", "train", 150),
        _VideoSpec("video104", ".avi", "train", 130),
        _VideoSpec("105-30-480x270", ".mp4", "train", 150, 480, 270, two_people=True),
        _VideoSpec("106-30-320x240", ".mp4", "train", 150, line_delta=-2),
        _VideoSpec("107-30-320x240", ".avi", "train", 120),
        _VideoSpec("201-30-320x240", ".mp4", "validation", 135),
        _VideoSpec("202-30-320x240", ".avi", "validation", 135),
        _VideoSpec("video203", ".mp4", "validation", 135),
    ),
    "tiny": (
        _VideoSpec("t01-30-480x270", ".mp4", "train", 40, 480, 270, two_people=True),
        _VideoSpec("t02-30-320x240", ".avi", "train", 40, line_delta=3),
        _VideoSpec("t03-30-320x240", ".mp4", "validation", 40),
        _VideoSpec("t04-30-320x240", ".avi", "validation", 40, line_delta=-2),
    ),
}
#: (AffectNet training codes, AffectNet validation codes, ExpW faces per image)
_IMAGES = {
    "small": (
        tuple(i % 8 for i in range(36)) + (8, 9, 10, 1),
        tuple(i % 8 for i in range(16)),
        tuple(2 if i % 10 == 3 else 1 for i in range(30)),
    ),
    "tiny": (
        tuple(range(8)) + (8, 9, 10, 4),
        tuple(range(8)),
        (1, 1, 2, 1, 1, 1, 1),
    ),
}


def plan(size: str) -> DemoPlan:
    """Every file :func:`generate` writes and every Aff-Wild2 unit, for ``size``; writes nothing."""
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; valid sizes: {', '.join(SIZES)}")
    units = []
    for spec in _VIDEOS[size]:
        persons = ("left", "right") if spec.two_people else ("",)
        anns = []
        for person in persons:
            name = f"{spec.stem}_{person}" if person else spec.stem
            sub = f"{SPLIT_DIRS[spec.split]}/{name}.txt"
            anns.append(Annotation(name, person, spec.split, spec.n_frames + spec.line_delta,
                                   f"{EXPR_DIR}/{sub}", f"{VA_DIR}/{sub}"))
        units.append(VideoUnit(spec.stem, f"{VIDEO_DIR}/{spec.stem}{spec.ext}", spec.split, spec.n_frames,
                               spec.width, spec.height, FPS, tuple(anns)))
    train_codes, val_codes, expw_faces = _IMAGES[size]
    affectnet = []
    for split, codes in (("training", train_codes), ("validation", val_codes)):
        for i, code in enumerate(codes):
            digest = hashlib.sha224(f"affectnet/{split}/{i}".encode()).hexdigest()
            affectnet.append(ImageItem(f"affectnet/Manually_Annotated_Images/{100 + i % 5}/{digest}.jpg", split, (code,)))
    expw = []
    for i, n_faces in enumerate(expw_faces):
        codes = tuple((i + 3 * j) % 7 for j in range(n_faces))
        name = f"{_EXPW_QUERY[codes[0]]}_{_EXPW_NOUN[i % len(_EXPW_NOUN)]}_{100 + i}.jpg"
        expw.append(ImageItem(f"expw/image/origin/{name}", "", codes))
    files = [u.file for u in units]
    files += [f for u in units for a in u.annotations for f in (a.expr_file, a.va_file)]
    files += ["affectnet/Manually_Annotated_file_lists/training.csv", "affectnet/Manually_Annotated_file_lists/validation.csv"]
    files += [it.file for it in affectnet]
    files += ["expw/label/label.lst"] + [it.file for it in expw]
    files.append("demo.json")
    return DemoPlan(size, tuple(sorted(files)), tuple(units), tuple(affectnet), tuple(expw))


# ---- labels -----------------------------------------------------------------------------------
#: Typical (valence, arousal) of each ABAW class; frames vary around it.
CLASS_VA = np.array([
    (0.0, -0.3),  # Neutral
    (-0.6, 0.6),  # Anger
    (-0.6, 0.0),  # Disgust
    (-0.4, 0.7),  # Fear
    (0.7, 0.35),  # Happiness
    (-0.6, -0.5),  # Sadness
    (0.3, 0.75),  # Surprise
    (0.25, -0.45),  # Other
], np.float32)
_SEGMENT = {"tiny": (7, 10), "small": (12, 30)}  # segment length range, frames


@dataclass
class Track:
    """Per-line truth of one annotation (length max(n_frames, n_lines)) and what the file hides."""

    expression: np.ndarray  # int, the class drawn in the frame
    valence: np.ndarray  # float32
    arousal: np.ndarray
    unannotated: np.ndarray  # bool: EXPR line is -1
    invalid_va: np.ndarray  # bool: VA line is -5,-5


def _rng(seed: int, *key: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed)] + [zlib.crc32(k.encode()) for k in key]))


def _segments(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[int]:
    lengths: list[int] = []
    while sum(lengths) < n:
        lengths.append(int(rng.integers(lo, hi + 1)))
    lengths[-1] -= sum(lengths) - n
    if len(lengths) > 1 and lengths[-1] < lo:
        lengths[-2] += lengths.pop()
    return lengths


def tracks(p: DemoPlan, seed: int) -> dict[str, Track]:
    """The truth of every annotation of ``p``: each split shows all 8 classes, in segments."""
    lo, hi = _SEGMENT[p.size]
    out: dict[str, Track] = {}
    for split in SPLIT_DIRS:
        rng = _rng(seed, "labels", p.size, split)
        anns = [(a, max(u.n_frames, a.n_lines), min(u.n_frames, a.n_lines))
                for u in p.units if u.split == split for a in u.annotations]
        segs = {a.name: _segments(rng, n, lo, hi) for a, n, _ in anns}
        total = sum(len(s) for s in segs.values())
        if total < NUM_EXPRESSIONS:
            raise AssertionError(f"demo {p.size}/{split}: {total} segments cannot show {NUM_EXPRESSIONS} classes")
        # a balanced pool of classes; each segment takes the most plentiful class unlike its predecessor
        remaining = np.full(NUM_EXPRESSIONS, total // NUM_EXPRESSIONS)
        remaining[rng.choice(NUM_EXPRESSIONS, total % NUM_EXPRESSIONS, replace=False)] += 1
        for k, (a, n, n_both) in enumerate(anns):
            cls = np.zeros(n, np.int64)
            start, prev = 0, -1
            for length in segs[a.name]:
                order = rng.permutation(NUM_EXPRESSIONS)
                order = order[np.argsort(-remaining[order], kind="stable")]
                c = next((int(c) for c in order if c != prev and remaining[c] > 0), int(order[0]))
                remaining[c] -= 1
                cls[start:start + length] = prev = c
                start += length
            valence, arousal = _va_curves(rng, cls)
            unannotated = np.zeros(n, bool)
            invalid_va = np.zeros(n, bool)
            # a short gap inside one segment (never a whole one) on a frame that is both in the video
            # and in the file: EXPR -1 on even tracks, VA -5,-5 on odd ones
            bounds = np.cumsum([0] + segs[a.name])
            which = int(rng.integers(0, int(np.sum(bounds[1:] <= n_both))))
            s0, s1 = int(bounds[which]), int(bounds[which + 1])
            gap = max(2, min(6, (s1 - s0) // 3))
            g0 = s0 + 1 + int(rng.integers(0, s1 - s0 - gap - 1)) if s1 - s0 - gap - 1 > 0 else s0
            (unannotated if k % 2 == 0 else invalid_va)[g0:g0 + gap] = True
            out[a.name] = Track(cls, valence, arousal, unannotated, invalid_va)
    return out


def _va_curves(rng: np.random.Generator, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Valence and arousal per frame: the class's typical value, smoothed, plus slow waves."""
    n = len(cls)
    t = np.arange(n, dtype=np.float64)
    out = []
    for dim in range(2):
        base = CLASS_VA[cls, dim].astype(np.float64)
        kernel = np.ones(7) / 7
        base = np.convolve(np.pad(base, 3, mode="edge"), kernel, mode="valid")
        wave = sum(0.2 * np.sin(2 * np.pi * t / rng.uniform(18, 60) + rng.uniform(0, 2 * np.pi)) for _ in range(2))
        out.append(np.clip(base + wave, -0.98, 0.98).round(3).astype(np.float32))
    return out[0], out[1]


def expr_text(track: Track, n_lines: int) -> str:
    lines = [EXPR_HEADER] + ["-1" if track.unannotated[i] else str(int(track.expression[i])) for i in range(n_lines)]
    return "\n".join(lines) + "\n"


def va_text(track: Track, n_lines: int) -> str:
    lines = [VA_HEADER]
    for i in range(n_lines):
        if track.invalid_va[i]:
            lines.append("-5,-5")
        else:
            lines.append(f"{_num(track.valence[i])},{_num(track.arousal[i])}")
    return "\n".join(lines) + "\n"


def _num(x: float, digits: int = 3) -> str:
    text = f"{float(x):.{digits}f}"
    return "0." + "0" * digits if float(text) == 0 else text


# ---- faces ------------------------------------------------------------------------------------
#: Haar box of the asset (x, y, side) in its 144x144 pixels; cues are placed relative to it.
_ASSET_BOX = (21.0, 22.0, 102.0)
#: Glyph colour (BGR) of each ABAW class; shapes are in _draw_glyph.
_GLYPHS = (
    (70, 70, 70),  # Neutral: dark grey flat bar
    (30, 30, 220),  # Anger: red zigzag
    (40, 170, 40),  # Disgust: green slash
    (170, 40, 150),  # Fear: purple square outline
    (0, 215, 255),  # Happiness: yellow smile
    (200, 90, 20),  # Sadness: blue frown
    (0, 140, 255),  # Surprise: orange filled disk
    (200, 200, 0),  # Other: cyan cross
)
_SHIFT = 4  # cv2 drawing: sub-pixel coordinates in 1/16 px


@lru_cache(maxsize=1)
def _asset() -> np.ndarray:
    """The face as BGRA float32 (alpha: a feathered ellipse around face and cap)."""
    data = (resources.files("ferflow") / "assets" / "demo_face.jpg").read_bytes()
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise RuntimeError("cannot decode ferflow/assets/demo_face.jpg")
    size = bgr.shape[0]
    alpha = np.zeros((size, size), np.float32)
    cv2.ellipse(alpha, (size // 2, size // 2), (int(size * 0.42), int(size * 0.49)), 0, 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), size * 0.03)
    return np.dstack([bgr.astype(np.float32), alpha])


@dataclass(frozen=True)
class Look:
    """What makes one "person": colour, brightness, mirror and width of the face."""

    tint: tuple[float, float, float]
    brightness: float
    mirror: bool
    stretch: float  # face width / height


def _random_look(rng: np.random.Generator) -> Look:
    return Look(tuple(float(x) for x in rng.uniform(0.85, 1.15, 3)), float(rng.uniform(0.8, 1.15)),
                bool(rng.random() < 0.5), float(rng.uniform(0.92, 1.08)))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth colour field: a gradient plus blurred low-resolution noise (no face-like texture)."""
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    g = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    bg = c0[None, None] * (1 - g[..., None]) + c1[None, None] * g[..., None]
    blobs = cv2.resize(rng.normal(0, 25, (4, 5, 3)).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(bg + blobs, 0, 255).astype(np.float32)


def draw_face(canvas: np.ndarray, look: Look, cx: float, cy: float, side: float) -> tuple[float, float, float, float]:
    """Blend the face into ``canvas`` (float32 BGR) with its detector box centred at (cx, cy).

    ``side`` is the box height; its width is ``side * look.stretch``. Returns the box x0, y0, x1, y1.
    """
    face = _asset_premultiplied(look.mirror)
    size = face.shape[0]
    bx, by, bs = _ASSET_BOX
    sy = side / bs
    sx = sy * look.stretch
    mcx = (size - 1 - (bx + bs / 2)) if look.mirror else (bx + bs / 2)
    tx, ty = cx - mcx * sx, cy - (by + bs / 2) * sy  # where the asset's (0, 0) lands
    h, w = canvas.shape[:2]
    rx0, ry0 = max(0, int(np.floor(tx))), max(0, int(np.floor(ty)))
    rx1, ry1 = min(w, int(np.ceil(tx + size * sx)) + 1), min(h, int(np.ceil(ty + size * sy)) + 1)
    if rx1 > rx0 and ry1 > ry0:  # warp only the face's own rectangle of the canvas
        m = np.array([[sx, 0, tx - rx0], [0, sy, ty - ry0]], np.float32)
        warped = cv2.warpAffine(face, m, (rx1 - rx0, ry1 - ry0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        roi = canvas[ry0:ry1, rx0:rx1]
        roi *= 1 - warped[..., 3:4]
        roi += warped[..., :3] * (np.array(look.tint, np.float32) * np.float32(look.brightness))
    half_w = side * look.stretch / 2
    return cx - half_w, cy - side / 2, cx + half_w, cy + side / 2


@lru_cache(maxsize=2)
def _asset_premultiplied(mirror: bool) -> np.ndarray:
    """The asset with its colour multiplied by alpha (so that interpolation does not bleed)."""
    face = _asset()
    face = np.dstack([face[..., :3] * face[..., 3:4], face[..., 3:4]])
    return np.ascontiguousarray(face[:, ::-1] if mirror else face)


def valence_colour(v: float) -> tuple[float, float, float]:
    """BGR of the cheek disks: blue at -1, purple at 0, red at +1."""
    f = (float(v) + 1) / 2
    return (235 - 205 * f, 70.0, 30 + 205 * f)


def draw_cues(img: np.ndarray, box: tuple[float, float, float, float], cls: int, v: float, a: float) -> None:
    """Draw the expression glyph and the valence/arousal cheek disks on ``img`` (uint8 BGR) in place."""
    x0, y0, x1, y1 = box
    cx, side, width = (x0 + x1) / 2, y1 - y0, x1 - x0
    r = side * (0.06 + 0.05 * (float(a) + 1))
    for u in (-0.36, 0.36):
        _circle(img, (cx + u * width, y0 + 0.85 * side), r, valence_colour(v), -1)
    _draw_glyph(img, cls, cx, y0 + 0.80 * side, side * (0.15 + 0.03 * float(a)))


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x * (1 << _SHIFT))), int(round(y * (1 << _SHIFT)))


def _circle(img, c, r, colour, thickness):
    cv2.circle(img, _pt(*c), int(round(r * (1 << _SHIFT))), colour, thickness, cv2.LINE_AA, _SHIFT)


def _draw_glyph(img: np.ndarray, cls: int, cx: float, cy: float, s: float) -> None:
    """Class ``cls`` as a mouth glyph of half-width ``s`` centred at (cx, cy)."""
    col = _GLYPHS[cls]
    t = max(2, int(round(s * 0.25)))

    def poly(points, closed=False, thick=t):
        pts = np.array([_pt(x, y) for x, y in points], np.int32)
        cv2.polylines(img, [pts], closed, col, thick, cv2.LINE_AA, _SHIFT)

    def arc(y, start, end):
        cv2.ellipse(img, _pt(cx, y), _pt(s, s * 0.6), 0, start, end, col, 2 * t, cv2.LINE_AA, _SHIFT)

    if cls == 0:  # Neutral: flat bar
        cv2.rectangle(img, _pt(cx - s, cy - t / 2), _pt(cx + s, cy + t / 2), col, -1, cv2.LINE_AA, _SHIFT)
    elif cls == 1:  # Anger: zigzag
        poly([(cx - s, cy), (cx - s / 2, cy - s / 2), (cx, cy), (cx + s / 2, cy - s / 2), (cx + s, cy)])
    elif cls == 2:  # Disgust: slash
        poly([(cx - s, cy + s / 3), (cx + s, cy - s / 3)], thick=2 * t)
    elif cls == 3:  # Fear: square outline
        poly([(cx - s / 2, cy - s / 2), (cx + s / 2, cy - s / 2), (cx + s / 2, cy + s / 2), (cx - s / 2, cy + s / 2)], closed=True)
    elif cls == 4:  # Happiness: smile
        arc(cy - s / 3, 0, 180)
    elif cls == 5:  # Sadness: frown
        arc(cy + s / 3, 180, 360)
    elif cls == 6:  # Surprise: open round mouth
        _circle(img, (cx, cy), s * 0.55, col, -1)
    else:  # Other: cross
        poly([(cx - s / 2, cy - s / 2), (cx + s / 2, cy + s / 2)])
        poly([(cx - s / 2, cy + s / 2), (cx + s / 2, cy - s / 2)])


def _finish(img: np.ndarray, rng: np.random.Generator, sigma: float = 3.0) -> np.ndarray:
    """``img`` (uint8) plus Gaussian sensor noise."""
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


class _NoiseBank:
    """Per-frame sensor noise, cheaply: random windows of a few pre-drawn noise fields."""

    def __init__(self, rng: np.random.Generator, height: int, width: int, sigma: float = 3.0, fields: int = 4, pad: int = 16):
        self.rng, self.h, self.w, self.pad = rng, height, width, pad
        self.fields = np.round(rng.standard_normal((fields, height + pad, width + pad, 3)) * sigma).astype(np.int16)

    def apply(self, img: np.ndarray) -> np.ndarray:
        k, dy, dx = (int(x) for x in self.rng.integers(0, [len(self.fields), self.pad, self.pad]))
        out = img.astype(np.int16) + self.fields[k, dy:dy + self.h, dx:dx + self.w]
        return np.clip(out, 0, 255).astype(np.uint8)


# ---- videos -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Motion:
    """A person's slow path: box centre and side oscillate around a resting place."""

    cx: float
    cy: float
    side: float
    ax: float
    ay: float
    ascale: float
    periods: tuple[float, float, float]
    phases: tuple[float, float, float]

    def at(self, t: int, jitter: np.ndarray) -> tuple[float, float, float]:
        w = [np.sin(2 * np.pi * t / p + ph) for p, ph in zip(self.periods, self.phases)]
        return (self.cx + self.ax * w[0] + jitter[0], self.cy + self.ay * w[1] + jitter[1],
                self.side * (1 + self.ascale * w[2]))


def _motions(rng: np.random.Generator, unit: VideoUnit) -> list[_Motion]:
    w, h = unit.width, unit.height
    people = len(unit.annotations)
    out = []
    for k in range(people):
        # Large faces: a face under ~0.45 of the frame height sometimes also gets a false Haar box
        # about twice its size around it (the whole head read as a face).
        side = rng.uniform(0.48, 0.56) * h if people == 1 else rng.uniform(0.42, 0.48) * h
        home = rng.uniform(0.4, 0.6) if people == 1 else (0.26 + 0.48 * k + rng.uniform(-0.02, 0.02))
        out.append(_Motion(
            cx=home * w, cy=rng.uniform(0.48, 0.52) * h, side=side,
            ax=rng.uniform(0.03, 0.05) * w, ay=rng.uniform(0.01, 0.02) * h, ascale=rng.uniform(0.03, 0.05),
            periods=tuple(float(x) for x in rng.uniform(90, 200, 3)),
            phases=tuple(float(x) for x in rng.uniform(0, 2 * np.pi, 3)),
        ))
    return out


def render_video(unit: VideoUnit, truth: dict[str, Track], seed: int) -> Iterator[np.ndarray]:
    """The frames (uint8 BGR) of ``unit``: each person drawn with the truth of their annotation."""
    rng = _rng(seed, "video", unit.stem)
    bg = _background(rng, unit.width, unit.height)
    looks = [_random_look(rng) for _ in unit.annotations]
    motions = _motions(rng, unit)
    noise = _NoiseBank(rng, unit.height, unit.width)
    for t in range(unit.n_frames):
        canvas = bg * np.float32(1 + 0.03 * np.sin(t / 7.0))  # a little flicker
        boxes = []
        for look, motion in zip(looks, motions):
            boxes.append(draw_face(canvas, look, *motion.at(t, rng.normal(0, 0.4, 2))))
        img = np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)
        for ann, box in zip(unit.annotations, boxes):
            tr = truth[ann.name]
            draw_cues(img, box, int(tr.expression[t]), float(tr.valence[t]), float(tr.arousal[t]))
        yield noise.apply(img)


@contextlib.contextmanager
def _atomic_video(target: Path) -> Iterator[Path]:
    """Like :func:`ferflow.atomic.atomic_path`, but the temporary name keeps the video extension
    (cv2.VideoWriter picks the container from it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_video(path: Path, frames: Iterator[np.ndarray], width: int, height: int, fps: int = FPS) -> int:
    """Write ``frames`` atomically to ``path`` (``.mp4``: mp4v, ``.avi``: MJPG); returns the count."""
    n = 0
    with _atomic_video(path) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*FOURCC[path.suffix]), fps, (width, height))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write {path.suffix} video ({FOURCC[path.suffix]}) to {tmp}")
        try:
            if path.suffix == ".avi":
                writer.set(cv2.VIDEOWRITER_PROP_QUALITY, 95)
            for frame in frames:
                writer.write(frame)
                n += 1
        finally:
            writer.release()
    return n


# ---- image sources ----------------------------------------------------------------------------
def _landmarks(box: tuple[float, float, float, float]) -> np.ndarray:
    """68 iBUG-style points (x, y) of a frontal mean face in ``box``; AffectNet ships such points."""
    u, v = [], []
    th = np.linspace(np.pi, 0, 17)  # jaw, left to right
    u += list(0.5 + 0.48 * np.cos(th)); v += list(0.35 + 0.62 * np.sin(th))
    for c in (0.285, 0.715):  # eyebrows
        u += list(np.linspace(c - 0.135, c + 0.135, 5)); v += list(0.28 - 0.04 * np.sin(np.linspace(0, np.pi, 5)))
    u += [0.5] * 4; v += list(np.linspace(0.38, 0.6, 4))  # nose bridge
    u += list(np.linspace(0.4, 0.6, 5)); v += [0.64, 0.655, 0.66, 0.655, 0.64]  # nostrils
    for c in (0.3, 0.7):  # eyes
        a = np.linspace(np.pi, -np.pi, 7)[:-1]
        u += list(c + 0.07 * np.cos(a)); v += list(0.42 - 0.03 * np.sin(a))
    for rx, ry, k in ((0.16, 0.06, 12), (0.1, 0.03, 8)):  # mouth outer, inner
        a = np.linspace(np.pi, -np.pi, k + 1)[:-1]
        u += list(0.5 + rx * np.cos(a)); v += list(0.8 - ry * np.sin(a))
    x0, y0, x1, y1 = box
    return np.stack([x0 + np.array(u) * (x1 - x0), y0 + np.array(v) * (y1 - y0)], 1)


def _image_with_faces(rng: np.random.Generator, width: int, height: int,
                      faces: list[tuple[float, float, float, int | None, float, float]]) -> tuple[bytes, list]:
    """A JPEG with one face per (cx, cy, side, class, v, a); class None draws no face. Returns boxes."""
    canvas = _background(rng, width, height)
    looks = [_random_look(rng) for _ in faces]
    boxes = []
    for look, (cx, cy, side, cls, _, _) in zip(looks, faces):
        boxes.append(draw_face(canvas, Look(look.tint, look.brightness, look.mirror, 1.0), cx, cy, side)
                     if cls is not None else (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    img = np.clip(canvas, 0, 255).astype(np.uint8)
    for box, (_, _, _, cls, v, a) in zip(boxes, faces):
        if cls is not None:
            draw_cues(img, box, cls, v, a)
    ok, data = cv2.imencode(".jpg", _finish(img, rng), [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise RuntimeError("cannot encode a demo JPEG")
    return data.tobytes(), boxes


def _sample_va(rng: np.random.Generator, cls: int) -> tuple[float, float]:
    v, a = CLASS_VA[cls] + rng.uniform(-0.3, 0.3, 2)
    return float(np.clip(v, -0.98, 0.98).round(6)), float(np.clip(a, -0.98, 0.98).round(6))


def _write_affectnet(root: Path, p: DemoPlan, seed: int) -> None:
    rows = {"training": [AFFECTNET_HEADER], "validation": [AFFECTNET_HEADER]}
    last_training = [it for it in p.affectnet if it.split == "training"][-1]
    for item in p.affectnet:
        rng = _rng(seed, item.file)
        code = item.codes[0]
        cls = AFFECTNET_TO_ABAW.get(code, int(rng.integers(0, NUM_EXPRESSIONS)) if code in (8, 9) else None)
        v, a = _sample_va(rng, cls if cls is not None else 0)
        if code == 10 or item is last_training:  # No-Face, and one face whose VA is marked invalid
            v = a = -2.0
        width, height = int(rng.integers(200, 300)), int(rng.integers(200, 300))
        side = round(rng.uniform(0.42, 0.55) * min(width, height))
        x0 = int(rng.integers(int(0.3 * side), width - side - int(0.3 * side)))
        y0 = int(rng.integers(int(0.35 * side), height - side - int(0.25 * side)))
        data, _ = _image_with_faces(rng, width, height, [(x0 + side / 2, y0 + side / 2, side, cls, v, a)])
        write_bytes(root / item.file, data)
        marks = ";".join(f"{z:.2f}" for z in _landmarks((x0, y0, x0 + side, y0 + side)).reshape(-1))
        sub = item.file.split("Manually_Annotated_Images/", 1)[1]
        rows[item.split].append(f"{sub},{x0},{y0},{side},{side},{marks},{code},{_affectnet_num(v)},{_affectnet_num(a)}")
    for split, lines in rows.items():
        write_text(root / f"affectnet/Manually_Annotated_file_lists/{split}.csv", "\n".join(lines) + "\n")


def _affectnet_num(x: float) -> str:
    return "-2" if x == -2.0 else _num(x, 6)


def _write_expw(root: Path, p: DemoPlan, seed: int) -> None:
    lines = []
    for item in p.expw:
        rng = _rng(seed, item.file)
        n = len(item.codes)
        width, height = int(rng.integers(280, 360)), int(rng.integers(220, 280))
        side = rng.uniform(0.36, 0.44) * height if n == 1 else rng.uniform(0.3, 0.34) * height
        faces = []
        for k, code in enumerate(item.codes):
            cx = (rng.uniform(0.4, 0.6) if n == 1 else 0.27 + 0.46 * k) * width
            cls = EXPW_TO_ABAW[code]
            faces.append((cx, rng.uniform(0.45, 0.55) * height, side, cls, *_sample_va(rng, cls)))
        data, boxes = _image_with_faces(rng, width, height, faces)
        write_bytes(root / item.file, data)
        name = item.file.rsplit("/", 1)[1]
        for k, (code, (x0, y0, x1, y1)) in enumerate(zip(item.codes, boxes)):
            conf = rng.uniform(20, 80)
            lines.append(f"{name} {k} {round(y0)} {round(x0)} {round(x1)} {round(y1)} {conf:.4f} {code}")
    write_text(root / "expw/label/label.lst", "\n".join(lines) + "\n")


# ---- generate ---------------------------------------------------------------------------------
def generate(root: str | os.PathLike, seed: int = 0, size: str = "small", log=None) -> DemoPlan:
    """Write the demo data of ``size`` under ``root``: exactly ``plan(size).files``, each atomically."""
    p = plan(size)
    root = Path(root)
    truth = tracks(p, seed)
    t0 = time.perf_counter()
    for unit in p.units:
        n = write_video(root / unit.file, render_video(unit, truth, seed), unit.width, unit.height, unit.fps)
        if n != unit.n_frames:
            raise AssertionError(f"{unit.file}: wrote {n} frames, planned {unit.n_frames}")
        for ann in unit.annotations:
            write_text(root / ann.expr_file, expr_text(truth[ann.name], ann.n_lines))
            write_text(root / ann.va_file, va_text(truth[ann.name], ann.n_lines))
        if log:
            print(f"{unit.file}: {n} frames, {', '.join(f'{a.name} ({a.n_lines} lines)' for a in unit.annotations)}", file=log)
    _write_affectnet(root, p, seed)
    _write_expw(root, p, seed)
    if log:
        print(f"affectnet: {len(p.affectnet)} images; expw: {len(p.expw)} images", file=log)
    summary = {"size": size, "seed": int(seed), "units": [asdict(u) for u in p.units]}
    write_text(root / "demo.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    if log:
        print(f"wrote {len(p.files)} files under {root} in {time.perf_counter() - t0:.1f} s", file=log)
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog_of("demo"), description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="folder to write the demo data into")
    ap.add_argument("--seed", type=int, default=0, help="the same seed gives the same data")
    ap.add_argument("--size", choices=SIZES, default="small", help="tiny: for tests; small: the README demo")
    ap.add_argument("--list", action="store_true", help="print the files that would be written and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(plan(args.size).files))
        return 0
    generate(args.root, args.seed, args.size, log=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
