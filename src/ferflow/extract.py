"""Stage ``extract_faces``: one job per video (or per image chunk) -> face crops + per-frame table.

Videos (``video`` mode): frames are decoded, faces detected on every ``detect_every``-th frame
(and the last), detections linked into tracks and each annotated person's track chosen
(``_left``/``_right`` people on their side of the frame, otherwise the largest face, kept
continuous; see :mod:`ferflow.faces`). Between two detected frames where the person has boxes of
the same track overlapping by at least ``max_jump_iou`` the boxes (and landmarks) are
interpolated; every other gap next to a face (track lost, switched or jumped) is detected again,
frame by frame, until no such gap is left. Crops are square around the box with ``margin``, or,
with ``align``, a similarity transform of the five landmarks to ArcFace's template
(:func:`ferflow.faces.align_face`; the square crop when there are no landmarks, e.g. Haar).

Aff-Wild2's own ``cropped_aligned`` frames (``cropped`` mode) replace detection: file
``<root>/<annotation name>/NNNNN.jpg`` is frame ``NNNNN - 1`` (names are 1-based, like the
annotation lines), resized to ``crop_size``; frames without a file are ``missing``. The video is
only decoded to count its frames. Images (``images`` mode): the given boxes are cropped.

Output: ``<unit>.tar`` with JPEGs named ``<video>/<frame:06d>.jpg`` and ``<unit>.parquet``
(schema ``FACES_FULL``: ``FACES`` + landmarks, crop kind and the detector settings as JSON) with
one row per person and decoded frame, including frames without a face (status ``missing``):
nothing is silently dropped. The table is written in row groups while the frames are read
(:func:`faces_writer`) and a video's boxes are kept per detected frame (:class:`BoxPlan`), so a
job's memory does not grow with the length of its video (docs/running.md, "Sizing").

    python -m ferflow.extract video --video V.mp4 --person V_left=left --person V_right=right \\
        --settings '{"detector": "haar"}' --out-tar results/faces/S/V.tar --out-table results/faces/S/V.parquet
    python -m ferflow.extract cropped --root AW2/cropped_aligned --person V_left=left --person V_right=right \\
        --video V.mp4 --settings '{"crop_size": 224}' --out-tar ... --out-table ...
    python -m ferflow.extract images --manifest results/manifest/S.parquet --unit chunk000 ...
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import io
import json
import math
import queue
import re
import sys
import tarfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
import polars as pl

from .atomic import atomic_path
from .inputcheck import fail, json_option, prog_of, require_inputs
from .detect import detector_settings
from .faces import align_face, choose_track, crop_face, encode_jpeg, interpolate_boxes, iou, link_tracks, unsettled_frames
from .schemas import FACES_FULL, LANDMARK_POINTS, MANIFEST, conform, read_table

LANDMARK_COLUMNS = [f"{p}_{c}" for p in LANDMARK_POINTS for c in "xy"]


@dataclass
class ExtractSettings:
    detector: str = "retinaface"  # retinaface | mtcnn | haar
    retinaface_weights: str | None = None
    detect_size: int = 640
    min_score: float = 0.7
    margin: float = 0.25
    crop_size: int = 224
    jpeg_quality: int = 90
    detect_every: int = 5  # detect on every k-th frame (and the last), interpolate between
    max_jump_iou: float = 0.3  # two detections of a track overlapping less than this: re-detect between
    detect_batch: int | str = "auto"  # frames per detector call; auto: 1 on a CPU, 16 on a GPU (retinaface.AUTO_BATCH)
    min_track_frames: int = 3  # shortest track of a face that is kept, in frames (one-off false detections are not)
    min_track_seconds: float | None = None  # the same in seconds at the video's frame rate; replaces min_track_frames
    align: bool = False  # 5-point alignment from the landmarks (square crop without landmarks)
    device: str = "auto"  # auto (claim a free GPU, else CPU) | cpu | cuda | cuda:N

    @classmethod
    def from_json(cls, text: str | None) -> "ExtractSettings":
        data = json.loads(text) if text else {}
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown extraction settings {unknown}; known: {sorted(known)}")
        settings = cls(**data)
        if int(settings.detect_every) < 1:
            raise ValueError(f"detect_every must be >= 1, got {settings.detect_every}")
        if int(settings.min_track_frames) < 1:
            raise ValueError(f"min_track_frames must be >= 1, got {settings.min_track_frames}")
        if settings.min_track_seconds is not None and not float(settings.min_track_seconds) > 0:
            raise ValueError(f"min_track_seconds must be > 0 (or null), got {settings.min_track_seconds}")
        if settings.detect_batch != "auto" and (isinstance(settings.detect_batch, (str, bool))
                                                or int(settings.detect_batch) < 1):
            raise ValueError(f"detect_batch must be 'auto' or an integer >= 1, got {settings.detect_batch!r}")
        return settings


#: Detectors that run on a GPU when there is one (``device: auto`` claims one, as training does).
GPU_DETECTORS = ("retinaface", "mtcnn")


def make_detector(settings: ExtractSettings, device: str | None = None):
    if settings.detector == "haar":
        from .detect import HaarDetector

        return HaarDetector(detect_size=settings.detect_size)
    if settings.detector == "retinaface":
        from .retinaface import RetinaFaceDetector

        return RetinaFaceDetector(weights=settings.retinaface_weights, detect_size=settings.detect_size,
                                  min_score=settings.min_score, device=device or settings.device,
                                  batch_size=settings.detect_batch)
    if settings.detector == "mtcnn":
        from .mtcnn import MTCNNDetector

        # auto: 16 frames per cascade call on any device (MTCNN's pyramid stages batch well; the
        # RetinaFace CPU rule of one frame does not apply to it, see docs/detectors.md)
        batch = 16 if settings.detect_batch == "auto" else int(settings.detect_batch)
        return MTCNNDetector(detect_size=settings.detect_size, min_score=settings.min_score,
                             device=device or settings.device, batch_size=batch)
    raise ValueError(f"unknown detector {settings.detector!r}; use 'retinaface', 'mtcnn' or 'haar'")


def settings_json(detector: dict, extract: dict) -> str:
    """The FACES ``detector`` column: what produced the rows, as sorted JSON."""
    return json.dumps({"detector": detector, "extract": extract}, sort_keys=True)


class VideoError(RuntimeError):
    pass


#: Frames in a row that may fail to decode before the rest of a video is given up (said loudly).
#: A failed read is taken to be one frame, as it is for intra-only codecs (MJPEG, the usual AVI).
MAX_FAILED_RUN = 300


@dataclass
class Decoding:
    """What one pass over a video found; filled in by :func:`read_frames` and :func:`count_frames`.

    ``container``: the frame count the container states (``CAP_PROP_FRAME_COUNT``; 0 when it states
    none), ``fps`` its frame rate (0 when unknown), ``decoded`` the frames that decoded, ``end`` one
    past the last of them, ``failed`` the frames before the video's end that did not decode, and
    ``gave_up`` the first frame not tried when :data:`MAX_FAILED_RUN` frames in a row failed.
    """

    container: int = 0
    fps: float = 0.0
    decoded: int = 0
    end: int = 0
    failed: list[int] = field(default_factory=list)
    gave_up: int | None = None

    @property
    def n_frames(self) -> int:
        """Frames of the video: the container's count, or the frames found when more (or it states
        none); 0 when no frame decodes. It does not shrink when frames fail to decode."""
        return max(self.container, self.end) if self.decoded else 0

    def opened(self, cap) -> None:
        count, fps = cap.get(cv2.CAP_PROP_FRAME_COUNT), cap.get(cv2.CAP_PROP_FPS)
        self.container = int(count) if math.isfinite(count) and count > 0 else 0
        self.fps = float(fps) if math.isfinite(fps) and fps > 0 else 0.0

    def step(self, i: int, ok: bool) -> bool:
        """Record whether frame ``i`` decoded; False when the pass should stop (the video's end,
        or :data:`MAX_FAILED_RUN` failures in a row)."""
        if ok:
            self.decoded += 1
            self.end = i + 1
            return True
        if self.container and i >= self.container:
            return False  # past the container's count: the video's end
        self.failed.append(i)
        if i + 1 - self.end < MAX_FAILED_RUN:
            return True  # go on past a broken frame
        if self.container:
            self.gave_up = i + 1
        else:  # no count stated: the failed run is the video's end, not frames
            self.failed = [f for f in self.failed if f < self.end]
        return False


def read_frames(path: str, wanted: set[int] | None = None, decoding: Decoding | None = None
                ) -> Iterator[tuple[int, np.ndarray]]:
    """Decode a video in order, yielding (index, BGR frame); only ``wanted`` indices if given.

    A frame that fails to decode is skipped and decoding goes on, so later frames keep their index;
    it stops at the container's frame count, or after :data:`MAX_FAILED_RUN` failures in a row.
    ``decoding``, when given, is filled in (see :class:`Decoding`). VideoError when it cannot be opened.
    """
    decoding = Decoding() if decoding is None else decoding
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise VideoError(f"{path}: cannot be opened as a video")
    decoding.opened(cap)
    try:
        last = max(wanted) if wanted else None
        i = 0
        while True:
            if wanted is not None and i not in wanted:
                if last is None or i > last:
                    break
                ok = cap.grab()
                frame = None
            else:
                ok, frame = cap.read()
            if not decoding.step(i, ok):
                break
            if ok and frame is not None:
                yield i, frame
            i += 1
    finally:
        cap.release()


def prefetch(items: Iterable, depth: int = 8) -> Iterator:
    """Iterate ``items`` in a background thread (OpenCV decodes without the GIL), ``depth`` ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for x in items:
                if not put((None, x)):
                    return
        except BaseException as e:  # handed to the consumer
            put((e, None))
            return
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's own clean-up (e.g. releasing the video) runs here, now
        put((None, done))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            err, x = q.get()
            if err is not None:
                raise err
            if x is done:
                return
            yield x
    finally:
        stop.set()
        thread.join()


