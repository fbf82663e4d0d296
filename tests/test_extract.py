"""Face extraction: person choice, interpolation between detections, missing faces, image crops."""

import tarfile

import cv2
import numpy as np
import polars as pl
import pytest

from ferflow import extract
from ferflow.extract import ExtractSettings
from ferflow.schemas import FACES, MANIFEST, read_table

W, H, N = 160, 120, 40


def frame_index(frame):
    """Frames carry their index in a flat 16x16 block (robust to MJPG compression)."""
    return int(round(frame[:16, :16].mean() / 5))


def write_video(path, n=N):
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (W, H))
    for i in range(n):
        img = np.full((H, W, 3), 128, np.uint8)
        img[:16, :16] = 5 * i
        vw.write(img)
    vw.release()
    return path


def main_face(i):
    x = 40 + i  # moves 1 px per frame
    return np.array([x, 30, x + 40, 80], np.float32)


class FakeDetector:
    """Main face moving right; a small background face; no face on frames 10-14; a right face."""

    name = "fake"

    def __init__(self):
        self.calls = []

    def __call__(self, frames):
        out = []
        for f in frames:
            i = frame_index(f)
            self.calls.append(i)
            if 10 <= i <= 14:
                out.append(np.zeros((0, 15), np.float32))
                continue
            rows = [np.r_[main_face(i), 0.9, np.full(10, np.nan)],
                    np.r_[[5, 90, 20, 105], 0.95, np.full(10, np.nan)],      # small background face, higher score
                    np.r_[[120, 40, 150, 75], 0.9, np.full(10, np.nan)]]     # right-hand person
            out.append(np.asarray(rows, np.float32))
        return out


@pytest.fixture
def video(tmp_path):
    return str(write_video(tmp_path / "clip.avi"))


def run(video, tmp_path, persons, **kw):
    det = FakeDetector()
    table = extract.extract_video(video, persons, ExtractSettings(detector="haar", batch_size=8, **kw), det,
                                  str(tmp_path / "u.tar"), str(tmp_path / "u.parquet"))
    return table, det


def test_every_frame_detected_largest_face_and_missing_recorded(video, tmp_path):
    table, det = run(video, tmp_path, {"clip": ""})
    assert sorted(det.calls) == list(range(N))
    assert table.height == N and set(table["n_frames"]) == {N}
    t = table.sort("frame")
    status = t["status"].to_list()
    assert status[10:15] == ["missing"] * 5 and status.count("detected") == N - 5
    # the largest face is chosen (not the higher-scored background face), and kept along the track
    got = t.filter(pl.col("status") == "detected").select("frame", "x0").rows()
    assert all(abs(x0 - main_face(i)[0]) < 1e-3 for i, x0 in got)
    # every detected frame has its crop in the tar, 224x224, and the table reads back checked
    assert read_table(tmp_path / "u.parquet", FACES).height == N
    with tarfile.open(tmp_path / "u.tar") as tar:
        names = tar.getnames()
        assert names == [f"clip/{i:06d}.jpg" for i in range(N) if not 10 <= i <= 14]
        img = cv2.imdecode(np.frombuffer(tar.extractfile(names[0]).read(), np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (224, 224, 3)


def test_detect_every_k_interpolates_and_redetects_lost_tracks(video, tmp_path):
    table, det = run(video, tmp_path, {"clip": ""}, detect_every=5)
    t = table.sort("frame")
    # keyframes 0,5,...,35 and the last; frames around the 10-14 gap are detected again
    assert set(range(0, N, 5)) | {N - 1} <= set(det.calls)
    assert len(set(det.calls)) < N
    interp = t.filter(pl.col("status") == "interpolated")
    assert interp.height > 20
    # linear motion: interpolated boxes lie on the true path
    assert all(abs(x0 - main_face(i)[0]) < 1e-3 for i, x0 in interp.select("frame", "x0").rows())
    assert t.filter(pl.col("frame").is_between(10, 14))["status"].to_list() == ["missing"] * 5


def test_two_people_stay_on_their_side(video, tmp_path):
    table, _ = run(video, tmp_path, {"clip_left": "left", "clip_right": "right"})
    left = table.filter((pl.col("video") == "clip_left") & (pl.col("status") == "detected"))
    right = table.filter((pl.col("video") == "clip_right") & (pl.col("status") == "detected"))
    assert left.height == right.height == N - 5
    assert (((left["x0"] + left["x1"]) / 2) < W / 2).all()
    assert (((right["x0"] + right["x1"]) / 2) >= W / 2).all()


def test_unreadable_video_gives_empty_table(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video")
    table, _ = run(str(bad), tmp_path, {"bad": ""})
    assert table.height == 0


def test_image_chunk_crops_given_boxes_and_counts_bad_ones(tmp_path):
    img = np.full((100, 120, 3), 200, np.uint8)
    good, gray = tmp_path / "good.jpg", tmp_path / "gray é.png"
    cv2.imwrite(str(good), img)
    cv2.imwrite(str(gray), img[:, :, 0])
    (tmp_path / "empty.jpg").write_bytes(b"")
    rows = [  # path, box
        (str(good), (10, 10, 60, 70)),
        (str(gray), (0, 0, 50, 50)),
        (str(tmp_path / "empty.jpg"), (0, 0, 50, 50)),
        (str(good), (500, 500, 600, 600)),   # outside the image
        (str(good), (10, 10, 10, 40)),       # zero area
    ]
    manifest = pl.DataFrame({
        "source": "s", "split": "train", "unit": "chunk000", "video": "chunk000",
        "frame": list(range(len(rows))), "person": "", "path": [r[0] for r in rows],
        "expression": [1] * len(rows), "valence": None, "arousal": None,
        "box_x0": [r[1][0] for r in rows], "box_y0": [r[1][1] for r in rows],
        "box_x1": [r[1][2] for r in rows], "box_y1": [r[1][3] for r in rows], "drop": None,
    }, schema=MANIFEST)
    table = extract.extract_images(manifest, "chunk000", ExtractSettings(), str(tmp_path / "c.tar"), str(tmp_path / "c.parquet"))
    assert table.sort("frame")["status"].to_list() == ["provided", "provided", "unreadable", "bad_box", "bad_box"]
    with tarfile.open(tmp_path / "c.tar") as tar:
        assert tar.getnames() == ["chunk000/000000.jpg", "chunk000/000001.jpg"]


def test_settings_reject_unknown_keys():
    with pytest.raises(ValueError, match="unknown extraction settings"):
        ExtractSettings.from_json('{"detektor": "haar"}')
