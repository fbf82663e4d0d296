"""ferflow annotate: every face tracked, every frame a row, soft vote and smoothing per track, outputs
read back; the ferflow console script."""

from __future__ import annotations

import importlib.metadata
import itertools
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest

from ferflow import annotate, cli, demo, schemas
from ferflow.extract import count_frames
from ferflow.labels import EXPRESSIONS
from test_predict import make_model_file

HAAR = '{"detector": "haar"}'
TWO_FACES_FRAMES = 20


def write_two_faces(path: Path, n_frames: int = TWO_FACES_FRAMES) -> demo.VideoUnit:
    """The demo's two-person video (two faces moving on their side of the frame), first frames."""
    p = demo.plan("tiny")
    unit = p.unit("t01-30-480x270")
    frames = itertools.islice(demo.render_video(unit, demo.tracks(p, 0), 0), n_frames)
    assert demo.write_video(path, frames, unit.width, unit.height) == n_frames
    return unit


def write_no_face(path: Path, n_frames: int = 12) -> None:
    """A smooth moving colour field, no face (the demo's background)."""
    rng = np.random.default_rng(0)
    bg = demo._background(rng, 320, 240)
    frames = (np.clip(bg * (1 + 0.05 * np.sin(t)), 0, 255).astype(np.uint8) for t in range(n_frames))
    assert demo.write_video(path, frames, 320, 240) == n_frames


def write_models(root: Path) -> Path:
    """Two untrained variants (heads 2 and 1, 32 px) as ferflow.train writes them."""
    make_model_file(root / "a", heads=2)
    make_model_file(root / "b", heads=1)
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("annotate")
    write_two_faces(root / "videos" / "two.mp4")
    write_no_face(root / "videos" / "empty.avi")
    (root / "videos" / "notes.txt").write_text("not a video, and not listed: no video extension")
    (root / "broken.mp4").write_bytes(b"this is not a video file\n" * 10)
    write_models(root / "models")
    return root


@pytest.fixture(scope="module")
def annotated(inputs, tmp_path_factory) -> Path:
    """`ferflow annotate` on the folder, with the annotated videos."""
    out = tmp_path_factory.mktemp("annotated")
    rc = annotate.main([str(inputs / "videos"), "--models", str(inputs / "models"), "--out", str(out), "--video",
                        "--config", str(_empty_config(inputs)),
                        "--extract-settings", HAAR, "--device", "cpu", "--no-progress", "--batch-size", "7"])
    assert rc == 0
    return out


def _empty_config(root: Path) -> Path:
    """A config without extract settings or weights (so the repository's config.yaml is not read)."""
    path = root / "config.yaml"
    path.write_text("variants: [{name: a}, {name: b}]\n")
    return path


def test_two_moving_faces_give_two_tracks_with_stable_ids_and_a_row_per_frame(annotated):
    table = schemas.read_table(annotated / "two.parquet", schemas.ANNOTATIONS)
    assert table.height == 2 * TWO_FACES_FRAMES
    assert table["track"].null_count() == 0
    # every frame has both tracks, once each
    per_frame = table.group_by("frame").agg(pl.col("track").sort()).sort("frame")
    assert per_frame["frame"].to_list() == list(range(TWO_FACES_FRAMES))
    assert all(t == [0, 1] for t in per_frame["track"].to_list())
    # the demo puts its two people at about 26% and 74% of the width: track 0 is the left one
    # on every frame (its id does not change as the faces move)
    centre = ((table["x1"] + table["x2"]) / 2 / 480).to_numpy()
    track = table["track"].to_numpy()
    assert (np.abs(centre[track == 0] - 0.26) < 0.1).all() and (np.abs(centre[track == 1] - 0.74) < 0.1).all()
    assert (table["x2"] > table["x1"]).all() and (table["y2"] > table["y1"]).all()
    assert set(table["status"]) <= {"detected", "interpolated"} and "detected" in set(table["status"])
    assert np.allclose(table["time"].to_numpy(), table["frame"].to_numpy() / demo.FPS)
    probs = table.select(list(EXPRESSIONS)).to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert table["expression"].to_list() == [EXPRESSIONS[i] for i in probs.argmax(axis=1)]
    va = table.select("valence", "arousal").to_numpy()
    assert np.isfinite(va).all() and (np.abs(va) <= 1).all()
    # the csv holds the same rows; the plot is a PNG
    csv = pl.read_csv(annotated / "two.csv")
    assert csv.columns == list(schemas.ANNOTATIONS) and csv.height == table.height
    assert np.allclose(csv["Happiness"].to_numpy(), table["Happiness"].to_numpy(), atol=1e-6)
    assert (annotated / "two.png").read_bytes()[:4] == b"\x89PNG"


