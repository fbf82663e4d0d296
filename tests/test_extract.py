"""Face extraction: person choice, interpolation between detections, missing faces, alignment,
cropped_aligned frames, image crops.

The first tests use a scripted detector on a tiny video; the "real detector" tests run OpenCV's Haar
cascade on 320x240 videos of the demo's face photograph (``ferflow.demo.draw_face``) moving over a
plain background, with the drawn boxes as the truth.
"""

import hashlib
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest

from ferflow import extract, faces
from ferflow.extract import ExtractSettings
from ferflow.schemas import FACES, FACES_FULL, LABELS, MANIFEST, read_table

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


def main_landmarks(i):
    """Five points inside the main face, moving with it."""
    x0, y0, _, _ = main_face(i)
    return np.array([12, 20, 28, 20, 20, 30, 14, 40, 26, 40], np.float32) + np.tile([x0, y0], 5)


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
            rows = [np.r_[main_face(i), 0.9, main_landmarks(i)],
                    np.r_[[5, 90, 20, 105], 0.95, np.full(10, np.nan)],      # small background face, higher score
                    np.r_[[120, 40, 150, 75], 0.9, np.full(10, np.nan)]]     # right-hand person
            out.append(np.asarray(rows, np.float32))
        return out


@pytest.fixture
def video(tmp_path):
    return str(write_video(tmp_path / "clip.avi"))


def run(video, tmp_path, persons, **kw):
    det = FakeDetector()
    table = extract.extract_video(video, persons, ExtractSettings(detector="haar", detect_batch=8, **kw), det,
                                  str(tmp_path / "u.tar"), str(tmp_path / "u.parquet")).table()
    return table, det


def test_every_frame_detected_largest_face_and_missing_recorded(video, tmp_path):
    table, det = run(video, tmp_path, {"clip": ""}, detect_every=1)
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
    table, _ = run(video, tmp_path, {"clip_left": "left", "clip_right": "right"}, detect_every=1)
    left = table.filter((pl.col("video") == "clip_left") & (pl.col("status") == "detected"))
    right = table.filter((pl.col("video") == "clip_right") & (pl.col("status") == "detected"))
    assert (((left["x0"] + left["x1"]) / 2) < W / 2).all()
    assert (((right["x0"] + right["x1"]) / 2) >= W / 2).all()
    # left: the main face while it is in the left half (it crosses the middle at frame 20); the
    # small face that stays on the left overlaps its track in time and is never taken
    assert left["frame"].to_list() == [*range(10), *range(15, 20)]
    assert all(abs(x0 - main_face(i)[0]) < 1e-3 for i, x0 in left.select("frame", "x0").rows())
    # right: the right-hand person throughout; the main face entering its half does not steal it
    assert right["frame"].to_list() == [i for i in range(N) if not 10 <= i <= 14]
    assert (right["x0"] == 120).all()


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
        "expr_status": "usable", "va_status": None,
    }, schema=MANIFEST)
    table = extract.extract_images(manifest, "chunk000", ExtractSettings(), str(tmp_path / "c.tar"),
                                   str(tmp_path / "c.parquet")).table()
    assert table.sort("frame")["status"].to_list() == ["provided", "provided", "unreadable", "bad_box", "bad_box"]
    with tarfile.open(tmp_path / "c.tar") as tar:
        assert tar.getnames() == ["chunk000/000000.jpg", "chunk000/000001.jpg"]


def test_settings_reject_unknown_keys():
    with pytest.raises(ValueError, match="unknown extraction settings"):
        ExtractSettings.from_json('{"detektor": "haar"}')


def test_settings_keys_and_defaults_match_the_config_schema():
    import yaml

    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    props = schema["properties"]["extract"]["properties"]
    defaults = ExtractSettings()
    assert set(props) == set(ExtractSettings.__dataclass_fields__)
    assert {k: v.get("default") for k, v in props.items()} == {k: getattr(defaults, k) for k in props}
    with pytest.raises(ValueError, match="detect_every"):
        ExtractSettings.from_json('{"detect_every": 0}')


