"""Face detectors behind one interface: ``detector(frames) -> list of (N, 15) arrays``.

Each returned array has shape (N, 15): ``x0, y0, x1, y1, score`` then five landmarks
``(x, y)`` (left eye, right eye, nose, left mouth corner, right mouth corner), all in pixels of the
frame it was given; landmarks are NaN for detectors that give none.
``retinaface`` (see :mod:`ferflow.retinaface`) is the detector for real data (the paper's; its
weights are downloaded or given as a file); ``mtcnn`` (see :mod:`ferflow.mtcnn`) is a learned
detector whose weights ship in its package, for offline runs and the demo; ``haar`` is OpenCV's
frontal-face cascade, the last resort that needs nothing beyond OpenCV (it misses turned heads).
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import cv2
import numpy as np


class Detector(Protocol):
    name: str

    def __call__(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]: ...

    def settings(self) -> dict:
        """What decides its output (recorded with every extracted face), JSON-serialisable."""
        ...


def as_bgr(frame: np.ndarray) -> np.ndarray:
    """A frame as HxWx3 uint8 BGR (HxW grey is converted); ValueError for any other dtype or shape."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frame.dtype}")
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frames must be HxWx3 BGR (or HxW grey), got shape {frame.shape}")
    return frame


def detect_in_batches(frames: Sequence[np.ndarray], shape_of: Callable[[int, int], tuple[int, int]],
                      batch_size: int, detect_batch: Callable[[list[np.ndarray], tuple[int, int]], list[np.ndarray]]
                      ) -> list[np.ndarray]:
    """``detect_batch(chunk, shape)`` over ``frames`` grouped by detection shape ``shape_of(h, w)``,
    at most ``batch_size`` frames per call (frames of different sizes are never padded into one
    batch); the results in the order of ``frames``."""
    results: list[np.ndarray | None] = [None] * len(frames)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, frame in enumerate(frames):
        groups.setdefault(shape_of(*frame.shape[:2]), []).append(i)
    for shape, members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            for i, det in zip(chunk, detect_batch([frames[i] for i in chunk], shape)):
                results[i] = det
    return results  # type: ignore[return-value]


def detector_settings(detector) -> dict:
    """``detector.settings()``, or just its name for a detector without that method."""
    describe = getattr(detector, "settings", None)
    return describe() if callable(describe) else {"name": getattr(detector, "name", type(detector).__name__)}


class HaarDetector:
    """OpenCV's ``haarcascade_frontalface_default.xml``; offline, about 60 ms per 640x480 frame.

    Haar gives no confidence; the score is the detection's number of neighbours (its
    ``levelWeights``) squashed to (0, 1) so that the largest-and-most-certain face can be chosen.
    """

    name = "haar"

    def __init__(self, detect_size: int = 640, min_neighbors: int = 5, scale_factor: float = 1.1):
        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise RuntimeError(f"cannot load the OpenCV Haar cascade {path} (OpenCV >= 5 ships none; install opencv 4.x)")
        self.detect_size = detect_size
        self.min_neighbors = min_neighbors
        self.scale_factor = scale_factor

    def __call__(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self._one(f) for f in frames]

    def settings(self) -> dict:
        return {"name": self.name, "cascade": "haarcascade_frontalface_default.xml", "opencv": cv2.__version__,
                "detect_size": self.detect_size, "min_neighbors": self.min_neighbors,
                "scale_factor": self.scale_factor}

    def _one(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        scale = min(1.0, self.detect_size / max(h, w))
        img = frame if scale == 1.0 else cv2.resize(frame, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img
        min_side = max(20, int(0.08 * min(gray.shape[:2])))
        boxes, _, weights = self.cascade.detectMultiScale3(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(min_side, min_side), outputRejectLevels=True,
        )
        if len(boxes) == 0:
            return np.zeros((0, 15), np.float32)
        boxes = np.asarray(boxes, np.float32) / scale
        weights = np.asarray(weights, np.float32).reshape(-1)
        score = 1.0 / (1.0 + np.exp(-weights))  # levelWeights are unbounded; map to (0, 1)
        landmarks = np.full((len(boxes), 10), np.nan, np.float32)
        out = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:4], score[:, None], landmarks], axis=1)
        return out.astype(np.float32)