def test_annotated_video_has_the_input_frame_count_and_fps(annotated, inputs):
    for name, src in (("two", "two.mp4"), ("empty", "empty.avi")):
        out = annotated / f"{name}.mp4"
        assert count_frames(str(out)) == count_frames(str(inputs / "videos" / src))
        cap = cv2.VideoCapture(str(out))
        assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(demo.FPS)
        cap.release()
    # the boxes are drawn: the annotated frame differs from the input inside a box's edge
    table = pl.read_parquet(annotated / "two.parquet").filter(pl.col("frame") == 0, pl.col("track") == 0)
    x1, y1, y2 = (int(round(table[c][0])) for c in ("x1", "y1", "y2"))
    original = next(iter(annotate.read_frames(str(inputs / "videos" / "two.mp4"))))[1]
    drawn = next(iter(annotate.read_frames(str(annotated / "two.mp4"))))[1]
    edge = (slice(y1 + 5, y2 - 5), slice(max(x1 - 1, 0), x1 + 2))
    assert np.abs(drawn[edge].astype(int) - original[edge].astype(int)).mean() > 20


def test_a_video_without_a_face_gives_track_null_rows_for_every_frame(annotated):
    table = schemas.read_table(annotated / "empty.parquet", schemas.ANNOTATIONS)
    assert table["frame"].to_list() == list(range(12))
    assert table["track"].null_count() == 12
    for col in ("x1", "score", "Neutral", "expression", "valence", "status"):
        assert table[col].null_count() == 12, col
    assert (annotated / "empty.png").read_bytes()[:4] == b"\x89PNG"
    assert not (annotated / "notes.parquet").exists()  # not a video extension: not listed