def _batched(it, n):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def detect_frames(video: str, detector, frames: set[int], batch_size: int) -> dict[int, np.ndarray]:
    """Detections on the given frames of ``video``."""
    dets: dict[int, np.ndarray] = {}
    for batch in _batched(prefetch(read_frames(video, frames)), batch_size):
        for (i, _), d in zip(batch, detector([f for _, f in batch])):
            dets[i] = d
    return dets


def detect_keyframes(video: str, detector, every: int, batch_size: int, decoding: Decoding | None = None
                     ) -> tuple[dict[int, np.ndarray], int, int]:
    """One decoding pass: detections on every ``every``-th frame and the last decoded one; (dets,
    frames of the video (:attr:`Decoding.n_frames`), width). ``decoding`` is filled in when given."""
    dets: dict[int, np.ndarray] = {}
    batch: list[tuple[int, np.ndarray]] = []
    last: tuple[int, np.ndarray] | None = None
    width = 0

    def flush():
        if batch:
            for (i, _), d in zip(batch, detector([f for _, f in batch])):
                dets[i] = d
            batch.clear()

    decoding = Decoding() if decoding is None else decoding
    for i, frame in prefetch(read_frames(video, decoding=decoding)):
        width = frame.shape[1]
        if i % every == 0:
            batch.append((i, frame))
            if len(batch) == batch_size:
                flush()
        last = (i, frame)
    if last is not None and last[0] % every != 0:
        batch.append(last)
    flush()
    return dets, decoding.n_frames, width


