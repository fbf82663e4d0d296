"""Batched RetinaFace against retinaface-pytorch's own ``Model.predict_jsons``, with shared random weights.

Needs retinaface-pytorch 0.0.8 (installed --no-deps) and albumentations (``predict_single`` imports
it); no network, no real weights: a seeded random-init state dict saved to a file stands in.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
import zipfile

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI on import otherwise

import cv2
import numpy as np
import pytest
import torch

from ferflow import retinaface as rf
from ferflow.detect import Detector
from ferflow.retinaface import RetinaFaceDetector, detection_shape, load_retinaface_weights

DETECT = 320
# With the seeded random init, softmax scores spread over (0, 1): at 0.75 some 300-550 boxes per
# image survive NMS, many of them partly outside the frame (unclipped coordinates).
MIN_SCORE = 0.75
NMS = 0.4
# (h, w): exact, upscaled, rounded (300x200 -> 320x213), portrait, downscaled
SIZES = [(240, 320), (120, 160), (200, 300), (320, 240), (480, 640)]
X_COLUMNS = [0, 2, 5, 7, 9, 11, 13]


def _frame(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random BGR image with a few filled ellipses."""
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(3):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(10, w // 4)), int(rng.integers(10, h // 3)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.ellipse(img, centre, axes, 0, 0, 360, colour, -1)
    return img


def _save_random_weights(path, shift_boxes: float = 0.0):
    torch.manual_seed(0)
    state = rf.build_retinaface().state_dict()
    if shift_boxes:
        # Move every box right and down by shift_boxes * 0.1 prior sizes, so that some end up
        # entirely right of / below the frame, the boxes predict_jsons drops after NMS.
        for i in range(3):
            bias = state[f"BboxHead.{i}.conv1x1.bias"].view(2, 4)  # (anchor, dx dy dw dh)
            bias[:, :2] += shift_boxes
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return _save_random_weights(tmp_path_factory.mktemp("retinaface") / "random.pth")


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    return [_frame(rng, h, w) for h, w in SIZES]


@pytest.fixture(scope="module")
def detector(weights):
    return RetinaFaceDetector(str(weights), detect_size=DETECT, min_score=MIN_SCORE, nms_threshold=NMS, batch_size=4)


@pytest.fixture(scope="module")
def batched(detector, frames):
    return detector(frames)  # mixed sizes in one call: grouped by detection size


def _reference(weights_path, frames, detect_size: int, min_score: float) -> list[np.ndarray]:
    """predict_jsons on each frame (RGB, as documented), unrounded, as (N, 15) arrays."""
    from retinaface import predict_single

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's notes on `pretrained=`
        model = predict_single.Model(max_size=detect_size, device="cpu")
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    model.eval()
    out = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(predict_single, "ROUNDING_DIGITS", 9)  # it rounds to 2 digits; compare the real values
        for frame in frames:
            found = model.predict_jsons(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), confidence_threshold=min_score,
                                        nms_threshold=NMS)
            rows = [a["bbox"] + [a["score"]] + [c for p in a["landmarks"] for c in p] for a in found if len(a["bbox"])]
            out.append(np.array(rows, np.float64).reshape(-1, 15))
    return out


def _match(expected: np.ndarray, got: np.ndarray) -> np.ndarray:
    """For each expected row, the got row closest to it; they must pair one to one.

    Rows are not compared in order: near-equal scores (common with random weights) may swap places.
    """
    assert got.shape == expected.shape
    if len(expected) == 0:
        return np.zeros(0, int)
    cost = np.abs(expected[:, None, :] - got[None, :, :].astype(np.float64)).max(-1)
    match = cost.argmin(1)
    assert len(np.unique(match)) == len(match), "rows do not pair one to one"
    return match


def _assert_equivalent(ours: np.ndarray, ref: np.ndarray, frame: np.ndarray, detect_size: int) -> None:
    H, W = frame.shape[:2]
    h, w = detection_shape(H, W, detect_size)
    ref = ref.copy()
    # predict_jsons scales x by H/h too; we scale x by W/w (they differ when rounding h or w changes
    # the aspect ratio, e.g. 300x200 -> 320x213). Everything else must agree.
    ref[:, X_COLUMNS] *= (W / w) / (H / h)
    got = ours[_match(ref, ours)].astype(np.float64)
    diff = np.abs(got - ref)
    if len(diff):
        assert diff[:, :4].max() < 0.1, f"boxes differ by {diff[:, :4].max():.4f} px"
        assert diff[:, 4].max() < 1e-3, f"scores differ by {diff[:, 4].max():.2e}"
        assert diff[:, 5:].max() < 0.1, f"landmarks differ by {diff[:, 5:].max():.4f} px"
    # and raw, without the x correction, still within a pixel for boxes inside the frame
    inside = (ref[:, 0] >= 0) & (ref[:, 2] <= W)
    raw = np.abs(got[inside, :4] - ref[inside, :4] * np.array([(H / h) / (W / w), 1, (H / h) / (W / w), 1]))
    assert raw.size == 0 or raw.max() < 1.0


