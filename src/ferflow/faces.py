"""Face geometry shared by extraction stages: tracks and the person's choice, interpolation, crops.

Detections are rows ``x0, y0, x1, y1, score`` + five landmarks ``(x, y)`` (see :mod:`ferflow.detect`).

Person choice (:func:`choose_track`) works offline on the detections of a whole video:

1. :func:`link_tracks` links the detections of successive detected frames into tracks (greedy, by
   IoU >= ``min_iou`` with the track's last box, across gaps of up to ``max_gap`` frames);
2. among the tracks at least ``min_frames`` frames long (first to last detection), the person's
   are the set of tracks that do not overlap in time with the largest total weight, a track's
   weight being its duration times its median box side (:func:`schedule_tracks`): the largest
   face, kept continuous. A chosen track is followed over its whole life; a frame in its life where
   it has no detection (the face was missed or hidden) gets no box rather than another face, so a
   background face never steals the track, not even for one frame; a track that overlaps a chosen
   one is never used at all, and one-off false detections never are. Where the chosen track ends
   (the person left, or turned away for longer than ``max_gap``), the next chosen track may be
   another face (a cut, or the person coming back elsewhere), but only one that does not overlap
   the chosen ones.

A track's length is only known to the frame once the frames next to its ends have been looked at:
with detection on every k-th frame, a face on screen for 6 frames may be detected on one or two of
them. :func:`unsettled_frames` gives the frames to detect next to every track shorter than
``min_frames``; once they are detected, a face detected every time it was looked for is as long as
it was on screen, and kept when that is at least ``min_frames``, while a one-off false detection
stays one frame long and is left out.

``left``/``right`` people only see the detections whose centre lies in their half of the frame.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import cv2
import numpy as np

#: ArcFace's 5-point template (left eye, right eye, nose, left and right mouth corner, in image
#: order) in its 112x112 crop (insightface ``arcface_dst``).
ARCFACE_112 = np.array([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041],
], np.float64)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between boxes ``a`` (N, 4+) and one box ``b`` (4+,), as (N,)."""
    a = np.atleast_2d(a)
    x0 = np.maximum(a[:, 0], b[0])
    y0 = np.maximum(a[:, 1], b[1])
    x1 = np.minimum(a[:, 2], b[2])
    y1 = np.minimum(a[:, 3], b[3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


def on_side(dets: np.ndarray, person: str, frame_width: int) -> np.ndarray:
    """The detections a person may take: ``left``/``right`` by box centre, else all."""
    if person not in ("left", "right") or len(dets) == 0:
        return dets
    cx = (dets[:, 0] + dets[:, 2]) / 2
    return dets[cx < frame_width / 2] if person == "left" else dets[cx >= frame_width / 2]


@dataclass
class Track:
    frames: list[int] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)

    @property
    def first(self) -> int:
        return self.frames[0]

    @property
    def last(self) -> int:
        return self.frames[-1]

    def size(self) -> float:
        """Median box area: robust to a few odd boxes."""
        r = np.asarray(self.rows)
        return float(np.median((r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])))


def link_tracks(dets: dict[int, np.ndarray], max_gap: int, min_iou: float = 0.3) -> list[Track]:
    """Link the detections of the detected frames (keys of ``dets``) into tracks, in time order.

    Each detection continues the track whose last box (at most ``max_gap`` frames earlier) it
    overlaps most, with IoU >= ``min_iou``, each track taking at most one detection per frame
    (greedy, best IoU first); the rest start new tracks.
    """
    tracks: list[Track] = []
    active: list[int] = []
    for f in sorted(dets):
        d = dets[f]
        active = [t for t in active if f - tracks[t].last <= max_gap]
        pairs = []
        for t in active:
            if len(d):
                overlaps = iou(d, tracks[t].rows[-1])
                pairs += [(float(v), t, j) for j, v in enumerate(overlaps) if v >= min_iou]
        pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
        used_t: set[int] = set()
        used_d: set[int] = set()
        for _, t, j in pairs:
            if t in used_t or j in used_d:
                continue
            tracks[t].frames.append(f)
            tracks[t].rows.append(d[j])
            used_t.add(t)
            used_d.add(j)
        for j in range(len(d)):
            if j not in used_d:
                tracks.append(Track([f], [d[j]]))
                active.append(len(tracks) - 1)
    return tracks


def person_tracks(dets: dict[int, np.ndarray], person: str, frame_width: int, max_gap: int,
                  min_iou: float = 0.3) -> list[Track]:
    """The tracks of the detections a person may take (:func:`on_side`, :func:`link_tracks`)."""
    side = {f: on_side(d, person, frame_width) for f, d in dets.items()}
    return link_tracks(side, max_gap, min_iou)


def choose_track(dets: dict[int, np.ndarray], person: str, frame_width: int, max_gap: int,
                 min_iou: float = 0.3, min_frames: int = 3, n_frames: int | None = None
                 ) -> dict[int, tuple[np.ndarray, int]]:
    """The person's box on each detected frame where it has one: ``{frame: (row, track id)}``.

    See the module docstring. A track is eligible when it spans at least ``min_frames`` frames
    (first to last detection); ``min_frames`` is lowered to ``n_frames`` (the video's frame count,
    default: up to the last detected frame) for very short videos.
    """
    tracks = person_tracks(dets, person, frame_width, max_gap, min_iou)
    if n_frames is None:
        n_frames = max(dets) + 1 if dets else 0
    need = max(1, min(min_frames, n_frames))
    chosen: dict[int, tuple[np.ndarray, int]] = {}
    for i in schedule_tracks([t if t.last - t.first + 1 >= need else None for t in tracks]):
        for f, row in zip(tracks[i].frames, tracks[i].rows):
            chosen[f] = (row, i)
    return dict(sorted(chosen.items()))


