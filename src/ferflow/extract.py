"""Stage ``extract_faces``: one job per video (or per image chunk) -> face crops + per-frame table.

Videos: frames are decoded, faces detected on every ``detect_every``-th frame (and the last), each
annotated person's face chosen along its track (``_left``/``_right`` people on their side of the
frame, otherwise the largest face, kept continuous), boxes between two detections of the same
track interpolated, and frames whose track was lost or jumped detected again. Images: the given
boxes are cropped, no detection.

Output: ``<unit>.tar`` with 224x224 JPEGs named ``<video>/<frame:06d>.jpg`` and ``<unit>.parquet``
(schema ``FACES``) with one row per person and decoded frame, including frames without a face
(status ``missing``): nothing is silently dropped.

    python -m ferflow.extract video --video V.mp4 --person V_left=left --person V_right=right \
        --settings '{"detector": "haar"}' --out-tar results/faces/S/V.tar --out-table results/faces/S/V.parquet
    python -m ferflow.extract images --manifest results/manifest/S.parquet --unit chunk000 ...
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import polars as pl

from .atomic import atomic_path
from .faces import choose_face, crop_face, encode_jpeg, interpolate_boxes, iou
from .schemas import FACES, MANIFEST, read_table, write_table


@dataclass
class ExtractSettings:
    detector: str = "retinaface"  # retinaface | haar
    retinaface_weights: str | None = None
    detect_size: int = 640
    min_score: float = 0.7
    margin: float = 0.25
    crop_size: int = 224
    jpeg_quality: int = 90
    detect_every: int = 1  # detect on every k-th frame, interpolate between
    max_jump_iou: float = 0.3  # two detections of a track overlapping less than this: re-detect between
    batch_size: int = 16
    device: str = "cpu"

    @classmethod
    def from_json(cls, text: str | None) -> "ExtractSettings":
        data = json.loads(text) if text else {}
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown extraction settings {unknown}; known: {sorted(known)}")
        return cls(**data)


def make_detector(settings: ExtractSettings):
    if settings.detector == "haar":
        from .detect import HaarDetector

        return HaarDetector(detect_size=settings.detect_size)
    if settings.detector == "retinaface":
        from .retinaface import RetinaFaceDetector

        return RetinaFaceDetector(weights=settings.retinaface_weights, detect_size=settings.detect_size,
                                  min_score=settings.min_score, device=settings.device,
                                  batch_size=settings.batch_size)
    raise ValueError(f"unknown detector {settings.detector!r}; use 'retinaface' or 'haar'")


def read_frames(path: str, wanted: set[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Decode a video in order, yielding (index, BGR frame); only ``wanted`` indices if given."""
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise VideoError(f"{path}: cannot be opened as a video")
    try:
        i = 0
        while True:
            if wanted is not None and i not in wanted:
                ok = cap.grab()
                frame = None
            else:
                ok, frame = cap.read()
            if not ok:
                break
            if frame is not None:
                yield i, frame
            i += 1
    finally:
        cap.release()


class VideoError(RuntimeError):
    pass


def _batched(it, n):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def detect_frames(video: str, detector, frames: set[int] | None, batch_size: int) -> tuple[dict[int, np.ndarray], int, int]:
    """Detections per frame for ``frames`` (all when None); returns (dets, frame count, width)."""
    dets: dict[int, np.ndarray] = {}
    width = 0
    count = 0
    for batch in _batched(read_frames(video, frames), batch_size):
        width = batch[0][1].shape[1]
        for (i, _), d in zip(batch, detector([f for _, f in batch])):
            dets[i] = d
        count = batch[-1][0] + 1
    return dets, count, width


def count_frames(video: str) -> tuple[int, int]:
    n, width = 0, 0
    for n_minus_1, frame in read_frames(video):
        n, width = n_minus_1 + 1, frame.shape[1]
    return n, width


def track_person(person: str, keyframes: list[int], dets: dict[int, np.ndarray], width: int) -> dict[int, np.ndarray]:
    """Choose the person's face on each detected frame, following the track in time order."""
    chosen: dict[int, np.ndarray] = {}
    previous = None
    for i in keyframes:
        box = choose_face(dets[i], person, width, previous)
        if box is not None:
            chosen[i] = box
            previous = box
    return chosen


def plan_boxes(n_frames: int, keyframes: list[int], chosen: dict[int, np.ndarray], max_jump_iou: float
               ) -> tuple[dict[int, tuple[str, np.ndarray]], set[int]]:
    """Boxes for every frame from the keyframe boxes: detected, interpolated, or to re-detect."""
    boxes: dict[int, tuple[str, np.ndarray]] = {i: ("detected", b) for i, b in chosen.items()}
    redetect: set[int] = set()
    for a, b in zip(keyframes, keyframes[1:]):
        if b - a <= 1:
            continue
        between = range(a + 1, b)
        if a in chosen and b in chosen and iou(chosen[a][None], chosen[b])[0] >= max_jump_iou:
            for i in between:
                boxes[i] = ("interpolated", interpolate_boxes(a, chosen[a], b, chosen[b], i))
        else:
            redetect.update(between)
    return boxes, redetect