def test_priors_match_package():
    from retinaface.prior_box import priorbox

    for shape in [(240, 320), (213, 320), (320, 240), (37, 50), (360, 640)]:
        expected = priorbox(min_sizes=[list(s) for s in rf.MIN_SIZES], steps=list(rf.STEPS), clip=False, image_size=shape)
        assert torch.equal(rf.priors(*shape), expected), shape


def test_detection_shape_matches_longest_max_size():
    import albumentations as A

    resize = A.LongestMaxSize(max_size=DETECT, p=1)
    for h, w in [(240, 320), (120, 160), (200, 300), (481, 641), (1080, 1454), (17, 900)]:
        assert resize(image=np.zeros((h, w, 3), np.uint8))["image"].shape[:2] == detection_shape(h, w, DETECT)


def test_url_is_the_package_release():
    from retinaface.pre_trained_models import models

    assert rf.RETINAFACE_URL == models["resnet50_2020-07-20"].url


def test_equivalent_to_predict_jsons(weights, frames, batched):
    reference = _reference(weights, frames, DETECT, MIN_SCORE)
    counts = [len(r) for r in reference]
    assert min(counts) > 0 and sum(counts) > 500, counts  # a non-trivial comparison
    for frame, ours, ref in zip(frames, batched, reference):
        assert len(ours) == len(ref)
        _assert_equivalent(ours, ref, frame, DETECT)
    # unclipped boxes are reported as such
    assert any((d[:, 0] < 0).any() for d in batched)


def test_drops_the_boxes_predict_jsons_drops(tmp_path, monkeypatch):
    path = _save_random_weights(tmp_path / "shifted.pth", shift_boxes=8.0)
    rng = np.random.default_rng(1)
    frames = [_frame(rng, 120, 160), _frame(rng, 90, 160)]
    kept_by_nms = []
    original = rf.batched_nms

    def counting_nms(*args, **kwargs):
        keep = original(*args, **kwargs)
        kept_by_nms.append(len(keep))
        return keep

    monkeypatch.setattr(rf, "batched_nms", counting_nms)
    ours = RetinaFaceDetector(str(path), detect_size=160, min_score=MIN_SCORE, batch_size=4)(frames)
    reference = _reference(path, frames, 160, MIN_SCORE)
    assert sum(kept_by_nms) > sum(len(d) for d in ours) > 0  # some boxes were dropped after NMS
    for frame, o, r in zip(frames, ours, reference):
        H, W = frame.shape[:2]
        assert ((o[:, 0] < W - 1) & (o[:, 1] < H - 1)).all()
        _assert_equivalent(o, r, frame, 160)


def test_batch_equals_one_at_a_time(weights, frames, batched):
    # `batched` ran frames 0, 1 and 4 (three original sizes, one detection size) as one batch.
    single = RetinaFaceDetector(str(weights), detect_size=DETECT, min_score=MIN_SCORE, nms_threshold=NMS, batch_size=1)
    for one, many in zip(single(frames), batched, strict=True):
        assert one.shape == many.shape
        diff = np.abs(one[_match(many.astype(np.float64), one)] - many)
        assert diff[:, :4].max() < 1e-2 and diff[:, 4].max() < 1e-4 and diff[:, 5:].max() < 1e-2


def test_auto_batch_size_is_one_on_cpu_and_batches_on_cuda(weights):
    from ferflow.retinaface import AUTO_BATCH, auto_batch_size

    # the rule measured by bench/extract.py: one frame per pass on a CPU; frames batched on a GPU
    assert auto_batch_size("cpu") == 1 and auto_batch_size(torch.device("cpu")) == 1
    assert auto_batch_size("cuda:1") == AUTO_BATCH["cuda"] > 1
    assert RetinaFaceDetector(str(weights), detect_size=DETECT, device="cpu").batch_size == 1
    assert RetinaFaceDetector(str(weights), detect_size=DETECT, device="cpu", batch_size="auto").batch_size == 1
    assert RetinaFaceDetector(str(weights), detect_size=DETECT, device="cpu", batch_size=8).batch_size == 8
    for bad in (0, "many"):
        with pytest.raises(ValueError, match="batch_size must be 'auto' or at least 1"):
            RetinaFaceDetector(str(weights), detect_size=DETECT, device="cpu", batch_size=bad)