@dataclass
class BoxPlan:
    """One person's (or track's) box on every frame, kept per detected frame only.

    ``frames``: int64 (M,), the detected frames where it has a box, ascending; ``rows``: their
    detection rows (:mod:`ferflow.detect`) stacked, (M, 15) in the detector's dtype (a list of M
    arrays when their lengths or dtypes differ); ``interpolated``: bool (M,), True where the frames
    strictly between ``frames[j]`` and ``frames[j + 1]`` get boxes interpolated between the two rows
    (:func:`ferflow.faces.interpolate_boxes`). A frame's box is computed when asked for
    (:meth:`at`), so the plan of a video holds nothing per frame, only per detection.
    """

    frames: np.ndarray
    rows: np.ndarray | list[np.ndarray]
    interpolated: np.ndarray

    def at(self, i: int) -> tuple[str, np.ndarray | None]:
        """``(status, row)`` of frame ``i``: ``detected`` | ``interpolated`` with its row, else
        ``("missing", None)``."""
        j = int(np.searchsorted(self.frames, i, side="right")) - 1
        if j < 0:
            return "missing", None
        a = int(self.frames[j])
        if a == i:
            return "detected", self.rows[j]
        if self.interpolated[j]:
            return "interpolated", interpolate_boxes(a, self.rows[j], int(self.frames[j + 1]), self.rows[j + 1], i)
        return "missing", None

    def items(self) -> Iterator[tuple[int, tuple[str, np.ndarray]]]:
        """``(frame, (status, row))`` of every frame with a box, in frame order."""
        for j, a in enumerate(self.frames.tolist()):
            yield a, ("detected", self.rows[j])
            if self.interpolated[j]:
                b = int(self.frames[j + 1])
                for i in range(a + 1, b):
                    yield i, ("interpolated", interpolate_boxes(a, self.rows[j], b, self.rows[j + 1], i))


def plan_boxes(detected: list[int], chosen: dict[int, tuple[np.ndarray, int]], max_jump_iou: float
               ) -> tuple[BoxPlan, set[int]]:
    """Boxes for the frames between the ``detected`` ones (sorted), and the frames to detect again.

    ``chosen``: the person's ``(row, track)`` on detected frames. Between consecutive detected
    frames ``a < b``: interpolated when both have a box of the same track overlapping by at least
    ``max_jump_iou``; detected again when only one has a box, or the boxes are of different tracks
    or jumped; left alone when neither has a box, unless both lie inside the life of one chosen
    track (the face is being followed but was missed on both).
    """
    have = sorted(chosen)
    interpolated = np.zeros(len(have), bool)
    redetect: set[int] = set()
    for a, b in zip(detected, detected[1:]):
        if b - a <= 1:
            continue
        ca, cb = chosen.get(a), chosen.get(b)
        if ca is None and cb is None:
            # no box on either side: detect again only inside the life of a chosen track (the face
            # was missed or hidden on both), not where no face is being followed
            j = bisect.bisect_left(have, a)
            if 0 < j < len(have) and chosen[have[j - 1]][1] == chosen[have[j]][1]:
                redetect.update(range(a + 1, b))
            continue
        if (ca is not None and cb is not None and ca[1] == cb[1]
                and iou(ca[0][None], cb[0])[0] >= max_jump_iou):
            interpolated[bisect.bisect_left(have, a)] = True  # a and b are consecutive in `have` too
        else:
            redetect.update(range(a + 1, b))
    rows = [chosen[f][0] for f in have]
    if len({(r.shape, r.dtype) for r in rows}) == 1:
        rows = np.stack(rows)  # one array, not one per detection (values and dtype unchanged)
    return BoxPlan(np.array(have, np.int64), rows, interpolated), redetect