def test_detect_batch_is_auto_or_a_positive_integer_in_settings_and_schema():
    import jsonschema
    import yaml

    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    prop = schema["properties"]["extract"]["properties"]["detect_batch"]
    for good in ("auto", 1, 16):
        jsonschema.validate(good, prop)
        assert ExtractSettings.from_json(json.dumps({"detect_batch": good})).detect_batch == good
    for bad in (0, -3, "big", 2.5):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, prop)
    for bad in (0, -3, "big", True):
        with pytest.raises(ValueError, match="detect_batch must be 'auto' or an integer >= 1"):
            ExtractSettings.from_json(json.dumps({"detect_batch": bad}))


def test_table_has_landmarks_crop_kind_and_settings(video, tmp_path):
    table, _ = run(video, tmp_path, {"clip": ""}, detect_every=5, align=True)
    full = read_table(tmp_path / "u.parquet", FACES_FULL)
    assert full.columns == list(FACES_FULL)
    t = full.sort("frame")
    found = t.filter(pl.col("member").is_not_null())
    assert (found["crop"] == "aligned").all()  # the fake main face has landmarks
    # landmarks as detected, and linear (like the boxes) where interpolated
    for i, lx, ly in found.select("frame", "left_eye_x", "left_eye_y").rows():
        assert abs(lx - main_landmarks(i)[0]) < 1e-3 and abs(ly - main_landmarks(i)[1]) < 1e-3
    missing = t.filter(pl.col("status") == "missing")
    assert missing.height == 5 and missing["crop"].is_null().all() and missing["nose_x"].is_null().all()
    settings = json.loads(t["detector"][0])
    assert t["detector"].n_unique() == 1
    assert settings["detector"] == {"name": "fake"}
    assert settings["extract"]["detect_every"] == 5 and settings["extract"]["align"] is True


# ---- alignment ---------------------------------------------------------------------------------
def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, t = 0.3, 1.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ (scale * rot).T + t
    m, s = faces.similarity_transform(src, dst)
    assert abs(s - scale) < 1e-9 and np.allclose(m, np.hstack([scale * rot, t[:, None]]))
    assert faces.similarity_transform(np.zeros((5, 2)), dst) is None  # degenerate
    mirrored = src * [-1, 1]  # a reflection is not a similarity: best rotation instead, never flipped
    m, _ = faces.similarity_transform(mirrored, src)
    assert np.linalg.det(m[:, :2]) > 0


def test_align_face_puts_landmarks_on_the_template():
    size, margin = 112, 0.25
    template = faces.alignment_template(size, margin)
    # a face rotated by 20 degrees and scaled: its landmarks are the template mapped into the image
    angle, scale = np.deg2rad(20), 2.5
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (template - size / 2) @ (scale * rot).T + [200, 160]
    image = np.zeros((320, 400, 3), np.uint8)
    for k, (x, y) in enumerate(points):
        cv2.circle(image, (int(round(x)), int(round(y))), 6, (0, 50 * (k + 1), 255), -1)
    crop = faces.align_face(image, points.reshape(-1), margin, size)
    assert crop.shape == (size, size, 3)
    for k, (x, y) in enumerate(template):  # each dot lands on its template point, in order
        assert crop[int(round(y)), int(round(x)), 2] > 200
        assert abs(int(crop[int(round(y)), int(round(x)), 1]) - 50 * (k + 1)) < 30
    # margin 0: ArcFace's own 112 template
    assert np.allclose(faces.alignment_template(112, 0.0), faces.ARCFACE_112)
    assert faces.align_face(image, np.full(10, np.nan), margin, size) is None


def test_align_falls_back_to_the_square_crop_without_landmarks(video, tmp_path):
    table, _ = run(video, tmp_path, {"clip_right": "right"}, detect_every=1, align=True)
    found = table.filter(pl.col("member").is_not_null())
    assert found.height == N - 5 and (found["crop"] == "square").all()
    assert found["left_eye_x"].is_null().all()


