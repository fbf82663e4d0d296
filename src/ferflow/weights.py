"""Pretrained weights from local files, each mapped onto :class:`ferflow.model.DAN`.

Formats (``pretrained.format`` in a variant's settings):

- ``vggface2``: ``resnet50_ft_weight.pkl`` (VGGFace2 ResNet-50, Caffe layout), a plain pickle of a
  dict ``name -> numpy array`` with torchvision resnet50 names (``conv1.weight``, ``layer1.0.*``,
  ..., ``fc.*`` for 8631 identities). Read with :func:`load_vggface2_pickle`, the only place that
  unpickles, through an allow-list of the numpy globals needed to rebuild arrays.
- ``torchvision``: a torchvision ResNet state dict (ImageNet weights, or DAN's MS-Celeb ResNet-18
  ``{"state_dict": ...}``), raw or under ``state_dict`` / ``model_state_dict``.
- ``dan``: DAN's released checkpoint ``{"model_state_dict": ...}`` (ResNet-18 + heads), or one of
  our own checkpoints in the same layout.

Mapping onto our keys:

- torchvision names -> ``features.{i}``: ``conv1`` -> ``features.0``, ``bn1`` -> ``features.1``,
  ``layer{k}`` -> ``features.{3 + k}``; ``fc.*`` (ImageNet / identity classifier) is dropped.
  Every backbone key must be present with its shape (``num_batches_tracked`` may be absent).
- DAN keys are ours already (``features.*``, ``cat_head{i}.sa.conv1x1.0.weight``, ..., ``fc``,
  ``bn``): backbone, reduction (if any) and every head must be present; ``fc``/``bn`` (and our
  ``va_fc``/``va_bn``) are loaded when their shapes match, otherwise skipped with a logged note
  (DAN's RAF-DB checkpoint has 7 classes, ours 8). A ``module.`` prefix (DataParallel) is removed.

A file that does not fit raises ``ValueError`` naming the file and listing the missing keys, the
unexpected keys and the shape mismatches. Files other than the VGGFace2 pickle are read with
``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

FORMATS = ("vggface2", "torchvision", "dan")

# (module, name) globals a pickle of numpy arrays may reference, -> where to find them now.
_ALLOWED_GLOBALS: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("numpy.core.multiarray", "_reconstruct"): (
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
    ),
    ("numpy._core.multiarray", "_reconstruct"): (
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
    ),
    ("numpy", "ndarray"): (("numpy", "ndarray"),),
    ("numpy", "dtype"): (("numpy", "dtype"),),
    ("collections", "OrderedDict"): (("collections", "OrderedDict"),),
}

# torchvision ResNet top-level children -> index in DAN's ``features`` Sequential
_TV_CHILDREN = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # the file was written by Python 2
        self._path = path

    def find_class(self, module: str, name: str):
        candidates = _ALLOWED_GLOBALS.get((module, name))
        if candidates is None:
            raise pickle.UnpicklingError(
                f"{self._path}: refusing to unpickle forbidden global {module}.{name} "
                "(only numpy arrays are allowed in a VGGFace2 weight pickle)"
            )
        for mod, attr in candidates:
            try:
                return getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"{self._path}: cannot resolve {module}.{name}")


def load_vggface2_pickle(path) -> dict[str, Tensor]:
    """Read ``resnet50_ft_weight.pkl``: dict name -> numpy array, as float32/int64 tensors.

    Only numpy's array-rebuilding globals (and ``collections.OrderedDict``) may be referenced;
    anything else raises ``pickle.UnpicklingError`` naming the file and the global, before it is
    called.
    """
    path = str(path)
    with open(path, "rb") as f:
        obj = _NumpyOnlyUnpickler(f, path).load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of numpy arrays, got {type(obj).__name__}")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise ValueError(
                f"{path}: expected str -> numpy array entries, got {key!r}: {type(value).__name__}"
            )
        if value.dtype.kind == "f":
            value = value.astype(np.float32, copy=False)
        elif value.dtype.kind in "iu":
            value = value.astype(np.int64, copy=False)
        else:
            raise ValueError(f"{path}: entry {key!r} has unsupported dtype {value.dtype}")
        out[key] = torch.from_numpy(np.array(value, copy=True, order="C"))
    return out


def _unwrap_state_dict(obj, path: str) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for wrapper in ("model_state_dict", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise ValueError(f"{path}: not a state dict (str -> tensor), nor one under "
                         "'state_dict' / 'model_state_dict'")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_state_dict_file(path) -> dict[str, Tensor]:
    """``torch.load(path, weights_only=True)`` and unwrap ``state_dict`` / ``model_state_dict``."""
    path = str(path)
    obj = torch.load(path, weights_only=True, map_location="cpu")
    return _unwrap_state_dict(obj, path)


def torchvision_to_features(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """torchvision ResNet names -> DAN's ``features.{i}`` names. Returns (mapped, unmapped keys);
    the classifier ``fc.*`` is dropped silently (it is neither mapped nor reported)."""
    mapped: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in _TV_CHILDREN and rest:
            mapped[f"features.{_TV_CHILDREN[head]}.{rest}"] = value
        elif head == "fc":
            continue
        else:
            unmapped.append(key)
    return mapped, unmapped


def _is_optional_buffer(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _fit(
    model: nn.Module,
    incoming: dict[str, Tensor],
    path: str,
    required: list[str],
    optional_groups: dict[str, list[str]],
    extra_unexpected: list[str] = (),
) -> list[str]:
    """Copy ``incoming`` into ``model``. ``required`` keys must all be there with their shapes;
    each optional group (e.g. the fc/bn classifier) is loaded whole when all its keys are present
    with matching shapes, else skipped. Returns the loaded keys; raises ValueError otherwise."""
    own = model.state_dict()
    optional = {k for keys in optional_groups.values() for k in keys}
    missing = [k for k in required if k not in incoming and not _is_optional_buffer(k)]
    unexpected = [k for k in incoming if k not in required and k not in optional]
    unexpected += list(extra_unexpected)
    mismatched = [
        f"{k}: file {tuple(incoming[k].shape)} vs model {tuple(own[k].shape)}"
        for k in required
        if k in incoming and tuple(incoming[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{path}: weights do not fit the model ({model.__class__.__name__}, "
                 f"{getattr(model, 'config', {})})"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(_abbreviate(keys)))
        raise ValueError("\n".join(lines))
    loaded = [k for k in required if k in incoming]
    for group, keys in optional_groups.items():
        present = [k for k in keys if k in incoming]
        if not present:
            continue
        bad = [k for k in keys if not _is_optional_buffer(k) and
               (k not in incoming or tuple(incoming[k].shape) != tuple(own[k].shape))]
        if bad:
            shapes = {k: tuple(incoming[k].shape) for k in present if incoming[k].dim()}
            log.warning("%s: %s not loaded (shape or keys differ from the model: %s); "
                        "it keeps its fresh initialisation", path, group, shapes)
            continue
        loaded += present
    new_state = dict(own)
    for k in loaded:
        new_state[k] = incoming[k].to(dtype=own[k].dtype)
    model.load_state_dict(new_state, strict=True)
    return loaded


def _abbreviate(keys: list[str], limit: int = 40) -> list[str]:
    keys = list(keys)
    return keys if len(keys) <= limit else keys[:limit] + [f"... ({len(keys) - limit} more)"]


def _backbone_keys(own: dict[str, Tensor]) -> list[str]:
    return [k for k in own if k.startswith("features.")]


_CLASSIFIER = re.compile(r"^(fc|bn)\.")
_VA = re.compile(r"^(va_fc|va_bn)\.")


def load_pretrained(model: nn.Module, fmt: str, path) -> list[str]:
    """Load the weight file ``path`` of format ``fmt`` into ``model`` (a DAN); returns the keys
    loaded. See the module docstring for the mapping of each format."""
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path} (format {fmt})")
    own = model.state_dict()
    if fmt in ("vggface2", "torchvision"):
        state = load_vggface2_pickle(path) if fmt == "vggface2" else load_state_dict_file(path)
        mapped, unmapped = torchvision_to_features(state)
        loaded = _fit(model, mapped, path, _backbone_keys(own), {}, extra_unexpected=unmapped)
    elif fmt == "dan":
        state = load_state_dict_file(path)
        classifier = [k for k in own if _CLASSIFIER.match(k)]
        va = [k for k in own if _VA.match(k)]
        required = [k for k in own if k not in classifier and k not in va]
        loaded = _fit(model, state, path, required,
                      {"expression classifier (fc, bn)": classifier, "VA head (va_fc, va_bn)": va})
    else:
        raise ValueError(f"unknown pretrained format {fmt!r}; valid: {', '.join(FORMATS)}")
    log.info("%s: loaded %d tensors (format %s)", path, len(loaded), fmt)
    return loaded