def link_gap(every: int) -> int:
    """Frames a track may go undetected and still continue: about a second, at least 3 keyframes."""
    return max(30, 3 * every)


def min_track_frames(settings: ExtractSettings, fps: float) -> int:
    """The shortest track kept, in frames: ``min_track_seconds`` at the video's ``fps`` (rounded,
    at least 1) when set, else ``min_track_frames``. ValueError when seconds are asked for and the
    video states no frame rate."""
    if settings.min_track_seconds is None:
        return max(1, int(settings.min_track_frames))
    if fps <= 0:
        raise ValueError(f"min_track_seconds: the video states no frame rate; set min_track_frames instead")
    return max(1, int(round(float(settings.min_track_seconds) * fps)))


def detector_batch(settings: ExtractSettings, detector) -> int:
    """Frames handed to the detector per call: its own batch size (RetinaFace resolves
    ``detect_batch: auto`` for its device), else the setting (16 for ``auto``: Haar detects frame
    by frame, so this only groups the decoding)."""
    own = getattr(detector, "batch_size", None)
    if own:
        return int(own)
    return 16 if settings.detect_batch == "auto" else int(settings.detect_batch)


def track_video(video: str, persons: dict[str, str], settings: ExtractSettings, detector,
                decoding: Decoding | None = None
                ) -> tuple[dict[str, BoxPlan], int, dict[int, np.ndarray]]:
    """Every person's boxes (:class:`BoxPlan`), the frame count, and the detections made (per frame).

    Frames that do not decode are never asked for again; a track shorter than the minimum
    (:func:`min_track_frames`) has the frames between it and the detected frames next to it
    detected, so that its length is known to the frame before it is kept or left out
    (:func:`ferflow.faces.unsettled_frames`). ``decoding`` (first pass) is filled in when given.
    """
    k = max(1, int(settings.detect_every))
    decoding = Decoding() if decoding is None else decoding
    batch = detector_batch(settings, detector)
    dets, n_frames, width = detect_keyframes(video, detector, k, batch, decoding)
    shortest = min_track_frames(settings, decoding.fps)
    undecodable = set(decoding.failed) | set(range(decoding.end, n_frames))
    while True:
        plans: dict[str, BoxPlan] = {}
        need: set[int] = set()
        detected = sorted(dets)
        for name, person in persons.items():
            chosen = choose_track(dets, person, width, link_gap(k), min_frames=shortest, n_frames=n_frames)
            plans[name], redetect = plan_boxes(detected, chosen, settings.max_jump_iou)
            need |= redetect | unsettled_frames(dets, person, width, link_gap(k), shortest)
        need.difference_update(dets)
        need -= undecodable
        if not need:
            return plans, n_frames, dets
        found = detect_frames(video, detector, need, batch)
        dets.update(found)
        undecodable |= need - found.keys()  # never asked for again


def track_all_faces(video: str, settings: ExtractSettings, detector, min_track: int = 3
                    ) -> tuple[list[BoxPlan], int, dict[int, np.ndarray]]:
    """Every face of ``video`` followed along it: one plan per track, the frame count, the detections.

    Detection, linking and interpolation are those of :func:`track_video`, applied to every track
    instead of one chosen per person: keyframes every ``detect_every`` frames, detections linked by
    :func:`ferflow.faces.link_tracks`, tracks with fewer than ``min_track`` detections (one-off
    false detections; lowered for very short videos) left out, and each track's boxes planned by
    :func:`plan_boxes` (interpolated, or the frames detected again where it starts, ends or jumps)
    until no frame is left to detect. A plan is a :class:`BoxPlan` (``items()``: ``(frame,
    (status, row))`` in frame order, status ``detected`` | ``interpolated``). Tracks are ordered by
    their first frame, then by the left edge of their first box, so the index is a stable track id.
    Raises :class:`VideoError` when the video cannot be opened.
    """
    k = max(1, int(settings.detect_every))
    batch = detector_batch(settings, detector)
    dets, n_frames, _ = detect_keyframes(video, detector, k, batch)
    while True:
        need_dets = max(1, min(min_track, len(dets)))
        tracks = [t for t in link_tracks(dets, link_gap(k)) if len(t.frames) >= need_dets]
        tracks.sort(key=lambda t: (t.first, float(t.rows[0][0])))
        detected = sorted(dets)
        plans: list[BoxPlan] = []
        need: set[int] = set()
        for track in tracks:
            plan, redetect = plan_boxes(detected, {f: (row, 0) for f, row in zip(track.frames, track.rows)},
                                        settings.max_jump_iou)
            plans.append(plan)
            need |= redetect
        need.difference_update(dets)
        if not need:
            return plans, n_frames, dets
        dets.update(detect_frames(video, detector, need, batch))


