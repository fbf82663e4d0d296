"""``ferflow annotate``: a trained ensemble on any video -> per-frame table, plot, annotated video.

    ferflow annotate VIDEO_OR_FOLDER... --models results/models --out annotated [--video] [--onnx ensemble.onnx]

For each video (a folder: its files with a video extension, sorted):

1. Faces are detected, tracked and cropped as for training (the run's ``extract`` settings, see
   :mod:`ferflow.run_config`), but every face gets its own track
   (:func:`ferflow.extract.track_all_faces`), not only the annotated person's.
2. Every variant predicts every tracked face, in batches of ``--batch-size`` crops across frames and
   tracks (on a GPU when there is one: ``--device auto`` claims a free one as training does), from
   a second decoding pass; a progress bar shows on a terminal.
3. The variants are combined by :func:`ferflow.ensemble.soft_vote` and each track is smoothed over
   time by :func:`ferflow.ensemble.smooth` with the windows chosen on validation.
4. Written atomically to ``--out``: ``<video>.parquet`` and ``<video>.csv`` (schema
   :data:`ferflow.schemas.ANNOTATIONS`: one row per frame and track, and a row with a null track
   for every frame without a face, so every decoded frame is there), ``<video>.png`` (valence and
   arousal over time per track, expression as a coloured band) and, with ``--video``,
   ``<video>.mp4``: the input with each face's box, track id, expression and a small
   valence/arousal marker, same frame count and fps.

A file that cannot be opened or decodes no frame is a one-line error naming it (exit status 2 once
every other video is done); a video without any face still gets its table (all rows track-null),
plot and video.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import cv2
import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from . import plots, schemas
from .atomic import atomic_path
from .demo import write_video
from .devices import select_device
from .ensemble import Aligned, smooth, soft_vote
from .extract import ExtractSettings, VideoError, make_detector, prefetch, read_frames, track_all_faces
from .faces import align_face, crop_face
from .inference import Ensemble, InferenceError, OnnxRunner, TorchRunner, load_ensemble
from .labels import EXPRESSIONS, NUM_EXPRESSIONS
from .inputcheck import error, prog_of
from .layout import VIDEO_EXTENSIONS
from .run_config import RunConfig, add_run_arguments, from_args

log = logging.getLogger("ferflow.annotate")

CLASS_COLUMNS = list(EXPRESSIONS)


class AnnotateError(ValueError):
    """An input that cannot be annotated; the message names the file."""


def check_videos(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """The usable videos of ``paths`` (files as given, video files of folders) and one line per
    problem, each naming its path: no such file or folder, a folder without video files, a video
    that cannot be opened or has no frame (:func:`ferflow.index.probe_video`: opens the container,
    decodes at most one frame), two videos with the same name. Every input is checked before any
    is annotated, so that one bad file among many is found at once."""
    from .index import probe_video

    videos: list[Path] = []
    problems: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS)
            if not found:
                problems.append(f"{p}: a folder without video files ({', '.join(VIDEO_EXTENSIONS)})")
            videos += found
        elif p.exists():
            videos.append(p)
        else:
            problems.append(f"{p}: no such file or folder")
    usable: list[Path] = []
    stems: dict[str, Path] = {}
    for v in videos:
        why = probe_video(str(v))
        if why is not None:
            problems.append(f"{v}: {why}")
        elif v.stem in stems:
            problems.append(f"{v} and {stems[v.stem]}: two videos named {v.stem!r} would write the same outputs")
        else:
            stems[v.stem] = v
            usable.append(v)
    return usable, problems


@dataclass
class VideoInfo:
    fps: float | None  # the container's frame rate; None when it gives none
    width: int
    height: int


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Frame rate and size of a video; :class:`AnnotateError` naming it when it cannot be opened."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise AnnotateError(f"{path}: cannot be opened as a video")
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        return VideoInfo(fps if math.isfinite(fps) and fps > 0 else None,
                         int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    finally:
        cap.release()


@dataclass
class Faces:
    """Every tracked face of a video, sorted by frame then track: ``M`` rows."""

    frame: np.ndarray  # int64 (M,)
    track: np.ndarray  # int64 (M,)
    status: list[str]  # detected | interpolated
    rows: np.ndarray  # float32 (M, 15): box, score, landmarks (see ferflow.detect)

    @property
    def n(self) -> int:
        return int(self.frame.shape[0])


def find_faces(video: str, settings: ExtractSettings, detector) -> tuple[Faces, int]:
    """Every tracked face of ``video`` and its decoded frame count (VideoError: not a video)."""
    plans, n_frames, _ = track_all_faces(video, settings, detector)
    items = sorted((f, t, status, row) for t, plan in enumerate(plans) for f, (status, row) in plan.items())
    rows = np.array([r[3][:15] for r in items], np.float32).reshape(-1, 15)
    return Faces(np.array([r[0] for r in items], np.int64), np.array([r[1] for r in items], np.int64),
                 [r[2] for r in items], rows), n_frames


def model_input(frame: np.ndarray, row: np.ndarray, settings: ExtractSettings, size: int) -> np.ndarray:
    """The crop of one face as the variants saw them in training: uint8 RGB (3, size, size).

    The crop of :mod:`ferflow.extract` (square with margin, or aligned by the landmarks with
    ``align``) at ``crop_size``, resized to the variants' ``size`` as the training loader resizes
    (INTER_AREA when shrinking by more than 1.25, else INTER_LINEAR). Training crops also went
    through a JPEG at ``jpeg_quality``; that is not repeated here.
    """
    crop = align_face(frame, row[5:15], settings.margin, settings.crop_size) if settings.align else None
    if crop is None:
        crop = crop_face(frame, row, settings.margin, settings.crop_size)
    if crop.shape[0] != size:
        shrink = crop.shape[0] / size
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink > 1.25 else cv2.INTER_LINEAR)
    return np.ascontiguousarray(crop[:, :, ::-1].transpose(2, 0, 1))


def predict_faces(video: str, faces: Faces, settings: ExtractSettings, runner, batch_size: int = 64,
                  progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every variant's probabilities (V, M, 8) and VA (V, M, 2) for every face, float32.

    One decoding pass; crops of successive frames and tracks fill batches of ``batch_size``.
    """
    ensemble: Ensemble = runner.ensemble
    size = ensemble.input_size
    v = len(ensemble.members)
    probs = np.zeros((v, faces.n, NUM_EXPRESSIONS), np.float32)
    va = np.zeros((v, faces.n, 2), np.float32)
    if faces.n == 0:
        return probs, va
    buffer = np.empty((batch_size, 3, size, size), np.uint8)
    filled = 0
    done = 0  # faces predicted so far (faces are in frame order, so batches are contiguous)

    def flush():
        nonlocal filled, done
        if filled:
            p, q = runner(buffer[:filled])
            probs[:, done:done + filled] = p
            va[:, done:done + filled] = q
            done += filled
            filled = 0

    starts = np.searchsorted(faces.frame, np.arange(int(faces.frame[-1]) + 2))
    wanted = set(np.unique(faces.frame).tolist())
    with tqdm(total=faces.n, desc=Path(video).name, unit="face", disable=True if progress is False else None,
              leave=False) as bar:
        for i, frame in prefetch(read_frames(video, wanted)):
            for j in range(starts[i], starts[i + 1]):
                buffer[filled] = model_input(frame, faces.rows[j], settings, size)
                filled += 1
                if filled == batch_size:
                    flush()
                    bar.update(batch_size)
        bar.update(filled)
        flush()
    if done != faces.n:
        raise AnnotateError(f"{video}: decoded faces for {done} of {faces.n} boxes (the video changed while read?)")
    return probs, va