# ---- Aff-Wild2 cropped_aligned -----------------------------------------------------------------
def test_cropped_aligned_frames_by_file_name(tmp_path):
    root = tmp_path / "cropped_aligned"
    left, right = root / "clip_left", root / "clip_right"
    left.mkdir(parents=True)
    right.mkdir()
    small = np.full((112, 112, 3), 90, np.uint8)
    exact = np.full((224, 224, 3), 150, np.uint8)
    for number in [1, 2, 3, 5, 8, 41, 42]:  # frame = number - 1; 41, 42 lie beyond the 40 frames
        cv2.imwrite(str(left / f"{number:05d}.jpg"), small)
    (left / "00004.jpg").write_bytes(b"not a jpeg")  # frame 3: unreadable
    (left / "notes.txt").write_text("x")
    cv2.imwrite(str(right / "00001.jpg"), exact)
    out_tar, out_table = tmp_path / "u.tar", tmp_path / "u.parquet"
    video = write_video(tmp_path / "clip.avi")
    assert extract.main(["cropped", "--root", str(root), "--person", "clip_left=left", "--person", "clip_right=right",
                         "--video", str(video), "--settings", '{"crop_size": 224}',
                         "--out-tar", str(out_tar), "--out-table", str(out_table)]) == 0
    t = read_table(out_table, FACES_FULL)
    assert t.height == 2 * N and set(t["n_frames"]) == {N}  # frames counted by decoding the video
    lt = t.filter(pl.col("video") == "clip_left").sort("frame")
    status = dict(zip(lt["frame"], lt["status"]))
    assert [f for f, s in status.items() if s == "provided"] == [0, 1, 2, 4, 7]
    assert status[3] == "unreadable" and status[5] == "missing" and status[39] == "missing"
    assert set(lt.filter(pl.col("status") == "provided")["crop"]) == {"cropped_aligned"}
    assert lt["x0"].is_null().all()
    assert json.loads(lt["detector"][0])["detector"]["name"] == "cropped_aligned"
    with tarfile.open(out_tar) as tar:
        assert tar.getnames() == [f"clip_left/{i:06d}.jpg" for i in (0, 1, 2, 4, 7)] + ["clip_right/000000.jpg"]
        img = cv2.imdecode(np.frombuffer(tar.extractfile("clip_left/000000.jpg").read(), np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (224, 224, 3)
        # a JPEG already at crop_size is stored as it is, not re-encoded
        assert tar.extractfile("clip_right/000000.jpg").read() == (right / "00001.jpg").read_bytes()
    # the frame count may be given instead of the video; a folder that does not exist: all missing
    assert extract.main(["cropped", "--dir", f"other={tmp_path / 'nope'}", "--person", "other", "--n-frames", "3",
                         "--out-tar", str(out_tar), "--out-table", str(out_table)]) == 0
    assert read_table(out_table, FACES)["status"].to_list() == ["missing"] * 3


# ---- with a real detector: Haar on a moving photograph ---------------------------------------------
FW, FH = 320, 240


class CachedHaar:
    """OpenCV's Haar cascade, each distinct frame detected once per test session; counts requests."""

    name = "haar"

    def __init__(self):
        from ferflow.detect import HaarDetector

        self.haar = HaarDetector()
        self.cache = {}
        self.requests = 0

    def settings(self):
        return self.haar.settings()

    def __call__(self, frames):
        out = []
        for f in frames:
            key = hashlib.blake2b(f.tobytes(), digest_size=16).digest()
            if key not in self.cache:
                self.cache[key] = self.haar([f])[0]
            out.append(self.cache[key])
        self.requests += len(frames)
        return out


@pytest.fixture(scope="module")
def haar():
    return CachedHaar()


def _smooth(t, n):
    return 0.5 - 0.5 * np.cos(np.pi * t / (n - 1))


def face_video(path, n, faces_at, seed=0):
    """A 320x240 MJPG video of the demo face: ``faces_at(t)`` -> [(look, (cx, cy, side)), ...];
    returns the drawn boxes per frame."""
    from ferflow.demo import draw_face

    rng = np.random.default_rng(seed)
    bg = cv2.resize(rng.uniform(60, 200, (3, 4, 3)).astype(np.float32), (FW, FH), interpolation=cv2.INTER_CUBIC)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (FW, FH))
    truth = []
    for t in range(n):
        canvas = bg.copy()
        truth.append([np.array(draw_face(canvas, look, *where)) for look, where in faces_at(t)])
        vw.write(np.clip(canvas, 0, 255).astype(np.uint8))
    vw.release()
    return truth


def _look(mirror=False, tint=(1.0, 1.0, 1.0)):
    from ferflow.demo import Look

    return Look(tint, 1.0, mirror, 1.0)


def extract_haar(path, tmp_path, haar, persons, **kw):
    settings = ExtractSettings(detector="haar", **kw)
    tag = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
    return extract.extract_video(str(path), persons, settings, haar, str(tmp_path / f"{tag}.tar"),
                                 str(tmp_path / f"{tag}.parquet")).table().sort("video", "frame")


def boxes_of(table, video):
    t = table.filter(pl.col("video") == video)
    return {f: np.array(b) for f, *b in t.select("frame", "x0", "y0", "x1", "y1").rows() if b[0] is not None}


def test_interpolated_boxes_match_per_frame_detection(tmp_path, haar):
    n = 75  # the face slides 120 px right and grows from 112 to 136 px, bobbing up and down
    look = _look()
    path = tmp_path / "moving.avi"
    face_video(path, n, lambda t: [(look, (100 + 120 * _smooth(t, n), 120 + 10 * np.sin(t / 12), 112 + 24 * _smooth(t, n)))])
    every = extract_haar(path, tmp_path, haar, {"moving": ""}, detect_every=1)
    before = haar.requests
    sparse = extract_haar(path, tmp_path, haar, {"moving": ""}, detect_every=5)
    detected = haar.requests - before
    assert (every["status"] == "detected").all()  # Haar finds the face on every frame
    counts = dict(sparse.group_by("status").len().iter_rows())
    assert counts.get("interpolated", 0) >= 0.6 * n and "missing" not in counts and detected < 0.4 * n
    ref, got = boxes_of(every, "moving"), boxes_of(sparse, "moving")
    ious = np.array([faces.iou(got[f][None], ref[f])[0] for f in range(n)])
    interp = sparse.filter(pl.col("status") == "interpolated")["frame"].to_numpy()
    print(f"\ndetect_every=5: {detected}/{n} frames detected; mean IoU vs per-frame detection "
          f"{ious.mean():.3f} (interpolated frames {ious[interp].mean():.3f}, min {ious.min():.3f})")
    assert ious.mean() >= 0.9 and ious[interp].mean() >= 0.9


def test_two_people_stay_on_their_side_with_a_real_detector(tmp_path, haar):
    n = 60
    a, b = _look(), _look(mirror=True, tint=(0.9, 1.05, 1.1))
    path = tmp_path / "two.avi"
    truth = face_video(path, n, lambda t: [(a, (85 + 6 * np.sin(t / 10), 122, 108)), (b, (235 - 6 * np.sin(t / 13), 118, 104))])
    table = extract_haar(path, tmp_path, haar, {"two_left": "left", "two_right": "right"}, detect_every=5)
    for video, k in (("two_left", 0), ("two_right", 1)):
        boxes = boxes_of(table, video)
        assert sorted(boxes) == list(range(n)), f"{video}: frames without a face"
        for f, box in boxes.items():
            assert faces.iou(box[None], truth[f][k])[0] > 0.5, (video, f)
            assert ((box[0] + box[2]) / 2 < FW / 2) == (k == 0)


def test_missing_face_recorded_with_a_real_detector(tmp_path, haar):
    n, gone = 60, range(30, 42)  # the face leaves the picture for 12 frames
    look = _look()
    path = tmp_path / "gone.avi"
    face_video(path, n, lambda t: [] if t in gone else [(look, (120 + 60 * _smooth(t, n), 120, 120))])
    for k in (1, 5):
        table = extract_haar(path, tmp_path, haar, {"gone": ""}, detect_every=k)
        assert table["frame"].to_list() == list(range(n)) and set(table["n_frames"]) == {n}
        status = table["status"].to_list()
        assert [f for f, s in enumerate(status) if s == "missing"] == list(gone), k
        assert table.filter(pl.col("status") == "missing")["member"].is_null().all()


def test_background_face_never_steals_the_track(tmp_path, haar):
    n, hidden = 60, {20, 21, 25}  # the main face is hidden on these frames; the small one stays
    main, small = _look(), _look(mirror=True, tint=(1.1, 0.95, 0.9))
    path = tmp_path / "background.avi"
    truth = face_video(path, n, lambda t: ([] if t in hidden else [(main, (150 + 30 * np.sin(t / 20), 125, 125))])
                       + [(small, (275, 45, 60))])
    for k in (1, 5):
        table = extract_haar(path, tmp_path, haar, {"background": ""}, detect_every=k)
        boxes = boxes_of(table, "background")
        assert set(boxes) == set(range(n)) - hidden, k
        for f, box in boxes.items():
            assert faces.iou(box[None], truth[f][0])[0] > 0.5, (k, f)


def test_a_jump_is_detected_again_not_interpolated(tmp_path, haar):
    n, jump = 60, 37  # the face slides right, then jumps 130 px to the right at frame 37
    look = _look()
    path = tmp_path / "jump.avi"
    truth = face_video(path, n, lambda t: [(look, (80 + 0.5 * t + (130 if t >= jump else 0), 120, 118))])
    table = extract_haar(path, tmp_path, haar, {"jump": ""}, detect_every=5)
    boxes = boxes_of(table, "jump")
    assert sorted(boxes) == list(range(n))
    for f, box in boxes.items():
        assert faces.iou(box[None], truth[f][0])[0] > 0.5, f
    status = dict(zip(table["frame"], table["status"]))
    assert all(status[f] == "detected" for f in range(36, 40))  # around the jump: every frame detected
    assert sum(s == "interpolated" for s in status.values()) >= 0.6 * n


def _row(x0, y0, side, score=0.9):
    return np.r_[[x0, y0, x0 + side, y0 + side], score, np.full(10, np.nan)].astype(np.float32)


def test_choose_track_prefers_missing_frames_to_another_person():
    # the main face (side 100) is away for 60 frames (longer than the link gap) in the middle; a
    # small face (side 30) is there all along; a one-frame false detection appears while it is away
    dets = {}
    for f in range(0, 200, 5):
        rows = [_row(300, 40, 30)]
        if not 60 <= f < 120:
            rows.append(_row(100 + f * 0.2, 100, 100))
        if f == 90:
            rows.append(_row(500, 300, 120))
        dets[f] = np.stack(rows)
    chosen = faces.choose_track(dets, "", 640, max_gap=30)
    assert sorted(chosen) == [f for f in range(0, 200, 5) if not 60 <= f < 120]
    assert all(row[2] - row[0] == 100 for row, _ in chosen.values())
    assert len({track for _, track in chosen.values()}) == 2  # two tracks of the main face, nothing between


def test_choose_track_takes_the_larger_face_that_starts_a_little_later():
    dets = {f: np.stack([_row(300, 40, 30)] + ([_row(100, 100, 100)] if f >= 3 else [])) for f in range(100)}
    chosen = faces.choose_track(dets, "", 640, max_gap=30)
    assert sorted(chosen) == list(range(3, 100))  # frames 0-2: no box rather than the small face


# ---- a frame that does not decode (issue 12, item 4) ------------------------------------------------
class EveryFrameFace:
    """The main face of :func:`main_face` on every frame; records the frames it was given."""

    name = "fake"

    def __init__(self):
        self.calls = []

    def __call__(self, frames):
        self.calls += [frame_index(f) for f in frames]
        return [np.r_[main_face(frame_index(f)), 0.9, main_landmarks(frame_index(f))][None].astype(np.float32)
                for f in frames]


def broken_video(tmp_path, n=20, broken=(10,)):
    """An MJPG AVI of ``n`` frames carrying their index, with 400 bytes zeroed inside each ``broken`` frame."""
    from bad_inputs import break_avi_frame

    path = tmp_path / "broken.avi"
    rng = np.random.default_rng(0)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (W, H))
    for i in range(n):  # textured, as real frames are (a flat one compresses to fewer than 400 bytes)
        img = rng.integers(60, 200, (H, W, 3), dtype=np.uint8)
        img[:16, :16] = 5 * i
        vw.write(img)
    vw.release()
    for f in broken:
        break_avi_frame(path, f)
    return path