def extract_video(video: str, persons: dict[str, str], settings: ExtractSettings, detector,
                  out_tar: str, out_table: str) -> Extracted:
    """Extract the faces of each annotated person (``{annotation name: side}``) of one video.

    One row per person and frame ``0 .. n_frames - 1`` (:attr:`Decoding.n_frames`); a frame that
    does not decode has status ``undecodable`` (the shard stage's ``unreadable_frame``), and the
    frames after it keep their index. No frame decoded: an empty table.

    Memory does not grow with the video's length, only with its detections: the boxes are planned
    per detected frame (:class:`BoxPlan`) and interpolated as the frames are read again, and the rows
    are written in row groups as they come (:func:`faces_writer`). Returns what was written
    (:class:`Extracted`), not the rows.
    """
    problem = f"{video}: no frame decoded"
    decoding = Decoding()
    try:
        plans, n_frames, _ = track_video(video, persons, settings, detector, decoding)
    except VideoError as exc:
        plans, n_frames, problem = {}, 0, str(exc)
    if n_frames == 0:  # an empty table: the shard stage counts the annotated frames as unreadable_video
        print(f"{problem}; its annotated frames are counted as unreadable_video", file=sys.stderr)
    else:
        report_decoding(video, decoding)
    described = settings_json(detector_settings(detector), asdict(settings))
    next_frame = 0

    def undecodable(upto: int) -> None:
        for j in range(next_frame, upto):
            for name in persons:
                rows.add(video=name, frame=j, status="undecodable", box=None, member=None,
                         n_frames=n_frames, crop=None, detector=described)

    with (faces_writer(out_table) as rows, atomic_path(out_tar) as tmp,
          tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar):
        for i, frame in (prefetch(read_frames(video)) if n_frames else iter(())):
            undecodable(i)
            next_frame = i + 1
            for name in persons:
                status, box = plans[name].at(i)
                member = kind = None
                if box is not None:
                    crop = align_face(frame, box[5:15], settings.margin, settings.crop_size) if settings.align else None
                    kind = "aligned" if crop is not None else "square"
                    if crop is None:
                        crop = crop_face(frame, box, settings.margin, settings.crop_size)
                    member = f"{name}/{i:06d}.jpg"
                    _add_member(tar, member, encode_jpeg(crop, settings.jpeg_quality))
                rows.add(video=name, frame=i, status=status, box=box, member=member, n_frames=n_frames,
                         crop=kind, detector=described)
        undecodable(n_frames)
    return Extracted(str(out_table), rows.rows, rows.counts)