def vote(ensemble: Ensemble, variant_probs: np.ndarray, variant_va: np.ndarray
         ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The soft vote of the variants (:func:`ferflow.ensemble.soft_vote`, the members' weights):
    probabilities (M, 8) and VA (M, 2), None for a task no variant was trained for."""
    m = variant_probs.shape[1]
    none = np.zeros(m, bool)
    aligned = [Aligned(p, q, none, none, none, none) for p, q in zip(variant_probs, variant_va)]
    members = ensemble.members
    if not any(x.weight > 0 for x in members) and not any(x.va_weight > 0 for x in members):
        raise InferenceError("no variant has a positive weight")
    result = soft_vote(aligned, [x.weight for x in members], [x.va_weight for x in members])
    return result.probs, result.va


def smooth_tracks(faces: Faces, values: np.ndarray | None, window: int) -> np.ndarray | None:
    """``values`` (M, C) smoothed along each track by :func:`ferflow.ensemble.smooth` (centred mean
    over the track's frames within ``window // 2`` frames; 0 or 1: unchanged)."""
    if values is None or window <= 1 or faces.n == 0:
        return values
    key = (faces.track << 32) | faces.frame
    order = np.argsort(key, kind="stable")
    out = np.empty_like(values)
    out[order] = smooth(key[order], values[order], window)
    return out


def annotation_table(name: str, n_frames: int, fps: float | None, faces: Faces, probs: np.ndarray | None,
                     va: np.ndarray | None) -> pl.DataFrame:
    """ANNOTATIONS rows: one per face, plus a track-null row per frame without a face; by frame, track."""
    empty = np.setdiff1d(np.arange(n_frames, dtype=np.int64), faces.frame)
    m, k = faces.n, empty.shape[0]
    nan = np.full(k, np.nan, np.float32)

    def both(face_values, dtype=np.float32):
        return np.concatenate([np.asarray(face_values, dtype), nan.astype(dtype)])

    frame = np.concatenate([faces.frame, empty])
    cols: dict[str, object] = {
        "video": [name] * (m + k),
        "frame": frame,
        "time": frame / fps if fps else np.full(m + k, np.nan),
        "track": np.concatenate([faces.track, np.full(k, -1)]),
        "status": faces.status + [None] * k,
    }
    for j, c in enumerate(("x1", "y1", "x2", "y2", "score")):
        cols[c] = both(faces.rows[:, j])
    expression = [None] * (m + k)
    for j, c in enumerate(CLASS_COLUMNS):
        cols[c] = both(probs[:, j] if probs is not None else np.full(m, np.nan))
    if probs is not None and m:
        expression[:m] = [EXPRESSIONS[i] for i in probs.argmax(axis=1)]  # ties: the lower class index
    cols["expression"] = expression
    for j, c in enumerate(("valence", "arousal")):
        cols[c] = both(va[:, j] if va is not None else np.full(m, np.nan))
    table = pl.DataFrame(cols, nan_to_null=True).with_columns(
        pl.when(pl.col("track") >= 0).then(pl.col("track")).alias("track"))
    return schemas.conform(table.sort("frame", "track", nulls_last=False), schemas.ANNOTATIONS, name)


# ---- drawing --------------------------------------------------------------------------------
def _bgr(rgb: tuple[float, float, float]) -> tuple[int, int, int]:
    return int(rgb[2] * 255), int(rgb[1] * 255), int(rgb[0] * 255)


def draw_faces(frame: np.ndarray, rows: list[dict], colours: list[tuple[int, int, int]]) -> np.ndarray:
    """``frame`` (BGR, drawn on in place) with each face's box, track id, expression and a small
    valence (x) / arousal (y) marker next to the box. ``rows``: ANNOTATIONS rows of this frame."""
    h, w = frame.shape[:2]
    for r in rows:
        if r["track"] is None:
            continue
        x1, y1, x2, y2 = (int(round(r[c])) for c in ("x1", "y1", "x2", "y2"))
        cls = EXPRESSIONS.index(r["expression"]) if r["expression"] else None
        colour = colours[cls] if cls is not None else (200, 200, 200)
        cv2.rectangle(frame, (x1, y1), (x2, y2), colour, 2, cv2.LINE_AA)
        label = f"#{r['track']} {r['expression'] or ''}".strip()
        cv2.putText(frame, label, (x1, max(12, y1 - 5)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
        if r["valence"] is not None and r["arousal"] is not None:
            side = max(16, min(48, (x2 - x1) // 3))  # the marker: a square, valence right, arousal up
            mx0, my0 = min(max(x2 + 4, 0), max(w - side - 1, 0)), min(max(y1, 0), max(h - side - 1, 0))
            c = side // 2
            cv2.rectangle(frame, (mx0, my0), (mx0 + side, my0 + side), (255, 255, 255), 1)
            cv2.line(frame, (mx0 + c, my0), (mx0 + c, my0 + side), (160, 160, 160), 1)
            cv2.line(frame, (mx0, my0 + c), (mx0 + side, my0 + c), (160, 160, 160), 1)
            px = mx0 + c + int(round(np.clip(r["valence"], -1, 1) * c))
            py = my0 + c - int(round(np.clip(r["arousal"], -1, 1) * c))
            cv2.circle(frame, (px, py), 3, colour, -1, cv2.LINE_AA)
    return frame


def annotated_frames(video: str, table: pl.DataFrame) -> Iterator[np.ndarray]:
    """The decoded frames of ``video`` with :func:`draw_faces` applied."""
    colours = [_bgr(c) for c in plots.class_colours()]
    by_frame: dict[int, list[dict]] = {}
    for r in table.filter(pl.col("track").is_not_null()).iter_rows(named=True):
        by_frame.setdefault(r["frame"], []).append(r)
    for i, frame in prefetch(read_frames(video)):
        yield draw_faces(frame, by_frame.get(i, []), colours)


# ---- one video --------------------------------------------------------------------------------
@dataclass
class Outputs:
    table: pl.DataFrame
    paths: dict[str, Path]
    n_frames: int
    n_tracks: int
    seconds: float


def annotate_video(video: str | os.PathLike, out_dir: str | os.PathLike, runner, settings: ExtractSettings,
                   smoothing: Mapping[str, int], detector, batch_size: int = 64, write_annotated: bool = False,
                   progress: bool | None = None, plot: bool = True) -> Outputs:
    """Annotate one video (see the module docstring) with ``runner`` (a :mod:`ferflow.inference`
    runner), the crops of ``settings``, the windows ``smoothing`` (``{"expr": W, "va": W}``) and
    ``detector``; :class:`AnnotateError` naming the video when it cannot be read."""
    t0 = time.perf_counter()
    video, out_dir = str(video), Path(out_dir)
    name = Path(video).stem
    info = video_info(video)
    try:
        faces, n_frames = find_faces(video, settings, detector)
    except VideoError as exc:
        raise AnnotateError(str(exc)) from None
    if n_frames == 0:
        raise AnnotateError(f"{video}: no frame could be decoded")
    variant_probs, variant_va = predict_faces(video, faces, settings, runner, batch_size, progress)
    probs, va = vote(runner.ensemble, variant_probs, variant_va)
    probs = smooth_tracks(faces, probs, smoothing.get("expr", 0))
    va = smooth_tracks(faces, va, smoothing.get("va", 0))
    table = annotation_table(name, n_frames, info.fps, faces, probs, va)
    paths = {"parquet": out_dir / f"{name}.parquet", "csv": out_dir / f"{name}.csv"}
    schemas.write_table(table, paths["parquet"], schemas.ANNOTATIONS)
    with atomic_path(paths["csv"]) as tmp:
        table.write_csv(tmp)
    if plot:
        faced = table.filter(pl.col("track").is_not_null())
        codes = [EXPRESSIONS.index(e) if e else -1 for e in faced["expression"].to_list()]
        paths["png"] = plots.va_over_time(
            faced["time"].fill_null(faced["frame"].cast(pl.Float64)).to_numpy(), faced["track"].to_numpy(),
            faced["valence"].cast(pl.Float64).fill_null(np.nan).to_numpy(),
            faced["arousal"].cast(pl.Float64).fill_null(np.nan).to_numpy(), np.array(codes, np.int64),
            out_dir / f"{name}.png", title=name)
    if write_annotated:
        paths["mp4"] = out_dir / f"{name}.mp4"
        written = write_video(paths["mp4"], annotated_frames(video, table), info.width, info.height, info.fps or 30.0)
        if written != n_frames:
            raise AnnotateError(f"{video}: wrote {written} annotated frames, decoded {n_frames}")
    n_tracks = int(np.unique(faces.track).size)
    return Outputs(table, paths, n_frames, n_tracks, time.perf_counter() - t0)


# ---- CLI --------------------------------------------------------------------------------------
PROG = prog_of("annotate")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].strip("` "))
    p.add_argument("inputs", nargs="+", metavar="VIDEO_OR_FOLDER", help="videos, or folders searched for videos")
    p.add_argument("--models", default="results/models", help="the training outputs: <variant>/model.pt")
    p.add_argument("--onnx", default=None, help="run this file of `ferflow export` on onnxruntime instead of --models")
    p.add_argument("--out", required=True, help="folder for <video>.parquet, .csv, .png (and .mp4)")
    p.add_argument("--video", action="store_true", help="also write the annotated video <video>.mp4")
    p.add_argument("--batch-size", type=int, default=64, help="face crops per forward pass")
    p.add_argument("--device", default="auto", help="auto (claim a free GPU, else CPU) | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the models (default: the library's)")
    p.add_argument("--lock-dir", default=None, help="GPU lock folder (default: $FERFLOW_GPU_LOCK_DIR or a temp folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--skip-bad-inputs", action="store_true",
                   help="go on without the inputs that are missing or cannot be opened, each named in the summary at "
                   "the end (default: name them all and stop before any video is annotated, exit status 2)")
    add_run_arguments(p)
    return p


def _run_for_onnx(args, metadata: dict) -> RunConfig:
    """Crop settings and smoothing from the ONNX file's metadata, unless a config or metrics is given."""
    run = from_args(args, None)
    if run.config is None:  # no config: the crops the file was exported with
        run.extract = {**(metadata.get("crop") or {}), **run.extract}
        run.sources.append(f"extract settings from {args.onnx}")
    if args.metrics is None and not args.no_smoothing:
        run.smoothing = {k: int(metadata["smoothing"][k]) for k in ("expr", "va")}
        run.sources.append(f"smoothing windows {run.smoothing} from {args.onnx}")
    return run


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    videos, bad = check_videos(args.inputs)
    if bad and not args.skip_bad_inputs:
        error(PROG, *bad)
        print(f"{PROG}: nothing annotated: {len(bad)} bad input(s); fix them, or pass --skip-bad-inputs to "
              "annotate the others", file=sys.stderr)
        return 2
    if not videos:
        error(PROG, *bad, "no usable video among the inputs")
        return 2
    try:
        runner = OnnxRunner(args.onnx, args.threads) if args.onnx else None
        run = _run_for_onnx(args, runner.metadata) if args.onnx else from_args(args, args.models)
        settings = ExtractSettings.from_json(json.dumps(run.extract))
    except (AnnotateError, InferenceError, ValueError, FileNotFoundError) as exc:
        error(PROG, str(exc))
        return 2
    for line in run.sources:
        log.info("%s", line)
    failed = 0
    with select_device(args.device, args.lock_dir) as device:  # the detector's (and PyTorch's) device
        try:
            if runner is None:
                runner = TorchRunner(load_ensemble(args.models, run.weights, device=device), device)
            detector = make_detector(settings, str(device))
        except (InferenceError, ValueError, FileNotFoundError) as exc:
            error(PROG, str(exc))
            return 2
        log.info("ensemble: %s; detector %s, detect_every %d", runner.ensemble.names, settings.detector,
                 settings.detect_every)
        for video in videos:
            try:
                out = annotate_video(video, args.out, runner, settings, run.smoothing, detector, args.batch_size,
                                     args.video, progress=False if args.no_progress else None)
            except AnnotateError as exc:
                error(PROG, str(exc))
                failed += 1
                continue
            faced = out.table["track"].is_not_null().sum()
            log.info("%s: %d frames, %d tracks, %d face rows, %d frames without a face, %.1f frames/s -> %s",
                     video, out.n_frames, out.n_tracks, faced, out.table.height - faced,
                     out.n_frames / max(out.seconds, 1e-9), ", ".join(str(p) for p in out.paths.values()))
    if bad:  # --skip-bad-inputs: the summary names what was left out
        print(f"{PROG}: skipped {len(bad)} bad input(s):", file=sys.stderr)
        for line in bad:
            print(f"  {line}", file=sys.stderr)
    if failed:
        if len(videos) > 1:
            print(f"{PROG}: {failed} of {len(videos)} videos could not be annotated", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