def test_read_frames_goes_on_past_an_undecodable_frame(tmp_path):
    path = broken_video(tmp_path)
    cap = cv2.VideoCapture(str(path))  # the fault as OpenCV shows it: read() fails once, at frame 10
    reads = [cap.read()[0] for _ in range(21)]
    cap.release()
    assert reads == [True] * 10 + [False] + [True] * 9 + [False]
    decoding = extract.Decoding()
    got = [(i, frame_index(f)) for i, f in extract.read_frames(str(path), decoding=decoding)]
    assert got == [(i, i) for i in range(20) if i != 10]  # every later frame keeps its own index
    assert (decoding.container, decoding.decoded, decoding.failed, decoding.gave_up) == (20, 19, [10], None)
    assert decoding.n_frames == 20 and extract.count_frames(str(path)) == 20
    # only some frames wanted: the broken one is skipped by grab() too
    assert [i for i, _ in extract.read_frames(str(path), {9, 10, 11, 15})] == [9, 11, 15]


def test_undecodable_frame_is_its_own_row_and_later_frames_keep_theirs(tmp_path, capsys):
    path = broken_video(tmp_path)
    det = EveryFrameFace()
    table = extract.extract_video(str(path), {"broken": ""}, ExtractSettings(detector="haar", detect_every=5),
                                  det, str(tmp_path / "u.tar"), str(tmp_path / "u.parquet")).table()
    assert 10 not in det.calls
    t = table.sort("frame")
    assert t["frame"].to_list() == list(range(20)) and set(t["n_frames"]) == {20}
    status = dict(zip(t["frame"], t["status"]))
    assert status[10] == "undecodable" and t.filter(pl.col("frame") == 10)["member"].to_list() == [None]
    assert all(status[f] in ("detected", "interpolated") for f in range(20) if f != 10)
    with tarfile.open(tmp_path / "u.tar") as tar:
        assert tar.getnames() == [f"broken/{i:06d}.jpg" for i in range(20) if i != 10]
    assert "1 of 20 frames did not decode (frames 10)" in capsys.readouterr().err