def test_an_unreadable_file_is_a_one_line_error_naming_it(inputs, tmp_path, capsys):
    bad = inputs / "broken.mp4"
    rc = annotate.main([str(bad), "--models", str(inputs / "models"), "--out", str(tmp_path),
                        "--config", str(_empty_config(inputs)), "--extract-settings", HAAR, "--device", "cpu"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ferflow annotate: error:")]
    assert rc == 2 and len(errors) == 1 and str(bad) in errors[0], err
    assert "Traceback" not in err and not list(tmp_path.iterdir())
    # a path that does not exist, and a models folder without models
    assert annotate.main([str(tmp_path / "nope.mp4"), "--models", str(inputs / "models"), "--out", str(tmp_path)]) == 2
    assert str(tmp_path / "nope.mp4") in capsys.readouterr().err
    assert annotate.main([str(inputs / "videos"), "--models", str(tmp_path), "--out", str(tmp_path),
                          "--config", str(_empty_config(inputs)), "--device", "cpu"]) == 2
    assert f"{tmp_path}: holds no <variant>/model.pt" in capsys.readouterr().err


def test_vote_and_smoothing_per_track():
    """The vote is the weighted mean of the variants; smoothing averages a track's own frames only."""
    from ferflow.inference import Ensemble, Member

    rng = np.random.default_rng(1)
    frames = np.array([0, 0, 1, 1, 2, 3, 3, 4], np.int64)
    tracks = np.array([0, 1, 0, 1, 0, 0, 1, 1], np.int64)
    faces = annotate.Faces(frames, tracks, ["detected"] * 8, np.zeros((8, 15), np.float32))
    p = rng.dirichlet(np.ones(8), size=(3, 8)).astype(np.float32)
    va = rng.uniform(-1, 1, (3, 8, 2)).astype(np.float32)
    members = tuple(Member(n, t, w, wv, 32, "resnet18", 1) for n, t, w, wv in
                    (("a", "both", 2.0, 1.0), ("b", "both", 1.0, 1.0), ("c", "va", 0.0, 1.0)))
    probs, v = annotate.vote(Ensemble(members, 32), p, va)
    assert np.allclose(probs, (2 * p[0] + p[1]) / 3, atol=1e-6)
    assert np.allclose(v, va.mean(axis=0), atol=1e-6)
    smoothed = annotate.smooth_tracks(faces, v, 3)
    for i in range(8):  # window 3: the same track's frames f-1, f, f+1 that are present
        same = (tracks == tracks[i]) & (np.abs(frames - frames[i]) <= 1)
        assert np.allclose(smoothed[i], v[same].mean(axis=0), atol=1e-6)
    assert annotate.smooth_tracks(faces, v, 1) is v


def test_console_script_lists_every_stage():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("ferflow") == "ferflow.cli:main"
    res = subprocess.run([sys.executable, "-m", "ferflow.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for name in ("demo", "index", "extract", "shards", "train", "predict", "evaluate", "annotate", "export"):
        assert f"    {name} " in res.stdout, name
        assert (Path(cli.__file__).parent / f"{name}.py").is_file()
    # a subcommand runs its stage's main with the rest of the arguments
    res = subprocess.run([sys.executable, "-m", "ferflow.cli", "evaluate", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--smoothing-windows" in res.stdout


def test_no_metrics_json_is_said_not_silent(tmp_path, monkeypatch):
    """Without a metrics.json (none given, none beside the models) annotation runs unsmoothed and
    says so in its log lines; with smoothing off on purpose it says nothing of the kind."""
    from ferflow.run_config import run_config

    monkeypatch.chdir(tmp_path)  # no config.yaml here
    (tmp_path / "models").mkdir()
    run = run_config(None, None, tmp_path / "models")
    assert run.smoothing == {"expr": 0, "va": 0}
    assert any(line.startswith("WARNING: no metrics.json found") for line in run.sources), run.sources
    quiet = run_config(None, None, tmp_path / "models", smoothing=False)
    assert not any("metrics.json" in line for line in quiet.sources)


def test_folded_batchnorm_runner_equals_the_unfolded_ensemble(tmp_path):
    """TorchRunner folds every Conv+BN (and Linear+BN1d inside the heads) for inference: the
    per-variant outputs equal the unfolded network's on random crops, probabilities within 1e-5.
    VA within 1e-4 (the ONNX test's bound): with these untrained heads the values before VA's
    BatchNorm reach the hundreds, and float32 rounding alone (the unfolded network in channels-last
    instead of NCHW) already moves VA by ~2e-5."""
    import torch
    from torch import nn

    from ferflow.inference import TorchRunner, fold_batchnorm, load_ensemble

    net = load_ensemble(write_models(tmp_path / "models"))
    # realistic BatchNorm statistics (not the init's 0/1): the mean over a few random batches
    rng = np.random.default_rng(0)
    calib = [torch.from_numpy(rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)) for _ in range(3)]
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for x in calib:
            net(x)
    net.eval()
    assert any(float(m.running_var.min()) < 0.5 or float(m.running_var.max()) > 2 for m in bns)
    x = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        _, _, want_p, want_va = net(torch.from_numpy(x))
    runner = TorchRunner(net)
    got_p, got_va = runner(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in runner.net.modules())  # all folded
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in bns)  # the caller's network is left as it was
    assert got_p.shape == (2, 6, 8) and got_va.shape == (2, 6, 2)
    assert np.abs(got_p - want_p.transpose(0, 1).numpy()).max() <= 1e-5
    assert np.abs(got_va - want_va.transpose(0, 1).numpy()).max() <= 1e-4
    unfolded_p, unfolded_va = TorchRunner(net, fold=False)(x)
    assert np.abs(unfolded_p - want_p.transpose(0, 1).numpy()).max() <= 1e-5
    assert np.abs(unfolded_va - want_va.transpose(0, 1).numpy()).max() <= 1e-4
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(net.train())
