"""The trained variants of an ensemble as one network, run on PyTorch or on onnxruntime.

A run's models folder holds one ``<variant>/model.pt`` per variant (written by ``ferflow.train``).
:func:`load_ensemble` rebuilds them (``torch.load(weights_only=True)``) into one
:class:`EnsembleNet`, which ``ferflow export`` writes as a single ONNX graph and ``ferflow annotate``
runs. Both runners (:class:`TorchRunner`, :class:`OnnxRunner`) take the same input and give the
same per-variant outputs:

- input: face crops, uint8 RGB, N x 3 x S x S, values 0..255, S the variants' ``input_size``
  (every variant normalises its own input, with the convention of its pretrained weights, see
  :class:`ferflow.model.Normalize`);
- output: each variant's class probabilities (softmax, ABAW order) V x N x 8 and valence/arousal
  V x N x 2, float32.

The ensemble's vote is made from these by :func:`ferflow.ensemble.soft_vote` (the one
implementation of soft voting), with the weights in :attr:`Ensemble.members`. The graph also
holds the vote as outputs ``probs`` and ``va`` for users of the ONNX file alone; tests check
that they equal ``soft_vote`` of the per-variant outputs.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .labels import EXPRESSIONS, NUM_EXPRESSIONS
from .model import load_model

log = logging.getLogger("ferflow.inference")

MODEL_FILE = "model.pt"
#: Key of the JSON metadata in an exported ONNX file (``metadata_props``).
ONNX_METADATA_KEY = "ferflow"
ONNX_OUTPUTS = ("probs", "va", "variant_probs", "variant_va")


class InferenceError(ValueError):
    """A models folder or ONNX file that cannot be used; the message names the path."""


@dataclass(frozen=True)
class Member:
    """One variant of the ensemble: its name, task and weights in the vote."""

    name: str
    task: str  # expr | va | both: the heads it was trained for (the other head is not voted)
    weight: float  # weight of its class probabilities in the soft vote (0 when task == "va")
    va_weight: float  # weight of its valence/arousal (0 when task == "expr")
    input_size: int
    backbone: str
    heads: int


def find_models(models_dir: str | os.PathLike) -> dict[str, Path]:
    """``{variant: path}`` of every ``<models_dir>/<variant>/model.pt``, sorted by name.

    Raises :class:`InferenceError` naming the folder when it does not exist or holds no model.
    """
    root = Path(models_dir)
    if not root.is_dir():
        raise InferenceError(f"{root}: no such models folder (the training outputs, e.g. results/models)")
    found = {p.parent.name: p for p in sorted(root.glob(f"*/{MODEL_FILE}"))}
    if not found:
        raise InferenceError(f"{root}: holds no <variant>/{MODEL_FILE}; train the variants first")
    return found


def member(name: str, settings: dict, weight: float = 1.0, va_weight: float = 1.0) -> Member:
    """The :class:`Member` of a variant with training ``settings`` (a model.pt's ``settings``)."""
    task = settings.get("task", "both")
    return Member(name=name, task=task, weight=float(weight) if task != "va" else 0.0,
                  va_weight=float(va_weight) if task != "expr" else 0.0,
                  input_size=int(settings["input_size"]), backbone=str(settings.get("backbone", "resnet18")),
                  heads=int(settings.get("heads", 4)))


class EnsembleNet(nn.Module):
    """Every variant on the same crops, in one module (and one ONNX graph).

    ``forward(images)``: uint8 (or 0..255 float) RGB ``(N, 3, S, S)`` -> ``(probs (N, 8), va (N, 2),
    variant_probs (N, V, 8), variant_va (N, V, 2))``, float32. ``probs``/``va`` are the weighted means
    over the variants with the members' weights (normalised to sum 1; a task no member was trained
    for gives zeros); :func:`ferflow.ensemble.soft_vote` on the per-variant outputs gives the same.
    """

    def __init__(self, models: Sequence[nn.Module], members: Sequence[Member]):
        super().__init__()
        if len(models) != len(members) or not models:
            raise ValueError("EnsembleNet needs one member per model, at least one")
        self.variants = nn.ModuleList(models)
        self.members = list(members)
        w = torch.tensor([m.weight for m in members], dtype=torch.float32)
        w_va = torch.tensor([m.va_weight for m in members], dtype=torch.float32)
        self.register_buffer("w", (w / w.sum() if w.sum() > 0 else w).view(1, -1, 1), persistent=False)
        self.register_buffer("w_va", (w_va / w_va.sum() if w_va.sum() > 0 else w_va).view(1, -1, 1),
                             persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        probs, vas = [], []
        for model in self.variants:
            out = model(images)
            probs.append(torch.softmax(out.expr.float(), dim=1))
            vas.append(out.va.float())
        variant_probs = torch.stack(probs, dim=1)
        variant_va = torch.stack(vas, dim=1)
        return (variant_probs * self.w).sum(1), (variant_va * self.w_va).sum(1), variant_probs, variant_va


def load_ensemble(models_dir: str | os.PathLike, weights: Mapping[str, float] | None = None,
                  va_weights: Mapping[str, float] | None = None,
                  device: torch.device | str = "cpu") -> EnsembleNet:
    """Every variant of ``models_dir`` as one :class:`EnsembleNet` on ``device``, in eval mode.

    ``weights``/``va_weights``: per variant name (config ``variants[].weight``; default 1). Raises
    :class:`InferenceError` when the variants do not share one ``input_size`` (the crops are made
    once, at one size, for all of them) or a file is not a ferflow model.
    """
    device = torch.device(device)
    weights, va_weights = dict(weights or {}), dict(va_weights or {})
    paths = find_models(models_dir)
    unknown = sorted((set(weights) | set(va_weights)) - set(paths))
    if unknown:
        raise InferenceError(f"{models_dir}: weights given for variants it does not hold: {unknown} "
                             f"(it holds {sorted(paths)})")
    models, members = [], []
    for name, path in paths.items():
        try:
            model, settings = load_model(path, device)
        except KeyError as exc:
            raise InferenceError(str(exc).strip("'\"")) from None
        models.append(model)
        members.append(member(name, settings, weights.get(name, 1.0), va_weights.get(name, 1.0)))
    sizes = sorted({m.input_size for m in members})
    if len(sizes) > 1:
        raise InferenceError(f"{models_dir}: the variants have different input sizes "
                             f"{ {m.name: m.input_size for m in members} }; an ensemble here needs one")
    return EnsembleNet(models, members).to(device).eval()


@dataclass(frozen=True)
class Ensemble:
    """What a runner needs to know besides its outputs."""

    members: tuple[Member, ...]
    input_size: int

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` (eval mode) with every BatchNorm that follows a Conv or Linear folded into it, in place.

    Inference only: the folded layer computes ``bn(conv(x))`` with one convolution (weights
    ``w * gamma / sqrt(var + eps)``, bias ``(b - mean) * gamma / sqrt(var + eps) + beta``), so the
    BatchNorm's pass over the feature map is saved. The folding is torch.fx's
    (``torch.fx.experimental.optimization.fuse``), applied to each child that fx can trace and
    recursively into the children of one it cannot (e.g. :class:`ferflow.model.DAN` itself, whose
    forward has shape checks and an autocast region, stays as it is, its ResNet trunk and attention
    heads are folded). Outputs equal the unfolded module's up to float32 rounding
    (``tests/test_annotate.py`` checks 1e-5). The result must not be trained (no BatchNorm left).
    """
    from torch.fx.experimental.optimization import fuse
    from torch.fx.proxy import TraceError

    if module.training:
        raise ValueError("fold_batchnorm: the module must be in eval mode (BatchNorm's running statistics)")
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) or not any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in child.modules()):
            continue  # nothing to fold (into)
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # containers without a forward
            fold_batchnorm(child)
            continue
        try:
            setattr(module, name, fuse(child, inplace=True))
        except TraceError:  # data-dependent control flow: fold what lies below it
            fold_batchnorm(child)
    return module


class TorchRunner:
    """An :class:`EnsembleNet` on PyTorch: ``runner(images)`` -> per-variant probs and VA (numpy).

    The runner works on a copy of ``net`` with its BatchNorms folded (:func:`fold_batchnorm`;
    ``fold=False`` keeps them) and its weights channels-last (oneDNN's and cuDNN's preferred layout).
    """

    def __init__(self, net: EnsembleNet, device: torch.device | str = "cpu", fold: bool = True):
        self.device = torch.device(device)
        net = net.eval()
        if fold:
            net = fold_batchnorm(copy.deepcopy(net))
        self.net = net.to(self.device).to(memory_format=torch.channels_last)
        self.ensemble = Ensemble(tuple(net.members), net.members[0].input_size)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``(N, 3, S, S)`` -> ``(variant_probs (V, N, 8), variant_va (V, N, 2))`` float32."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                _, _, p, va = self.net(x)
        else:
            _, _, p, va = self.net(x)
        return (p.float().transpose(0, 1).cpu().numpy(), va.float().transpose(0, 1).cpu().numpy())


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """The ferflow metadata of an ONNX file written by ``ferflow export`` (see :mod:`ferflow.export`)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for files that are not ONNX
        raise InferenceError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if ONNX_METADATA_KEY not in props:
        raise InferenceError(f"{path}: an ONNX file without ferflow metadata; write it with `ferflow export`")
    return json.loads(props[ONNX_METADATA_KEY])


class OnnxRunner:
    """An exported ensemble on onnxruntime (CUDA when available, else CPU); same call as TorchRunner."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        self.metadata = read_onnx_metadata(path)
        members = tuple(Member(**m) for m in self.metadata["variants"])
        self.ensemble = Ensemble(members, int(self.metadata["input"]["size"]))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), options, providers=providers)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p, va = self.session.run(["variant_probs", "variant_va"], {"images": np.ascontiguousarray(images)})
        return p.transpose(1, 0, 2), va.transpose(1, 0, 2)


def onnx_metadata(members: Sequence[Member], smoothing: Mapping[str, int], crop: Mapping) -> dict:
    """The JSON stored in an exported file: classes, input, preprocessing, crops, smoothing, variants."""
    size = members[0].input_size
    return {
        "format": 1,
        "classes": list(EXPRESSIONS),
        "input": {"name": "images", "shape": ["N", 3, size, size], "dtype": "uint8", "size": size},
        "preprocessing": (
            f"RGB face crops, values 0..255, {size}x{size}: a square around the detector's box with "
            f"margin {crop.get('margin')} (side = the box's longer side x (1 + margin)), cut at "
            f"{crop.get('crop_size')} px and resized to {size} (cv2 INTER_AREA when shrinking by more "
            f"than 1.25, else INTER_LINEAR); normalisation is inside the graph"),
        "crop": dict(crop),
        "outputs": {
            "probs": f"N x {NUM_EXPRESSIONS}: soft vote (weighted mean of the variants' softmax), class order above",
            "va": "N x 2: weighted mean of the variants' valence, arousal in [-1, 1]",
            "variant_probs": f"N x V x {NUM_EXPRESSIONS}: each variant's softmax",
            "variant_va": "N x V x 2: each variant's valence, arousal",
        },
        "smoothing": {"expr": int(smoothing.get("expr", 0)), "va": int(smoothing.get("va", 0)),
                      "how": "centred mean over W frames of the same track, then argmax (0 or 1: none)"},
        "variants": [asdict(m) for m in members],
    }
