"""Pretrained weight files: VGGFace2 pickle (restricted unpickler), torchvision, DAN checkpoints."""

from __future__ import annotations

import logging
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from torch import nn
from torchvision import models

from ferflow.model import DAN, build_model
from ferflow.weights import load_pretrained, load_state_dict_file, load_vggface2_pickle

torch.set_num_threads(1)


class Py2StylePickler(pickle._Pickler):
    """Writes what Python 2's cPickle (protocol 2) wrote for numpy arrays: array bytes as py2
    ``str`` opcodes (SHORT_BINSTRING / BINSTRING) and ``numpy.core.multiarray`` globals."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def dump_py2_pickle(obj, path):
    with open(path, "wb") as f:
        Py2StylePickler(f, protocol=2).dump(obj)


def numpy_state(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in module.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def caffe_resnet50_reference() -> models.ResNet:
    """A torchvision ResNet-50 with the Caffe strides, built here independently of ferflow."""
    net = models.resnet50(weights=None, num_classes=8631)
    for layer in (net.layer2, net.layer3, net.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    net.maxpool = nn.MaxPool2d(3, 2, 0, ceil_mode=True)
    return net


@pytest.fixture(scope="module")
def vggface2_file(tmp_path_factory):
    """A resnet50_ft_weight.pkl look-alike: Python-2 pickle of name -> float32 array (8631 ids)."""
    torch.manual_seed(0)
    ref = caffe_resnet50_reference().eval()
    g = torch.Generator().manual_seed(2)
    for m in ref.modules():  # non-trivial BN statistics, so a wrong mapping shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    path = tmp_path_factory.mktemp("vgg") / "resnet50_ft_weight.pkl"
    dump_py2_pickle(numpy_state(ref), path)
    return path, ref


# --- VGGFace2 pickle -------------------------------------------------------------------------
def test_vggface2_pickle_loads_into_caffe_resnet50(vggface2_file):
    path, ref = vggface2_file
    raw = load_vggface2_pickle(path)
    assert raw["fc.weight"].shape == (8631, 2048) and raw["conv1.weight"].dtype == torch.float32
    model = build_model({"backbone": "resnet50", "heads": 2,
                         "pretrained": {"format": "vggface2", "path": str(path)}}).eval()
    assert model.normalize.mode == "vggface2" and model.config["caffe_style"]
    torch.testing.assert_close(model.features[0].weight, ref.conv1.weight)
    torch.testing.assert_close(model.features[7][2].bn3.running_var, ref.layer4[2].bn3.running_var)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        got = model.features(x)
    torch.testing.assert_close(got, want)


def test_vggface2_pickle_written_by_python3(tmp_path):
    net = models.resnet18(weights=None)
    state = numpy_state(net)
    path = tmp_path / "py3.pkl"
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=4)
    loaded = load_vggface2_pickle(path)
    assert set(loaded) == set(state)
    np.testing.assert_array_equal(loaded["layer1.0.conv1.weight"].numpy(), state["layer1.0.conv1.weight"])


def test_vggface2_file_that_does_not_fit_lists_keys(tmp_path):
    path = tmp_path / "resnet18_as_vggface2.pkl"
    state = numpy_state(models.resnet18(weights=None))
    state["extra.weight"] = np.zeros(3, dtype=np.float32)
    dump_py2_pickle(state, path)
    model = DAN("resnet50", num_heads=1, normalization="vggface2", caffe_style=True)
    with pytest.raises(ValueError) as err:
        load_pretrained(model, "vggface2", path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys" in msg and "features.4.0.conv3.weight" in msg
    assert "unexpected keys" in msg and "extra.weight" in msg
    assert "shape mismatches" in msg and "features.4.0.conv1.weight" in msg


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "numpy.frombuffer"])
def test_malicious_pickle_is_refused_without_running(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "resnet50_ft_weight.pkl"
    if payload == "os.system":
        obj = {"conv1.weight": Evil(marker)}
    elif payload == "builtins.eval":
        class EvalEvil:
            def __reduce__(self):
                return (eval, (f"open({str(marker)!r}, 'w')",))
        obj = EvalEvil()
    else:
        class NumpyEvil:
            def __reduce__(self):
                return (np.frombuffer, (b"\0\0\0\0", np.float32))
        obj = {"conv1.weight": NumpyEvil()}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError) as err:
        load_vggface2_pickle(path)
    msg = str(err.value)
    assert str(path) in msg and "forbidden global" in msg
    assert payload.split(".")[-1] in msg
    assert not marker.exists()


def test_pickle_of_something_else_is_refused(tmp_path):
    path = tmp_path / "list.pkl"
    with open(path, "wb") as f:
        pickle.dump([np.zeros(2)], f)
    with pytest.raises(ValueError, match="dict"):
        load_vggface2_pickle(path)
    with open(path, "wb") as f:
        pickle.dump({"a": np.array([1, "x"], dtype=object)}, f, protocol=2)
    with pytest.raises((ValueError, pickle.UnpicklingError)):
        load_vggface2_pickle(path)


# --- torchvision state dicts ------------------------------------------------------------------
@pytest.mark.parametrize("wrap", ["raw", "state_dict", "module"])
def test_torchvision_state_dict(tmp_path, wrap):
    torch.manual_seed(0)
    net = models.resnet18(weights=None).eval()
    state = net.state_dict()
    if wrap == "state_dict":  # DAN's MS-Celeb ResNet-18 file: {"state_dict": ...}
        obj = {"state_dict": state}
    elif wrap == "module":
        obj = {"model_state_dict": {f"module.{k}": v for k, v in state.items()}}
    else:
        obj = state
    path = tmp_path / "resnet18.pth"
    torch.save(obj, path)
    model = build_model({"backbone": "resnet18", "heads": 2,
                         "pretrained": {"format": "torchvision", "path": str(path)}}).eval()
    assert model.normalize.mode == "imagenet"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = nn.Sequential(*list(net.children())[:-2])(x)
        torch.testing.assert_close(model.features(x), want)


def test_torchvision_wrong_backbone_lists_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError) as err:
        build_model({"backbone": "resnet50", "heads": 1,
                     "pretrained": {"format": "torchvision", "path": str(path)}})
    msg = str(err.value)
    assert str(path) in msg and "missing keys" in msg and "shape mismatches" in msg


def test_torch_files_are_loaded_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": Evil(marker)}}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict_file(path)
    assert not marker.exists()


# --- DAN checkpoints -------------------------------------------------------------------------
def _dan_checkpoint(model, path, drop_va=False):
    state = {k: v for k, v in model.state_dict().items()
             if not (drop_va and k.startswith(("va_fc.", "va_bn.")))}
    # as DAN's train script saves it
    torch.save({"iter": 3, "model_state_dict": state,
                "optimizer_state_dict": torch.optim.Adam(model.parameters()).state_dict()}, path)


def test_dan_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    src = DAN("resnet18", num_heads=4)
    src.train()
    with torch.no_grad():  # move BN statistics away from their defaults
        src(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8))
    src.eval()
    path = tmp_path / "dan.pth"
    _dan_checkpoint(src, path)
    torch.manual_seed(1)
    dst = build_model({"backbone": "resnet18", "heads": 4,
                       "pretrained": {"format": "dan", "path": str(path)}}).eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        a, b = src(x), dst(x)
    for name in ("expr", "va", "features", "heads"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def test_dan_released_checkpoint_with_7_classes(tmp_path, caplog):
    torch.manual_seed(0)
    rafdb = DAN("resnet18", num_heads=4, num_classes=7)  # DAN's RAF-DB model, no VA head
    path = tmp_path / "rafdb_epoch21_acc0.897_bacc0.8275.pth"
    _dan_checkpoint(rafdb, path, drop_va=True)
    dst = DAN("resnet18", num_heads=4)
    fc_before = dst.fc.weight.clone()
    with caplog.at_level(logging.WARNING, logger="ferflow.weights"):
        loaded = load_pretrained(dst, "dan", path)
    assert "fc (" in caplog.text or "fc, bn" in caplog.text
    assert str(path) in caplog.text
    assert not any(k.startswith(("fc.", "bn.", "va_")) for k in loaded)
    torch.testing.assert_close(dst.fc.weight, fc_before)
    torch.testing.assert_close(dst.cat_head3.sa.conv_1x3[0].weight, rafdb.cat_head3.sa.conv_1x3[0].weight)
    torch.testing.assert_close(dst.features[7][1].conv2.weight, rafdb.features[7][1].conv2.weight)


def test_dan_checkpoint_head_count_or_backbone_mismatch(tmp_path):
    path = tmp_path / "dan.pth"
    _dan_checkpoint(DAN("resnet18", num_heads=4), path, drop_va=True)
    with pytest.raises(ValueError) as err:
        load_pretrained(DAN("resnet18", num_heads=2), "dan", path)
    assert "unexpected keys" in str(err.value) and "cat_head3.sa.conv1x1.0.weight" in str(err.value)
    with pytest.raises(ValueError) as err:
        load_pretrained(DAN("resnet50", num_heads=4), "dan", path)
    msg = str(err.value)
    assert "missing keys" in msg and "reduce.0.weight" in msg and "shape mismatches" in msg