def test_long_run_of_undecodable_frames_gives_up_loudly(tmp_path, monkeypatch, capsys):
    path = broken_video(tmp_path, broken=range(8, 14))
    monkeypatch.setattr(extract, "MAX_FAILED_RUN", 4)  # 6 broken frames in a row: a long run here
    decoding = extract.Decoding()
    assert [i for i, _ in extract.read_frames(str(path), decoding=decoding)] == list(range(8))
    assert (decoding.failed, decoding.gave_up, decoding.n_frames) == ([8, 9, 10, 11], 12, 20)
    table = extract.extract_video(str(path), {"broken": ""}, ExtractSettings(detector="haar", detect_every=1),
                                  EveryFrameFace(), str(tmp_path / "u.tar"), str(tmp_path / "u.parquet")).table()
    status = dict(zip(table["frame"], table["status"]))
    assert sorted(status) == list(range(20))
    assert [f for f, s in sorted(status.items()) if s == "undecodable"] == list(range(8, 20))
    err = capsys.readouterr().err
    assert "WARNING" in err and "decoding given up at frame 12" in err and "frames 8..19" in err


def test_undecodable_frame_in_the_accounting(tmp_path):
    """Native Aff-Wild2 layout, a 20-frame video whose frame 10 does not decode: 19 frames written
    with their own labels, frame 10 dropped as unreadable_frame, nothing beyond the video's end."""
    from bad_inputs import EXPR_DIR, VA_DIR, annotation, break_avi_frame
    from test_accounting import run_pipeline

    root = tmp_path / "aw"
    levels = [120 + 5 * i for i in range(20)]  # bright (a face for the test detector), each frame its own level
    video = root / "videos" / "v.avi"
    video.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 48))
    for v in levels:  # textured around the frame's level: a flat frame is fewer than 400 bytes of MJPG
        vw.write(np.clip(v + rng.integers(-20, 21, (48, 64, 3)), 0, 255).astype(np.uint8))
    vw.release()
    break_avi_frame(video, 10)
    expr = [str(i % 7) for i in range(20)]
    annotation(root / EXPR_DIR / "Train_Set" / "v.txt", expr)
    annotation(root / VA_DIR / "Train_Set" / "v.txt", [f"{i / 20:.2f},{-i / 40:.3f}" for i in range(20)])
    rows = run_pipeline([{"name": "aw", "kind": "affwild2", "root": str(root)}], tmp_path / "out")
    fates = dict(rows.group_by(pl.coalesce("reason", "status")).len().iter_rows())
    assert fates == {"written": 19, "unreadable_frame": 1}
    assert rows.filter(pl.col("reason") == "unreadable_frame")["frame"].to_list() == [10]
    labels = read_table(tmp_path / "out" / "shards" / "labels.parquet", LABELS).sort("frame")
    assert labels["frame"].to_list() == [i for i in range(20) if i != 10]
    assert labels["expression"].to_list() == [int(expr[i]) for i in range(20) if i != 10]
    assert np.allclose(labels["arousal"].to_numpy(), [-i / 40 for i in range(20) if i != 10], atol=1e-6)
    # each written sample is the picture of its own frame (brightness 120 + 5 i)
    for key, frame in labels.select("key", "frame").rows():
        crop = _shard_image(tmp_path / "out" / "shards", key)
        centre = crop[8:24, 8:24].mean()  # the crop's border may lie outside the picture (black)
        assert abs(centre - levels[frame]) < 2.5, (key, centre)


