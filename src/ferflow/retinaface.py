"""Batched RetinaFace (ResNet-50, retinaface-pytorch 0.0.8) behind :class:`ferflow.detect.Detector`.

retinaface-pytorch's ``Model.predict_jsons`` runs one frame at a time and does its post-processing
partly in Python and NumPy. :class:`RetinaFaceDetector` uses the same network, prior boxes and box
decoding but

* resizes every frame so that its longest side is ``detect_size`` (aspect kept, up- or down-scaling,
  ``cv2.INTER_LINEAR``, sizes rounded as albumentations' ``LongestMaxSize`` does: exactly the image
  ``predict_jsons(max_size=detect_size)`` feeds its network);
* groups the frames of one call by that detection size (frames of a video all share one) and runs
  one forward pass per ``batch_size`` frames of a group (``"auto"``: :func:`auto_batch_size`, 1 on
  a CPU, 16 on a GPU). Frames of different sizes are *not* padded to a common size, as padding
  would change the network's output near the border;
* normalises on the device (BGR -> RGB, /255, ImageNet mean/std, as albumentations' ``Normalize``),
  computes the priors once per detection size (cached on the device), and decodes, score-filters and
  runs NMS on the device for the whole batch at once (``torchvision.ops.batched_nms`` with the image
  index as the group; NMS sees the boxes in float64, shifted to be non-negative, so that its
  per-image coordinate offsets neither overlap nor round); one device -> host copy per batch.

The output matches ``predict_jsons(image_rgb, confidence_threshold=min_score,
nms_threshold=nms_threshold)`` (tested with shared random weights): the unclipped boxes, the
boxes kept by NMS in descending score order, and the boxes ``predict_jsons`` drops after clipping
(those with ``x0 >= W - 1`` or ``y0 >= H - 1``) are dropped too. Two deliberate differences: values are
not rounded to 2 decimals, and x is rescaled by ``W / w`` and y by ``H / h`` (``predict_jsons``
uses ``H / h`` for both axes, which is off by up to a fraction of a pixel when rounding the
detection size changes the aspect ratio slightly).

Weights: the package's release (``RETINAFACE_URL``, ~105 MB, cached in the torch hub directory) or a
local file; see :func:`load_retinaface_weights`.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from math import ceil
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import batched_nms

from .detect import as_bgr, detect_in_batches

# Same as retinaface.pre_trained_models.models["resnet50_2020-07-20"].url (tested); not imported from
# there because that module imports albumentations, which the pipeline does not need otherwise.
RETINAFACE_URL = (
    "https://github.com/ternaus/retinaface/releases/download/0.01/retinaface_resnet50_2020-07-20-f168fae3c.zip"
)

# retinaface.predict_single.Model's settings.
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, albumentations' Normalize defaults
IMAGENET_STD = (0.229, 0.224, 0.225)


def _how_to_provide(url: str = RETINAFACE_URL) -> str:
    return (
        f"To provide the RetinaFace weights, download {url} on a machine with internet access and set "
        "`extract.retinaface_weights: /path/to/file` in config.yaml (the .zip as downloaded, or the .pth "
        f"inside it), or put the .zip into the torch hub cache ({Path(torch.hub.get_dir()) / 'checkpoints'})."
    )


def _is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _load_local(path: Path) -> object:
    """torch.load with weights_only=True; also reads the release .zip (one .pth inside) directly."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            # torch.save's own format is a zip too (with a data.pkl); a wrapper zip holds one file.
            if not any(m.filename.endswith("data.pkl") for m in members):
                if len(members) != 1:
                    raise RuntimeError(f"zip with {len(members)} files; expected one .pth (the release zip)")
                with zf.open(members[0]) as fh:
                    return torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def _as_state_dict(obj: object, source: str) -> dict[str, Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise RuntimeError(f"{source} holds no state dict of tensors (got {type(obj).__name__}). " + _how_to_provide())
    state = {str(k): v for k, v in obj.items()}
    for prefix in ("model.", "module."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_retinaface_weights(spec: str | os.PathLike | None) -> dict[str, Tensor]:
    """RetinaFace ResNet-50 state dict from ``spec``, on the CPU.

    ``None`` (or ``""``): the package's release URL; an ``http(s)://`` URL: downloaded once into the
    torch hub directory (``torch.hub.load_state_dict_from_url``, which also unpacks the release zip);
    anything else: a local file, the release ``.zip`` or a ``.pth`` holding a state dict or
    ``{"state_dict": ...}``. A ``model.`` or ``module.`` prefix on every key is removed. Loading is
    always ``weights_only=True``. Any failure raises a RuntimeError that says what failed and how to
    provide the weights.
    """
    spec = RETINAFACE_URL if spec is None or str(spec) == "" else str(spec)
    if _is_url(spec):
        try:
            with warnings.catch_warnings():  # torch.hub's "legacy zip format" FutureWarning
                warnings.simplefilter("ignore", FutureWarning)
                obj = torch.hub.load_state_dict_from_url(spec, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(
                f"cannot download the RetinaFace weights from {spec} ({type(e).__name__}: {e}). " + _how_to_provide(spec)
            ) from e
        return _as_state_dict(obj, spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise RuntimeError(f"RetinaFace weights file not found: {path}. " + _how_to_provide())
    try:
        obj = _load_local(path)
    except Exception as e:
        raise RuntimeError(
            f"cannot load the RetinaFace weights from {path} ({type(e).__name__}: {e}). " + _how_to_provide()
        ) from e
    return _as_state_dict(obj, str(path))


def build_retinaface() -> torch.nn.Module:
    """The network exactly as ``retinaface.predict_single.Model`` builds it (random init, nothing downloaded)."""
    from retinaface.network import RetinaFace

    with warnings.catch_warnings():  # torchvision's deprecation notes about `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        return RetinaFace(
            name="Resnet50",
            pretrained=False,
            return_layers={"layer2": 1, "layer3": 2, "layer4": 3},
            in_channels=256,
            out_channels=256,
        )


def detection_shape(height: int, width: int, detect_size: int) -> tuple[int, int]:
    """(h, w) with the longest side ``detect_size``; rounding as albumentations' LongestMaxSize."""
    scale = detect_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def priors(height: int, width: int) -> Tensor:
    """``retinaface.prior_box.priorbox`` (clip=False) for an image of (height, width), vectorised.

    Same values bit for bit (computed in float64 in the same order, then float32); same order:
    per level, rows, columns, then the level's two anchor sizes; columns (cx, cy, w, h), relative.
    """
    parts = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        fh, fw = ceil(height / step), ceil(width / step)
        cy = (torch.arange(fh, dtype=torch.float64) + 0.5) * step / height
        cx = (torch.arange(fw, dtype=torch.float64) + 0.5) * step / width
        sx = torch.tensor([s / width for s in sizes], dtype=torch.float64)
        sy = torch.tensor([s / height for s in sizes], dtype=torch.float64)
        shape = (fh, fw, len(sizes))
        level = torch.stack(
            [cx[None, :, None].expand(shape), cy[:, None, None].expand(shape),
             sx[None, None, :].expand(shape), sy[None, None, :].expand(shape)],
            dim=-1,
        )
        parts.append(level.reshape(-1, 4))
    return torch.cat(parts).to(torch.float32)


def _decode(loc: Tensor, pri: Tensor) -> Tensor:
    """retinaface.box_utils.decode: (cx, cy, w, h) offsets -> (x0, y0, x1, y1), relative."""
    v0, v1 = VARIANCES
    centre = pri[:, :2] + loc[:, :2] * v0 * pri[:, 2:]
    size = pri[:, 2:] * torch.exp(loc[:, 2:] * v1)
    top_left = centre - size / 2
    return torch.cat([top_left, size + top_left], dim=1)


def _decode_landmarks(pre: Tensor, pri: Tensor) -> Tensor:
    """retinaface.box_utils.decode_landm for (N, 10) predictions, relative."""
    v0 = VARIANCES[0]
    points = pri[:, None, :2] + pre.view(-1, 5, 2) * v0 * pri[:, None, 2:]
    return points.reshape(-1, 10)


#: Frames per forward pass that ``batch_size="auto"`` picks, per device type. The CPU value is
#: measured (``bench/extract.py``, equal settings against ``predict_jsons``, ABBA rounds, on the
#: 2-core development machine): one frame per pass at 1.18x ``predict_jsons`` and 16 frames at
#: 0.71x on an idle machine (issue 19); under load 16-19 with one torch thread (what a pipeline
#: job gets: Snakemake sets OMP_NUM_THREADS to the rule's ``threads: 1``) one frame at 1.21x, 4
#: frames at 1.02x. A pass on one frame already keeps the cores busy; a batch only adds memory
#: traffic. (With more torch threads than free cores, batches win instead: threads waiting for
#: each other at every layer cost more than the layer, and a batch has fewer layers per frame.)
#: On a GPU one 640x360 frame leaves most of the device idle and each pass pays kernel launches
#: and a host sync, so frames are batched; 16 is a default, not yet measured by this project
#: (``bench/gpu_detect.py`` times 1, 16 and 64 when a GPU is lent).
AUTO_BATCH = {"cpu": 1, "cuda": 16, "mps": 1}


def auto_batch_size(device: str | torch.device) -> int:
    """Frames per forward pass for ``device`` (:data:`AUTO_BATCH`; 1 for a device type not listed)."""
    return AUTO_BATCH.get(torch.device(device).type, 1)


class RetinaFaceDetector:
    """Batched RetinaFace ResNet-50; see the module docstring.

    ``detector(frames)`` takes BGR uint8 frames (OpenCV order, HxWx3; HxW grey is accepted) and
    returns one float32 (N, 15) array per frame: ``x0, y0, x1, y1, score`` and five landmarks
    ``(x, y)`` (left eye, right eye, nose, left mouth corner, right mouth corner) in the frame's own
    pixels, rows sorted by descending score; (0, 15) when nothing scores above ``min_score``.
    """

    name = "retinaface"

    def __init__(self, weights: str | None = None, detect_size: int = 640, min_score: float = 0.7,
                 nms_threshold: float = 0.4, device: str | torch.device = "cpu", batch_size: int | str = "auto"):
        if detect_size < 32:
            raise ValueError(f"detect_size must be at least 32, got {detect_size}")
        self.device = torch.device(device)
        if batch_size == "auto":
            batch_size = auto_batch_size(self.device)
        if isinstance(batch_size, str) or batch_size < 1:
            raise ValueError(f"batch_size must be 'auto' or at least 1, got {batch_size!r}")
        self.detect_size = int(detect_size)
        self.min_score = float(min_score)
        self.nms_threshold = float(nms_threshold)
        self.batch_size = int(batch_size)
        self.weights = str(weights) if weights else RETINAFACE_URL
        state = load_retinaface_weights(weights)
        model = build_retinaface()
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise RuntimeError(
                f"the weights from {weights or RETINAFACE_URL} do not fit RetinaFace ResNet-50: {e}. " + _how_to_provide()
            ) from e
        self.model = model.to(self.device).eval()
        # x_normalised = x * scale + shift == (x / 255 - mean) / std, per RGB channel.
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, 3, 1, 1).to(self.device)
        # NMS in float64 (exact translation of float32 boxes); MPS has no float64.
        self._nms_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self._priors: dict[tuple[int, int], Tensor] = {}

    def settings(self) -> dict:
        """What decides the output (batch size and device do not), for the FACES ``detector`` column."""
        return {"name": self.name, "network": "resnet50", "weights": self.weights, "detect_size": self.detect_size,
                "min_score": self.min_score, "nms_threshold": self.nms_threshold}

    def _priors_for(self, shape: tuple[int, int]) -> Tensor:
        if shape not in self._priors:
            self._priors[shape] = priors(*shape).to(self.device)
        return self._priors[shape]

    def __call__(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        return detect_in_batches([as_bgr(f) for f in frames], lambda h, w: detection_shape(h, w, self.detect_size),
                                 self.batch_size, self._detect_batch)

    def _detect_batch(self, frames: list[np.ndarray], shape: tuple[int, int]) -> list[np.ndarray]:
        h, w = shape
        batch = np.stack([f if f.shape[:2] == shape else cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR)
                          for f in frames])
        x = torch.from_numpy(batch)
        if self.device.type == "cuda":
            x = x.pin_memory()
        # Original size / detection size per image and axis: (W/w, H/h, W/w, H/h).
        sizes = torch.tensor([[f.shape[1], f.shape[0]] for f in frames], dtype=torch.float32)
        factor = (sizes / torch.tensor([w, h], dtype=torch.float32)).repeat(1, 2).to(self.device)
        limits = (sizes - 1).to(self.device)  # predict_jsons drops boxes with x0 >= W-1 or y0 >= H-1

        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).flip(1)  # BGR NHWC -> RGB NCHW
            x = x.float() * self._scale + self._shift
            loc, conf, landm = self.model(x)
            pri = self._priors_for(shape)
            if loc.shape[1] != pri.shape[0]:
                raise RuntimeError(f"network gave {loc.shape[1]} anchors for {shape}, priors {pri.shape[0]}")
            scores = F.softmax(conf, dim=-1)[..., 1]
            image, anchor = torch.nonzero(scores > self.min_score, as_tuple=True)
            score = scores[image, anchor]
            anchor_priors = pri[anchor]
            pixels = torch.tensor([w, h], dtype=torch.float32, device=self.device)
            boxes = _decode(loc[image, anchor], anchor_priors) * pixels.repeat(2)
            points = _decode_landmarks(landm[image, anchor], anchor_priors) * pixels.repeat(5)

            nms_boxes = boxes.to(self._nms_dtype)
            if len(nms_boxes):
                # batched_nms' coordinate trick assumes boxes >= 0; these are unclipped.
                nms_boxes = nms_boxes - nms_boxes.min()
            keep = batched_nms(nms_boxes, score.to(self._nms_dtype), image, self.nms_threshold)  # by descending score
            image, score, boxes, points = image[keep], score[keep], boxes[keep], points[keep]

            boxes = boxes * factor[image]
            points = points * factor[image].repeat(1, 3)[:, :10]
            inside = (boxes[:, 0] < limits[image, 0]) & (boxes[:, 1] < limits[image, 1])
            image, score, boxes, points = image[inside], score[inside], boxes[inside], points[inside]

            order = torch.sort(image, stable=True).indices  # group by image, scores stay descending
            rows = torch.cat([boxes, score[:, None], points, image[:, None].to(boxes.dtype)], dim=1)[order]
            rows = rows.cpu().numpy()  # the one device -> host copy
        counts = np.bincount(rows[:, 15].astype(np.int64), minlength=len(frames))
        return [np.ascontiguousarray(a[:, :15]) for a in np.split(rows, np.cumsum(counts)[:-1])]
