"""Face geometry shared by extraction stages: box choice along a track, interpolation, crops."""

from __future__ import annotations

import cv2
import numpy as np


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


def choose_face(dets: np.ndarray, person: str, frame_width: int, previous: np.ndarray | None,
                min_iou: float = 0.3) -> np.ndarray | None:
    """Pick the face of one annotated person among detections (N, 15).

    ``person`` "left"/"right" keeps faces whose centre lies in that half of the frame. A face that
    overlaps the person's previous box continues the track (no switching to a background face);
    otherwise the largest face is taken.
    """
    if len(dets) == 0:
        return None
    cx = (dets[:, 0] + dets[:, 2]) / 2
    if person == "left":
        dets = dets[cx < frame_width / 2]
    elif person == "right":
        dets = dets[cx >= frame_width / 2]
    if len(dets) == 0:
        return None
    if previous is not None:
        overlaps = iou(dets, previous)
        if overlaps.max() >= min_iou:
            return dets[int(overlaps.argmax())]
    area = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
    return dets[int(area.argmax())]


def square_box(box: np.ndarray, margin: float) -> tuple[float, float, float]:
    """Centre x, centre y and side of the square crop around ``box`` with ``margin``."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    side = max(x1 - x0, y1 - y0) * (1.0 + margin)
    return (x0 + x1) / 2, (y0 + y1) / 2, side


def crop_face(image: np.ndarray, box: np.ndarray, margin: float, size: int) -> np.ndarray:
    """Square crop around ``box`` with ``margin``, resized to ``size``; outside pixels are black."""
    cx, cy, side = square_box(box, margin)
    scale = size / max(side, 1e-6)
    if scale < 0.5:
        # warpAffine has no area filter: shrink the image first so that the crop does not alias;
        # the translation is unchanged because it is expressed in output pixels.
        f = scale * 2
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        s = scale / f
    else:
        s = scale
    m = np.array([[s, 0, size / 2 - cx * scale], [0, s, size / 2 - cy * scale]], np.float32)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def interpolate_boxes(frame_a: int, box_a: np.ndarray, frame_b: int, box_b: np.ndarray, frame: int) -> np.ndarray:
    """Linear interpolation of a detection row (box, score, landmarks) between two frames."""
    t = (frame - frame_a) / (frame_b - frame_a)
    return (1 - t) * box_a + t * box_b


def encode_jpeg(image_bgr: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
