"""MTCNN (facenet-pytorch 2.6.0) behind :class:`ferflow.detect.Detector`: a learned face detector
whose weights ship inside its wheel, so it runs offline.

MTCNN (Zhang et al., *Joint Face Detection and Alignment Using Multitask Cascaded Convolutional
Networks*, IEEE Signal Processing Letters 2016) is a cascade of three small networks (P-, R- and
O-Net) over an image pyramid; it gives a box, a score and five landmarks per face. facenet-pytorch
ships the networks' weights as ``facenet_pytorch/data/{pnet,rnet,onet}.pt`` (ported from David
Sandberg's TensorFlow ``facenet`` repository, itself a port of the authors' Caffe models).

What ferflow adds around the package's ``detect_face`` (which does the pyramid, the three stages
and the NMS, batched over images of one size):

* the weights are read with ``torch.load(weights_only=True)`` into networks built with
  ``pretrained=False`` (the package's own constructors call ``torch.load`` without it);
* frames are shrunk (``cv2.INTER_AREA``) so that their longest side is at most ``detect_size``
  (never enlarged: MTCNN's pyramid already looks for faces down to ``min_face_size`` pixels), grouped
  by that size, and run ``batch_size`` frames per call, on ``device``; BGR -> RGB on the device;
* the last stage's threshold is ``min_score`` (the first two keep the package's 0.6 and 0.7), so
  every box returned scores above ``min_score``; rows are sorted by descending score;
* a frame whose shorter side is under ``min_face_size`` gets no detection (the package would fail
  on its empty pyramid).

Output rows: ``x0, y0, x1, y1, score`` then the five landmarks ``(x, y)`` in MTCNN's order (left
eye, right eye, nose, left and right mouth corner, left being the image's left), the same order as
RetinaFace's, in the frame's own pixels; boxes are not clipped to the frame.

Install: ``pip install --no-deps facenet-pytorch==2.6.0`` (its pins on torch < 2.3 are stale; it
needs only torch, torchvision, numpy, Pillow and requests at run time, all of which ferflow has).
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .detect import as_bgr, detect_in_batches

INSTALL_HINT = "pip install --no-deps 'facenet-pytorch==2.6.0'"
WEIGHT_FILES = ("pnet.pt", "rnet.pt", "onet.pt")
STAGE_THRESHOLDS = (0.6, 0.7)  # P-Net and R-Net, facenet-pytorch's defaults
PYRAMID_FACTOR = 0.709  # facenet-pytorch's (and the paper's code's) scale step


def weights_dir() -> Path:
    """The folder of the weights inside the installed facenet-pytorch; RuntimeError when it is not installed."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"detector 'mtcnn' needs the facenet-pytorch package: {INSTALL_HINT}")
    return Path(spec.submodule_search_locations[0]) / "data"


def load_mtcnn_networks(device="cpu"):
    """P-, R- and O-Net of facenet-pytorch with its shipped weights, in eval mode on ``device``.

    The weights are read with ``torch.load(weights_only=True)``. RuntimeError naming the file when
    one is missing or does not fit its network.
    """
    import torch

    folder = weights_dir()
    with warnings.catch_warnings():  # the package's own import-time warnings (torchvision, requests)
        warnings.simplefilter("ignore")
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
    nets = []
    for cls, name in zip((PNet, RNet, ONet), WEIGHT_FILES):
        path = folder / name
        if not path.is_file():
            raise RuntimeError(f"MTCNN weights file not found: {path}; reinstall facenet-pytorch: {INSTALL_HINT}")
        net = cls(pretrained=False)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            raise RuntimeError(f"cannot load the MTCNN weights {path} ({type(e).__name__}: {e})") from e
        nets.append(net.to(device).eval())
    return tuple(nets)


def weights_digest() -> str:
    """First 16 hex digits of the SHA-256 of the three weight files, in P, R, O order."""
    h = hashlib.sha256()
    for name in WEIGHT_FILES:
        h.update((weights_dir() / name).read_bytes())
    return h.hexdigest()[:16]


class MTCNNDetector:
    """facenet-pytorch's MTCNN, batched over frames of one size; see the module docstring.

    ``detector(frames)`` takes BGR uint8 frames (HxWx3; HxW grey is accepted) and returns one
    float32 (N, 15) array per frame: ``x0, y0, x1, y1, score`` and five landmarks ``(x, y)`` in the
    frame's pixels, rows by descending score, every score > ``min_score``; (0, 15) when none.
    """

    name = "mtcnn"

    def __init__(self, detect_size: int = 640, min_score: float = 0.7, min_face_size: int = 20,
                 device="cpu", batch_size: int = 16):
        if detect_size < 32:
            raise ValueError(f"detect_size must be at least 32, got {detect_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if min_face_size < 12:
            raise ValueError(f"min_face_size must be at least 12 (P-Net's window), got {min_face_size}")
        import torch

        self.detect_size = int(detect_size)
        self.min_score = float(min_score)
        self.min_face_size = int(min_face_size)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.nets = load_mtcnn_networks(self.device)
        self._digest = weights_digest()

    def settings(self) -> dict:
        """What decides the output (batch size and device do not), for the FACES ``detector`` column."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            package = version("facenet-pytorch")
        except PackageNotFoundError:  # imported from a source tree
            package = "unknown"
        return {"name": self.name, "package": f"facenet-pytorch {package}", "weights_sha256": self._digest,
                "detect_size": self.detect_size, "min_score": self.min_score, "min_face_size": self.min_face_size,
                "thresholds": [*STAGE_THRESHOLDS, self.min_score], "factor": PYRAMID_FACTOR}

    def detection_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the frame is detected at: longest side at most ``detect_size``, aspect kept."""
        scale = min(1.0, self.detect_size / max(height, width))
        return max(1, round(height * scale)), max(1, round(width * scale))

    def __call__(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        return detect_in_batches([as_bgr(f) for f in frames], self.detection_shape, self.batch_size, self._detect_batch)

    def _detect_batch(self, frames: list[np.ndarray], shape: tuple[int, int]) -> list[np.ndarray]:
        import torch
        from facenet_pytorch.models.utils.detect_face import detect_face

        h, w = shape
        if min(h, w) < self.min_face_size:  # no pyramid level: nothing can be found
            return [np.zeros((0, 15), np.float32) for _ in frames]
        batch = np.stack([f if f.shape[:2] == shape else cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA)
                          for f in frames])
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device).flip(-1)  # BGR -> RGB, NHWC as detect_face takes it
            boxes, points = detect_face(x, self.min_face_size, *self.nets,
                                        [*STAGE_THRESHOLDS, self.min_score], PYRAMID_FACTOR, self.device)
        out = []
        for frame, b, p in zip(frames, boxes, points):
            b = np.asarray(b, np.float32).reshape(-1, 5)
            p = np.asarray(p, np.float32).reshape(-1, 10)  # (k, 5, 2) -> x0 y0 x1 y1 ... per point
            # back to the frame's pixels, per axis (rounding the size may change the aspect slightly)
            fx, fy = frame.shape[1] / w, frame.shape[0] / h
            b[:, [0, 2]] *= fx
            b[:, [1, 3]] *= fy
            p[:, 0::2] *= fx
            p[:, 1::2] *= fy
            rows = np.concatenate([b, p], axis=1)
            out.append(np.ascontiguousarray(rows[np.argsort(-rows[:, 4], kind="stable")]))
        return out