def test_output_contract(weights, detector, frames, batched):
    as_protocol: Detector = detector  # noqa: F841 (static check)
    assert detector.name == "retinaface"
    for frame, d in zip(frames, batched):
        assert d.dtype == np.float32 and d.ndim == 2 and d.shape[1] == 15
        assert np.isfinite(d).all()
        assert (np.diff(d[:, 4]) <= 0).all()  # by descending score
        assert (d[:, 4] > MIN_SCORE).all() and (d[:, 2] > d[:, 0]).all() and (d[:, 3] > d[:, 1]).all()
    assert detector([]) == []
    nothing = RetinaFaceDetector(str(weights), detect_size=64, min_score=1.0)
    out = nothing([frames[1], frames[1][:, :, 0].copy()])  # a grey frame is accepted
    assert [d.shape for d in out] == [(0, 15), (0, 15)] and out[0].dtype == np.float32
    with pytest.raises(ValueError, match="uint8"):
        nothing([frames[1].astype(np.float32)])


def test_missing_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope" / "retinaface.pth"
    with pytest.raises(RuntimeError, match="not found") as err:
        RetinaFaceDetector(str(missing))
    assert str(missing) in str(err.value) and "extract.retinaface_weights" in str(err.value)
    assert rf.RETINAFACE_URL in str(err.value)


def test_unreachable_url_is_a_clear_quick_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    url = "http://127.0.0.1:9/ferflow-test-retinaface.pth"
    # load in a thread and wait for it to finish (an event), with a bound only against a hang
    import threading

    done, raised = threading.Event(), []

    def load():
        try:
            load_retinaface_weights(url)
        except RuntimeError as exc:
            raised.append(exc)
        finally:
            done.set()

    threading.Thread(target=load, daemon=True).start()
    assert done.wait(timeout=300), "loading from an unreachable URL did not give up"
    (err,) = raised
    assert "cannot download" in str(err) and url in str(err) and "extract.retinaface_weights" in str(err)


def test_local_weight_formats(tmp_path):
    t = torch.arange(6.0).view(2, 3)
    # the release zip: one .pth inside
    buf = io.BytesIO()
    torch.save({"a.weight": t}, buf)
    with zipfile.ZipFile(tmp_path / "release.zip", "w") as zf:
        zf.writestr("retinaface_resnet50.pth", buf.getvalue())
    assert torch.equal(load_retinaface_weights(str(tmp_path / "release.zip"))["a.weight"], t)
    # a training checkpoint: {"state_dict": ...} with a "model." prefix; "module." (DataParallel)
    torch.save({"state_dict": {"model.a.weight": t}, "epoch": 3}, tmp_path / "ckpt.pth")
    assert list(load_retinaface_weights(str(tmp_path / "ckpt.pth"))) == ["a.weight"]
    torch.save({"module.a.weight": t}, tmp_path / "dp.pth")
    assert list(load_retinaface_weights(tmp_path / "dp.pth")) == ["a.weight"]
    # no state dict / not loadable with weights_only / garbage
    torch.save([t], tmp_path / "list.pth")
    with pytest.raises(RuntimeError, match="no state dict"):
        load_retinaface_weights(str(tmp_path / "list.pth"))
    torch.save({"a": time.monotonic}, tmp_path / "code.pth")  # a function: refused by weights_only
    with pytest.raises(RuntimeError, match="cannot load"):
        load_retinaface_weights(str(tmp_path / "code.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot load"):
        load_retinaface_weights(str(tmp_path / "junk.pth"))


def test_weights_that_do_not_fit_are_a_clear_error(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match="do not fit RetinaFace"):
        RetinaFaceDetector(str(tmp_path / "other.pth"))


def test_extract_cli_with_retinaface(weights, tmp_path, monkeypatch):
    """``python -m ferflow.extract video`` end to end with RetinaFace (device auto: no GPU -> CPU)."""
    import polars as pl

    from ferflow import extract
    from ferflow.schemas import FACES_FULL, read_table

    monkeypatch.setenv("FERFLOW_NUM_GPUS", "0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    video = tmp_path / "v.avi"
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (160, 120))
    rng = np.random.default_rng(2)
    frame = _frame(rng, 120, 160)
    for i in range(12):
        vw.write(np.roll(frame, i, axis=1))
    vw.release()
    settings = {"detector": "retinaface", "retinaface_weights": str(weights), "detect_size": 64,
                "min_score": 0.6, "detect_every": 4, "detect_batch": 4, "align": True, "device": "auto"}
    assert extract.main(["video", "--video", str(video), "--person", "v", "--settings", json.dumps(settings),
                         "--out-tar", str(tmp_path / "v.tar"), "--out-table", str(tmp_path / "v.parquet")]) == 0
    t = read_table(tmp_path / "v.parquet", FACES_FULL)
    assert t.height == 12 and set(t["n_frames"]) == {12}
    found = t.filter(pl.col("member").is_not_null())
    assert found.height > 0 and found["nose_x"].is_not_null().all()  # RetinaFace gives landmarks
    described = json.loads(t["detector"][0])
    assert described["detector"]["name"] == "retinaface" and described["detector"]["weights"] == str(weights)
    assert described["detector"]["detect_size"] == 64