def _spans(frames: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    out, start = [], None
    for a, b in zip(frames, [*frames[1:], None]):
        start = a if start is None else start
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = None
    return ", ".join(out)


def report_decoding(video: str, decoding: Decoding, log=None) -> None:
    """Say which frames of ``video`` did not decode, and loudly when decoding was given up
    (on ``log``, default stderr: the job's log)."""
    log = sys.stderr if log is None else log
    n = decoding.n_frames
    if decoding.gave_up is not None:
        print(f"WARNING: {video}: {MAX_FAILED_RUN} frames in a row failed to decode; decoding given up at "
              f"frame {decoding.gave_up} of the {decoding.container} the container states; frames "
              f"{decoding.end}..{n - 1} are counted as unreadable_frame", file=log)
    failed = [f for f in decoding.failed if f < decoding.end]
    if failed:
        print(f"{video}: {len(failed)} of {n} frames did not decode (frames {_spans(failed)}); counted as "
              f"unreadable_frame, the later frames keep their index", file=log)
    if decoding.gave_up is None and decoding.end < n:
        print(f"{video}: the container states {decoding.container} frames, {decoding.end} decoded (frames "
              f"{decoding.end}..{n - 1} are counted as unreadable_frame)", file=log)
    elif decoding.container and decoding.end > decoding.container:
        print(f"{video}: {decoding.end} frames decoded, the container states {decoding.container}", file=log)


#: Rows of a FACES table held in memory before they are written out as one parquet row group
#: (:class:`FacesWriter`), whatever the length of the video. A row is about 600 bytes in polars and
#: arrow (most of it the ``detector`` JSON), copied a few times on its way to the file, so a group
#: of 1,024 rows costs a few MB at its peak. Smaller groups make the table larger on disk (about 13
#: bytes per row instead of 7 with 4,096), which is nothing next to a crop (kilobytes).
ROW_GROUP_ROWS = 1024


@dataclass(frozen=True)
class Extracted:
    """What one extraction job wrote: its FACES_FULL table (``path``), its ``rows`` and the rows per
    ``status`` (``counts``). The rows themselves are on disk only (a 30-minute video has 54,000 per
    person); :meth:`table` reads them back."""

    path: str
    rows: int
    counts: dict[str, int]

    def table(self) -> pl.DataFrame:
        """The written table, read back (:func:`ferflow.schemas.read_table` with FACES_FULL)."""
        return read_table(self.path, FACES_FULL)


_BOX_COLUMNS = ["x0", "y0", "x1", "y1", "score", *LANDMARK_COLUMNS]  # a detection row's values, in order
_OTHER_COLUMNS = [c for c in FACES_FULL if c not in _BOX_COLUMNS]


class FacesWriter:
    """Writes a FACES_FULL table row by row, in parquet row groups of :data:`ROW_GROUP_ROWS` rows,
    so that the rows are never all in memory. Use :func:`faces_writer`.

    The boxes and landmarks of the rows held are kept in one float32 array (not a Python float per
    value); NaN and infinite values are written as null, as are the columns a row does not have.
    """

    def __init__(self, writer, where: str):
        self._writer, self._where = writer, where
        self._held = {c: [] for c in _OTHER_COLUMNS}
        self._boxes = np.full((ROW_GROUP_ROWS, len(_BOX_COLUMNS)), np.nan, np.float32)
        self.rows = 0
        self.counts: dict[str, int] = {}

    def add(self, *, video, frame, status, box, member, n_frames, crop, detector) -> None:
        """One row; ``box`` is a detection row (box, score, landmarks; fewer columns: null) or None."""
        held = self._held
        k = len(held["frame"])
        self._boxes[k] = np.nan
        if box is not None:
            w = min(len(box), self._boxes.shape[1])
            self._boxes[k, :w] = box[:w]
        for c, v in (("video", video), ("frame", frame), ("status", status), ("member", member),
                     ("n_frames", n_frames), ("crop", crop), ("detector", detector)):
            held[c].append(v)
        self.rows += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        if k + 1 == len(self._boxes):
            self.flush()

    def flush(self) -> None:
        """Write the rows held as one row group (checked against FACES_FULL, as write_table does)."""
        k = len(self._held["frame"])
        if not k:
            return
        boxes = self._boxes[:k]
        boxes = np.where(np.isfinite(boxes), boxes, np.nan)
        columns = {**{c: pl.Series(c, v, dtype=FACES_FULL[c]) for c, v in self._held.items()},
                   **{c: pl.Series(c, boxes[:, j], dtype=pl.Float32, nan_to_null=True)
                      for j, c in enumerate(_BOX_COLUMNS)}}
        table = conform(pl.DataFrame(columns).select(list(FACES_FULL)), FACES_FULL, self._where)
        self._writer.write_table(table.to_arrow())
        self._held = {c: [] for c in _OTHER_COLUMNS}


@contextlib.contextmanager
def faces_writer(out_table: str) -> Iterator[FacesWriter]:
    """A :class:`FacesWriter` into the atomic temporary path of ``out_table`` (zstd, as
    :func:`ferflow.schemas.write_table` writes), renamed over it when the block ends without an
    exception; no row added: a valid table with no rows.

    pyarrow's ParquetWriter, since polars writes a parquet file from one whole DataFrame only;
    imported here, not by the module (34 MB of memory once loaded, that only the writing job needs).
    """
    import pyarrow.parquet as pq

    schema = pl.DataFrame(schema=FACES_FULL).to_arrow().schema
    with atomic_path(out_table) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        faces = FacesWriter(writer, str(out_table))
        yield faces
        faces.flush()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one file to a tar being written (mtime 0, mode 644)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
    # TarFile keeps every member's TarInfo for getmembers(), which a writer never calls: 330 bytes
    # per crop (tracemalloc), i.e. per frame of a video; drop them (the headers are already written)
    tar.members.clear()


def read_image(path: str) -> np.ndarray | None:
    """BGR image, or None when the file is missing, empty or not an image (grayscale -> BGR)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


# ---- Aff-Wild2 cropped_aligned -----------------------------------------------------------------
CROPPED_SUFFIXES = (".jpg", ".jpeg", ".png")
_NUMBERED = re.compile(r"^\d+$")


def count_frames(video: str) -> int:
    """Frames of ``video`` as every stage counts them (:attr:`Decoding.n_frames`: the container's
    count, not fewer when some frames fail to decode; 0 when none decodes), found by grabbing every
    frame; VideoError if it cannot be opened."""
    decoding = Decoding()
    cap = cv2.VideoCapture(video)
    if not cap.isOpened():
        raise VideoError(f"{video}: cannot be opened as a video")
    decoding.opened(cap)
    try:
        i = 0
        while decoding.step(i, cap.grab()):
            i += 1
        return decoding.n_frames
    finally:
        cap.release()


def cropped_files(folder: str | Path) -> tuple[dict[int, Path], list[str]]:
    """``{frame: file}`` of a cropped_aligned folder (``00001.jpg`` is frame 0), and the names
    that are not numbered images (or duplicate a frame) and were ignored."""
    files: dict[int, Path] = {}
    ignored: list[str] = []
    folder = Path(folder)
    if not folder.is_dir():
        return files, ignored
    for p in sorted(folder.iterdir()):
        number = int(p.stem) if _NUMBERED.match(p.stem) else 0
        if p.suffix.lower() not in CROPPED_SUFFIXES or number < 1 or (number - 1) in files:
            ignored.append(p.name)
            continue
        files[number - 1] = p
    return files, ignored


def _cropped_jpeg(path: Path, size: int, quality: int) -> bytes | None:
    """The file as a ``size`` square JPEG (its own bytes when it already is one); None if unreadable."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        return None
    h, w = image.shape[:2]
    if (h, w) == (size, size) and data[:2] == b"\xff\xd8":
        return data
    interpolation = cv2.INTER_AREA if max(h, w) > size else cv2.INTER_CUBIC
    return encode_jpeg(cv2.resize(image, (size, size), interpolation=interpolation), quality)


def extract_cropped(folders: dict[str, str], n_frames: int | None, settings: ExtractSettings, out_tar: str,
                    out_table: str, log=sys.stderr) -> Extracted:
    """Aff-Wild2's own crops for each annotation name (``{name: folder}``) of one video.

    One row per person and frame ``0..n_frames-1``: ``provided`` (file found and readable),
    ``unreadable`` or ``missing``. Files numbered beyond the video are not used (the shard stage
    drops annotation lines beyond the video anyway); they and non-image names are reported on
    ``log``. ``n_frames=None`` (unreadable video): an empty table, as in video mode.
    """
    described = settings_json(
        {"name": "cropped_aligned", "folders": {k: str(v) for k, v in sorted(folders.items())}},
        {"crop_size": settings.crop_size, "jpeg_quality": settings.jpeg_quality})
    with (faces_writer(out_table) as rows, atomic_path(out_tar) as tmp,
          tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar):
        for name, folder in folders.items():
            if n_frames is None:
                break
            files, ignored = cropped_files(folder)
            beyond = sorted(f for f in files if f >= n_frames)
            if not Path(folder).is_dir():
                print(f"{name}: no cropped_aligned folder {folder}; every frame is missing", file=log)
            if ignored:
                print(f"{name}: ignored {len(ignored)} files that are not numbered images, e.g. {ignored[:3]}", file=log)
            if beyond:
                print(f"{name}: {len(beyond)} files beyond the video's {n_frames} frames not used "
                      f"(frames {beyond[0]}..{beyond[-1]})", file=log)
            for i in range(n_frames):
                path = files.get(i)
                data = None if path is None else _cropped_jpeg(path, settings.crop_size, settings.jpeg_quality)
                status = "missing" if path is None else ("unreadable" if data is None else "provided")
                member = f"{name}/{i:06d}.jpg" if data is not None else None
                if member:
                    _add_member(tar, member, data)
                rows.add(video=name, frame=i, status=status, box=None, member=member, n_frames=n_frames,
                         crop="cropped_aligned" if member else None, detector=described)
    return Extracted(str(out_table), rows.rows, rows.counts)


# ---- image datasets ----------------------------------------------------------------------------
def extract_images(manifest: pl.DataFrame, unit: str, settings: ExtractSettings, out_tar: str,
                   out_table: str) -> Extracted:
    """Crop the given boxes of one chunk of an image source; what was written (:class:`Extracted`)."""
    described = settings_json({"name": "given_boxes"}, {"margin": settings.margin, "crop_size": settings.crop_size,
                                                         "jpeg_quality": settings.jpeg_quality})
    todo = manifest.filter((pl.col("unit") == unit) & pl.col("drop").is_null()).sort("frame")
    n = todo.height
    with (faces_writer(out_table) as rows, atomic_path(out_tar) as tmp,
          tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar):
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
            rows.add(video=r["video"], frame=r["frame"], status=status,
                     box=box if status in ("provided", "bad_box") else None, member=member, n_frames=n,
                     crop="square" if member else None, detector=described)
    return Extracted(str(out_table), rows.rows, rows.counts)


#: the sides a --person may name: the main face (empty), or a person of a two-person video
SIDES = ("", "left", "right")


def _persons(specs: list[str]) -> dict[str, str]:
    return dict(p.split("=", 1) if "=" in p else (p, "") for p in specs)


def person_problems(specs: list[str]) -> list[str]:
    """One line per ``--person ANNOTATION=SIDE`` that is not usable: an empty annotation name, a
    side not in :data:`SIDES`, or an annotation given again with another side. (The same one given
    twice is fine: the workflow does so for a test video that is also annotated.)"""
    problems, seen = [], {}
    for spec in specs:
        name, side = spec.split("=", 1) if "=" in spec else (spec, "")
        if not name:
            problems.append(f"--person {spec}: the annotation name is empty")
        if side not in SIDES:
            problems.append(f"--person {spec}: side {side!r} is not one of left, right or empty (the main face)")
        elif seen.setdefault(name, side) != side:
            problems.append(f"--person {spec}: annotation {name!r} was given side {seen[name]!r} before")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_of("extract"), description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    pv = sub.add_parser("video", help="detect and crop the faces of one video")
    pv.add_argument("--video", required=True, help="the video file (any format OpenCV decodes)")
    pc = sub.add_parser("cropped", help="use Aff-Wild2's cropped_aligned frames of one video instead of detection")
    pc.add_argument("--root", help="the cropped_aligned folder: one folder of NNNNN.jpg per annotation name")
    pc.add_argument("--dir", action="append", default=[], metavar="ANNOTATION=FOLDER",
                    help="the folder of one annotation name (instead of <root>/<name>); repeatable")
    count = pc.add_mutually_exclusive_group(required=True)
    count.add_argument("--video", help="the video, decoded once to count its frames")
    count.add_argument("--n-frames", type=int, help="the video's frame count, when known")
    for p in (pv, pc):
        p.add_argument("--person", action="append", required=True, metavar="ANNOTATION=SIDE",
                       help="annotation name and side (left, right, or empty for the main face); repeatable")
    pi = sub.add_parser("images", help="crop the given boxes of one chunk of an image source")
    pi.add_argument("--manifest", required=True, help="the source's MANIFEST parquet (ferflow.index)")
    pi.add_argument("--unit", required=True, help="the chunk to crop, chunkNNN (config: chunks per source)")
    for p in (pv, pc, pi):
        p.add_argument("--settings", default="{}", help="extraction settings as JSON (config.yaml: extract)")
        p.add_argument("--out-tar", required=True, help="tar of the 224x224 JPEG face crops to write")
        p.add_argument("--out-table", required=True, help="FACES parquet to write: per frame its box, score and status")
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.mode}"
    require_inputs(prog, [("--video", getattr(args, "video", None), "file"),
                          ("--manifest", getattr(args, "manifest", None), "file")])
    problems = person_problems(getattr(args, "person", None) or [])
    if problems:
        fail(prog, *problems)
    try:
        settings = ExtractSettings.from_json(json.dumps(json_option(prog, "--settings", args.settings)))
    except (ValueError, TypeError) as exc:  # unknown keys, values out of range
        fail(prog, f"--settings: {exc}")
    t0 = time.perf_counter()
    if args.mode == "video":
        persons = _persons(args.person)
        claim = contextlib.nullcontext(None)
        if settings.detector in GPU_DETECTORS:
            from .devices import select_device

            claim = select_device(settings.device)
        with claim as device:
            if device is not None and device.type == "cuda" and settings.detector == "retinaface":
                import torch

                # one detection shape per video (MTCNN's R- and O-Net batches change size every call)
                torch.backends.cudnn.benchmark = True
            detector = make_detector(settings, str(device) if device is not None else None)
            written = extract_video(args.video, persons, settings, detector, args.out_tar, args.out_table)
        what = args.video
    elif args.mode == "cropped":
        persons = _persons(args.person)
        dirs = dict(d.split("=", 1) for d in args.dir if "=" in d)
        unknown = sorted(set(dirs) - set(persons))
        if unknown or len(dirs) != len(args.dir):
            parser.error(f"--dir must be ANNOTATION=FOLDER for an annotation given with --person (got {args.dir})")
        missing = [n for n in persons if n not in dirs and not args.root]
        if missing:
            parser.error(f"no folder for {missing}: give --root or --dir NAME=FOLDER")
        folders = {n: dirs.get(n) or str(Path(args.root) / n) for n in persons}
        if args.video is not None:
            try:
                n_frames = count_frames(args.video)
            except VideoError as e:
                print(f"{e}; writing an empty table", file=sys.stderr)
                n_frames = None
        else:
            n_frames = args.n_frames
        written = extract_cropped(folders, n_frames, settings, args.out_tar, args.out_table)
        what = f"{args.video or ''} cropped_aligned {sorted(folders.values())}"
    else:
        manifest = read_table(args.manifest, MANIFEST)
        written = extract_images(manifest, args.unit, settings, args.out_tar, args.out_table)
        what = f"{args.manifest} [{args.unit}]"
    dt = time.perf_counter() - t0
    print(f"{what}: {written.rows} rows in {dt:.1f} s, {dict(sorted(written.counts.items()))}; settings {asdict(settings)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