def unsettled_frames(dets: dict[int, np.ndarray], person: str, frame_width: int, max_gap: int,
                     min_frames: int, min_iou: float = 0.3) -> set[int]:
    """Frames not yet detected between each of the person's tracks shorter than ``min_frames``
    and the detected frames before and after it: once they are detected, the track's length is
    known to the frame (a face may have been on screen longer than the keyframes saw). Empty when
    every short track's neighbouring frames have been detected. At most ``2 (k - 1)`` frames per
    short track with detection on every k-th frame."""
    detected = sorted(dets)
    need: set[int] = set()
    for t in person_tracks(dets, person, frame_width, max_gap, min_iou):
        if t.last - t.first + 1 >= min_frames:
            continue
        j = bisect.bisect_left(detected, t.first)
        need.update(range(detected[j - 1] + 1 if j > 0 else t.first, t.first))
        j = bisect.bisect_right(detected, t.last)
        need.update(range(t.last + 1, detected[j] if j < len(detected) else t.last + 1))
    return need


def schedule_tracks(tracks: list[Track | None]) -> list[int]:
    """Indices of the tracks (None: not eligible) that do not overlap in time and together have the
    largest weight, a track's weight being its duration in frames times its median box side
    (weighted interval scheduling, exact, O(T log T)). Ties go to the earlier-listed tracks."""
    items = sorted((t.last, t.first, i) for i, t in enumerate(tracks) if t is not None)
    if not items:
        return []
    ends = [last for last, _, _ in items]
    best = [0.0] * (len(items) + 1)  # best[j]: best total weight using the first j items
    take = [False] * len(items)
    prev = [0] * len(items)
    for j, (last, first, i) in enumerate(items):
        t = tracks[i]
        weight = (last - first + 1) * np.sqrt(max(t.size(), 0.0))
        prev[j] = int(np.searchsorted(ends, first, side="left"))  # items ending before `first`
        with_j = weight + best[prev[j]]
        take[j] = with_j > best[j]
        best[j + 1] = with_j if take[j] else best[j]
    picked = []
    j = len(items)
    while j > 0:
        if take[j - 1]:
            picked.append(items[j - 1][2])
            j = prev[j - 1]
        else:
            j -= 1
    return sorted(picked)


def interpolate_boxes(frame_a: int, box_a: np.ndarray, frame_b: int, box_b: np.ndarray, frame: int) -> np.ndarray:
    """Linear interpolation of a detection row (box, score, landmarks) between two frames."""
    t = (frame - frame_a) / (frame_b - frame_a)
    return (1 - t) * box_a + t * box_b


# ---- crops --------------------------------------------------------------------------------------
def square_box(box: np.ndarray, margin: float) -> tuple[float, float, float]:
    """Centre x, centre y and side of the square crop around ``box`` with ``margin``."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    side = max(x1 - x0, y1 - y0) * (1.0 + margin)
    return (x0 + x1) / 2, (y0 + y1) / 2, side


def _warp(image: np.ndarray, m: np.ndarray, scale: float, size: int) -> np.ndarray:
    """warpAffine of ``image`` by ``m`` (uniform ``scale``) into a ``size`` square; black outside.

    warpAffine has no area filter: when shrinking by more than 2 the image is first shrunk with
    INTER_AREA so that the crop does not alias (the translation is unchanged: it is in output pixels).
    """
    m = np.asarray(m, np.float64).copy()
    if scale < 0.5:
        f = scale * 2
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        m[:, :2] /= f
    return cv2.warpAffine(image, m.astype(np.float32), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT)


def crop_face(image: np.ndarray, box: np.ndarray, margin: float, size: int) -> np.ndarray:
    """Square crop around ``box`` with ``margin``, resized to ``size``; outside pixels are black."""
    cx, cy, side = square_box(box, margin)
    scale = size / max(side, 1e-6)
    m = np.array([[scale, 0, size / 2 - cx * scale], [0, scale, size / 2 - cy * scale]])
    return _warp(image, m, scale, size)


def alignment_template(size: int, margin: float) -> np.ndarray:
    """The 5 points faces are aligned to in a ``size`` crop: ArcFace's 112 template at margin 0,
    shrunk about the crop's centre by ``1 + margin`` (margin 0.25: 25% more context around it)."""
    return ((ARCFACE_112 - 56.0) / (1.0 + margin) + 56.0) * (size / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) taking the
    points ``src`` (N, 2) to ``dst`` (Umeyama 1991); (2x3 matrix, scale), or None if degenerate."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or not np.isfinite(src).all():
        return None
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0 ** 2).sum() / len(src)
    if var_s < 1e-6:
        return None
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1
    rot = u @ np.diag(d) @ vt
    scale = float((sig * d).sum() / var_s)
    if not np.isfinite(scale) or scale <= 0:
        return None
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]]), scale


def align_face(image: np.ndarray, landmarks: np.ndarray, margin: float, size: int) -> np.ndarray | None:
    """Crop aligned by a similarity transform of the 5 ``landmarks`` (10 values, x y per point) to
    :func:`alignment_template`; None when the landmarks are missing (NaN) or degenerate."""
    points = np.asarray(landmarks, np.float64).reshape(-1)
    if points.size != 10 or not np.isfinite(points).all():
        return None
    fit = similarity_transform(points.reshape(5, 2), alignment_template(size, margin))
    if fit is None:
        return None
    m, scale = fit
    return _warp(image, m, scale, size)


def encode_jpeg(image_bgr: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