def _shard_image(shard_dir, key):
    for shard in sorted(Path(shard_dir).glob("*/shard-*.tar")):
        with tarfile.open(shard) as tar:
            if f"{key}.jpg" in tar.getnames():
                data = tar.extractfile(f"{key}.jpg").read()
                return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    raise KeyError(key)


# ---- short on-screen faces (issue 12, item 7) --------------------------------------------------------
@pytest.mark.parametrize("shown", [range(20, 26), range(22, 28)])
def test_a_face_on_screen_for_six_frames_is_kept(tmp_path, haar, shown):
    """A face on screen for 6 frames of 40 (seen at keyframes 20 and 25, or only at 25, with
    detect_every 5) is cropped on exactly those frames; a face shown for one frame is not."""
    n, flash = 40, 10  # the flash on a keyframe: detected, then its neighbours, where it is not
    look = _look()
    path = tmp_path / "short.avi"
    # the flash elsewhere in the picture: at the same place it would be the same face coming back
    truth = face_video(path, n, lambda t: [(look, (180, 120, 120))] if t in shown else
                       [(look, (70, 120, 100))] if t == flash else [])
    table = extract_haar(path, tmp_path, haar, {"short": ""}, detect_every=5)
    boxes = boxes_of(table, "short")
    assert sorted(boxes) == list(shown)
    for f, box in boxes.items():
        assert faces.iou(box[None], truth[f][0])[0] > 0.5, f
    assert table.height == n and table.filter(pl.col("status") == "missing").height == n - 6
    # the length is a setting, in frames or in seconds at the video's 30 fps
    assert sorted(boxes_of(extract_haar(path, tmp_path, haar, {"short": ""}, detect_every=5, min_track_frames=6),
                           "short")) == list(shown)
    assert not boxes_of(extract_haar(path, tmp_path, haar, {"short": ""}, detect_every=5, min_track_frames=7), "short")
    assert sorted(boxes_of(extract_haar(path, tmp_path, haar, {"short": ""}, detect_every=5, min_track_seconds=0.2),
                           "short")) == list(shown)
    assert not boxes_of(extract_haar(path, tmp_path, haar, {"short": ""}, detect_every=5, min_track_seconds=0.25),
                        "short")