def extract_video(video: str, persons: dict[str, str], settings: ExtractSettings, detector,
                  out_tar: str, out_table: str) -> pl.DataFrame:
    """Extract the faces of each annotated person (``{annotation name: side}``) of one video."""
    k = max(1, settings.detect_every)
    try:
        n_frames, width = count_frames(video) if k > 1 else (None, None)
        if k > 1:
            keyframes = sorted(set(range(0, n_frames, k)) | ({n_frames - 1} if n_frames else set()))
            dets, _, _ = detect_frames(video, detector, set(keyframes), settings.batch_size)
        else:
            dets, n_frames, width = detect_frames(video, detector, None, settings.batch_size)
            keyframes = list(range(n_frames))
    except VideoError:
        n_frames, dets, keyframes = 0, {}, []
    plans = {}
    all_redetect: set[int] = set()
    for name, person in persons.items():
        chosen = track_person(person, keyframes, dets, width or 0)
        plans[name] = plan_boxes(n_frames, keyframes, chosen, settings.max_jump_iou)
        all_redetect |= plans[name][1]
    if all_redetect:
        more, _, _ = detect_frames(video, detector, all_redetect, settings.batch_size)
        for name, person in persons.items():
            boxes, redetect = plans[name]
            for i in sorted(redetect):
                previous = _nearest_box(boxes, i)
                box = choose_face(more[i], person, width, previous)
                if box is not None:
                    boxes[i] = ("detected", box)
    rows = {c: [] for c in FACES}
    with atomic_path(out_tar) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, frame in (read_frames(video) if n_frames else iter(())):
            for name in persons:
                status, box = plans[name][0].get(i, ("missing", None))
                member = None
                if box is not None:
                    crop = crop_face(frame, box, settings.margin, settings.crop_size)
                    member = f"{name}/{i:06d}.jpg"
                    _add_member(tar, member, encode_jpeg(crop, settings.jpeg_quality))
                _append(rows, video=name, frame=i, status=status, box=box, member=member, n_frames=n_frames)
    table = pl.DataFrame(rows, schema=FACES)
    write_table(table, out_table, FACES)
    return table


def _nearest_box(boxes: dict[int, tuple[str, np.ndarray]], i: int) -> np.ndarray | None:
    if not boxes:
        return None
    j = min(boxes, key=lambda f: abs(f - i))
    return boxes[j][1]


def _append(rows, *, video, frame, status, box, member, n_frames):
    rows["video"].append(video)
    rows["frame"].append(frame)
    rows["status"].append(status)
    for j, c in enumerate(("x0", "y0", "x1", "y1", "score")):
        rows[c].append(None if box is None else float(box[j]))
    rows["member"].append(member)
    rows["n_frames"].append(n_frames)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def read_image(path: str) -> np.ndarray | None:
    """BGR image, or None when the file is missing, empty or not an image (grayscale -> BGR)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def extract_images(manifest: pl.DataFrame, unit: str, settings: ExtractSettings, out_tar: str,
                   out_table: str) -> pl.DataFrame:
    """Crop the given boxes of one chunk of an image source."""
    rows = {c: [] for c in FACES}
    todo = manifest.filter((pl.col("unit") == unit) & pl.col("drop").is_null()).sort("frame")
    n = todo.height
    with atomic_path(out_tar) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for r in todo.iter_rows(named=True):
            box = None if r["box_x0"] is None else np.array(
                [r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"], 1.0], np.float32)
            image = read_image(r["path"])
            member = None
            if image is None:
                status = "unreadable"
            elif box is None:
                status, box = "missing", None
            else:
                h, w = image.shape[:2]
                clipped = np.array([max(box[0], 0), max(box[1], 0), min(box[2], w), min(box[3], h)])
                if clipped[2] - clipped[0] < 2 or clipped[3] - clipped[1] < 2 or not np.isfinite(box).all():
                    status = "bad_box"
                else:
                    status = "provided"
                    member = f"{r['video']}/{r['frame']:06d}.jpg"
                    crop = crop_face(image, box, settings.margin, settings.crop_size)
                    _add_member(tar, member, encode_jpeg(crop, settings.jpeg_quality))
            _append(rows, video=r["video"], frame=r["frame"], status=status,
                    box=box if status in ("provided", "bad_box") else None, member=member, n_frames=n)
    table = pl.DataFrame(rows, schema=FACES)
    write_table(table, out_table, FACES)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferflow.extract", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    pv = sub.add_parser("video", help="detect and crop the faces of one video")
    pv.add_argument("--video", required=True)
    pv.add_argument("--person", action="append", required=True, metavar="ANNOTATION=SIDE",
                    help="annotation name and side (left, right, or empty for the main face); repeatable")
    pi = sub.add_parser("images", help="crop the given boxes of one chunk of an image source")
    pi.add_argument("--manifest", required=True)
    pi.add_argument("--unit", required=True)
    for p in (pv, pi):
        p.add_argument("--settings", default="{}", help="extraction settings as JSON (config.yaml: extract)")
        p.add_argument("--out-tar", required=True)
        p.add_argument("--out-table", required=True)
    args = parser.parse_args(argv)
    settings = ExtractSettings.from_json(args.settings)
    t0 = time.perf_counter()
    if args.mode == "video":
        persons = dict(p.split("=", 1) if "=" in p else (p, "") for p in args.person)
        table = extract_video(args.video, persons, settings, make_detector(settings), args.out_tar, args.out_table)
        what = args.video
    else:
        manifest = read_table(args.manifest, MANIFEST)
        table = extract_images(manifest, args.unit, settings, args.out_tar, args.out_table)
        what = f"{args.manifest} [{args.unit}]"
    counts = dict(table.group_by("status").len().iter_rows())
    dt = time.perf_counter() - t0
    print(f"{what}: {table.height} rows in {dt:.1f} s, {counts}; settings {asdict(settings)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