def test_min_track_frames_from_seconds():
    assert extract.min_track_frames(ExtractSettings(), 30.0) == 3
    assert extract.min_track_frames(ExtractSettings(min_track_frames=6), 0.0) == 6
    assert extract.min_track_frames(ExtractSettings(min_track_seconds=0.5), 25.0) == 12  # 12.5 -> 12 (round half even)
    assert extract.min_track_frames(ExtractSettings(min_track_seconds=0.01), 30.0) == 1
    with pytest.raises(ValueError, match="frame rate"):
        extract.min_track_frames(ExtractSettings(min_track_seconds=0.5), 0.0)
    with pytest.raises(ValueError, match="min_track_frames"):
        ExtractSettings.from_json('{"min_track_frames": 0}')
    with pytest.raises(ValueError, match="min_track_seconds"):
        ExtractSettings.from_json('{"min_track_seconds": -1}')


def test_unsettled_frames_lie_between_a_short_track_and_its_neighbours():
    # detections every 5 frames; a face at keyframe 25 only (one frame long so far); a long track throughout
    dets = {f: np.stack([_row(300, 40, 30)] + ([_row(100, 100, 100)] if f == 25 else [])) for f in range(0, 41, 5)}
    assert faces.unsettled_frames(dets, "", 640, 30, min_frames=3) == {21, 22, 23, 24, 26, 27, 28, 29}
    assert faces.unsettled_frames(dets, "", 640, 30, min_frames=1) == set()
    assert sorted(faces.choose_track(dets, "", 640, 30, min_frames=3)) == list(range(0, 41, 5))  # the long one
    # once its neighbours are looked at (face on 23..27), it is 5 frames long and settled
    for f in range(21, 30):
        if f % 5:
            dets[f] = np.stack([_row(300, 40, 30)] + ([_row(100, 100, 100)] if 23 <= f <= 27 else []))
    assert faces.unsettled_frames(dets, "", 640, 30, min_frames=3) == set()
    tracks = faces.person_tracks(dets, "", 640, 30)
    assert sorted((t.first, t.last) for t in tracks) == [(0, 40), (23, 27)]


# ---- memory that does not grow with the video's length ----------------------------------------------
def _face_row(x0, side=20.0):
    return np.r_[[x0, 10.0, x0 + side, 10.0 + side], 0.9, np.full(10, np.nan)].astype(np.float32)


def test_box_plan_interpolates_same_track_and_leaves_the_rest_to_detect_again():
    # detected frames 0, 4, 8, 12, 16; the person's box: track 0 on 0 and 4, track 1 on 8 and 16, none on 12
    chosen = {0: (_face_row(0.0), 0), 4: (_face_row(4.0), 0), 8: (_face_row(80.0), 1), 16: (_face_row(96.0), 1)}
    plan, redetect = extract.plan_boxes([0, 4, 8, 12, 16], chosen, max_jump_iou=0.3)
    assert redetect == {5, 6, 7, 9, 10, 11, 13, 14, 15}  # another track; no box on one side
    expected = {0: ("detected", 0.0), 1: ("interpolated", 1.0), 2: ("interpolated", 2.0),
                3: ("interpolated", 3.0), 4: ("detected", 4.0), 8: ("detected", 80.0), 16: ("detected", 96.0)}
    for i in range(-2, 20):
        status, row = plan.at(i)
        if i in expected:
            assert (status, float(row[0])) == expected[i], i
            assert float(row[2] - row[0]) == 20.0 and np.isnan(row[5:]).all()
        else:
            assert (status, row) == ("missing", None), i
    assert [(f, s, float(r[0])) for f, (s, r) in plan.items()] == [(f, *expected[f]) for f in sorted(expected)]


class StillFace:
    """One face at the same place on every frame (a cheap detector: no image is looked at)."""

    name = "still"

    def __call__(self, frames):
        return [_face_row(12.0, 32.0)[None] for _ in frames]


def _peak_bytes(path, tmp_path):
    """tracemalloc's peak of the Python allocations of one extract_video call (bytes above the start)."""
    import tracemalloc

    settings = ExtractSettings(detector="haar", detect_every=10, crop_size=32)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        done = extract.extract_video(str(path), {"v": ""}, settings, StillFace(), str(tmp_path / "v.tar"),
                                     str(tmp_path / "v.parquet"))
        return tracemalloc.get_traced_memory()[1] - start, done
    finally:
        tracemalloc.stop()


def test_extraction_memory_does_not_grow_with_the_video_length(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.setattr(extract, "ROW_GROUP_ROWS", 64)
    n = 300
    paths = {}
    for frames in (50, n, 4 * n):
        paths[frames] = tmp_path / f"v{frames}.avi"
        vw = cv2.VideoWriter(str(paths[frames]), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 48))
        for _ in range(frames):
            vw.write(np.full((48, 64, 3), 128, np.uint8))
        vw.release()
    _peak_bytes(paths[50], tmp_path)  # first call: lazy imports and caches, not measured
    peak = {}
    for frames in (n, 4 * n):
        peak[frames], done = _peak_bytes(paths[frames], tmp_path)
        # the table on disk has every frame, in row groups of 64 rows: it was written as the video was read
        t = read_table(done.path, FACES_FULL)
        assert t["frame"].to_list() == list(range(frames))
        assert t["status"].to_list() == ["detected" if i % 10 == 0 or i == frames - 1 else "interpolated"
                                         for i in range(frames)]
        assert done.rows == frames and done.counts == dict(t.group_by("status").len().iter_rows())
        assert pq.ParquetFile(done.path).num_row_groups == -(-frames // 64)
    # the rows, the per-frame box plan and the tar's member list kept about 1 kB per frame (950 bytes
    # measured before they were made bounded); what is left grows per detection (every 10th frame)
    per_frame = (peak[4 * n] - peak[n]) / (3 * n)
    print(f"\nPython peak {peak[n] / 1e3:.0f} kB at {n} frames, {peak[4 * n] / 1e3:.0f} kB at {4 * n}: "
          f"{per_frame:.0f} bytes per added frame")
    assert per_frame < 200
