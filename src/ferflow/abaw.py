"""The ABAW file formats: test lists, frame counts, and the submission (export and check).

A submission holds one text file per video and task, ``EXPR/{video}.txt`` (header
``labels.EXPR_HEADER``, then one class index 0..7 a line) and ``VA/{video}.txt`` (header
``labels.VA_HEADER``, then ``valence,arousal`` in [-1, 1] a line), with a line for every frame of
the video, faces found or not (the ABAW3 format; see ``docs/formats.md``). :func:`export_submission`
writes the ensemble of :mod:`ferflow.ensemble` in that format and :func:`check_submission` checks a
folder of such files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import polars as pl

from . import atomic, layout
from .ensemble import Aligned, fill_columns
from .labels import EXPR_HEADER, NUM_EXPRESSIONS, VA_HEADER
from .truth import EvaluationError, GroundTruth, is_scored, sort_order


# --------------------------------------------------------------------------------------------
# submission (ABAW3 format)


def read_test_list(path: str | os.PathLike) -> list[str]:
    """Video names of a test list, read as the index stage reads them (:func:`layout.read_test_list`)."""
    try:
        names = layout.read_test_list(path)
    except (OSError, ValueError) as exc:
        raise EvaluationError(str(exc)) from exc
    if not names:
        raise EvaluationError(f"{path}: the test list names no video")
    return names


def read_frame_counts(paths: Sequence[str | os.PathLike]) -> dict[str, int]:
    """Frames of each video from parquet files with ``video`` and ``n_frames`` columns (FACES,
    whose ``n_frames`` is the container's frame count, not fewer when frames fail to decode)."""
    counts: dict[str, int] = {}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such frame-count table")
        df = pl.read_parquet(path, columns=None)
        missing = [c for c in ("video", "n_frames") if c not in df.columns]
        if missing:
            raise EvaluationError(f"{path}: frame-count table lacks columns {missing}")
        per_video = df.group_by("video").agg(pl.col("n_frames").min().alias("lo"), pl.col("n_frames").max().alias("hi"))
        for video, lo, hi in per_video.iter_rows():
            if lo != hi or (video in counts and counts[video] != hi):
                raise EvaluationError(f"{path}: video {video!r} has conflicting frame counts")
            counts[video] = int(hi)
    return counts


def export_submission(
    gt: GroundTruth,
    ens: Aligned,
    out_dir: str | os.PathLike,
    videos: Sequence[str] | None = None,
    frame_counts: Mapping[str, int] | None = None,
) -> dict:
    """One ABAW3 file per video and task: ``out_dir/EXPR/{video}.txt`` and ``out_dir/VA/{video}.txt``.

    Every frame ``0 .. n-1`` of a video gets a line, ``n`` from ``frame_counts`` (the video's
    frame count as the extraction gives it: the container's, however many frames decoded; see
    :func:`read_frame_counts`) or else the last scored frame + 1 (reported by
    :func:`frame_count_mismatches`): frames between or beyond the scored ones are
    interpolated / copied from the nearest, as for the evaluation, and frames past the video's end
    are cut. Videos are matched by name (``videos`` defaults to every scored video); a listed video
    without any scored frame gets uniform probabilities (class 0) and VA 0 when its frame count is
    known, and is an error otherwise.
    """
    out_dir = Path(out_dir)
    frame_counts = dict(frame_counts or {})
    table = gt.videos()
    by_name: dict[str, int] = {}
    ambiguous = set()
    for vid, _, name in table.iter_rows():
        if name in by_name:
            ambiguous.add(name)
        by_name[name] = vid
    videos = list(videos) if videos is not None else list(dict.fromkeys(table["video"].to_list()))
    bad = sorted(ambiguous & set(videos))
    if bad:
        raise EvaluationError(f"submission: video names found in several sources: {bad[:5]}")
    unknown = [v for v in videos if v not in by_name and v not in frame_counts]
    if unknown:
        raise EvaluationError(
            f"submission: {len(unknown)} listed videos have no scored frame in split {gt.split!r} and no "
            f"frame count (--frame-counts): {unknown[:5]}"
        )
    # frames per video: decoded count if known, else last scored frame + 1
    vid_of = gt.key >> 32
    last = np.searchsorted(vid_of, np.arange(table.height), side="right") - 1
    last_frame = gt.key[last] & 0xFFFFFFFF
    n_of = [frame_counts[v] if v in frame_counts else int(last_frame[by_name[v]]) + 1 for v in videos]
    parts = [np.int64(by_name[v]) * (1 << 32) + np.arange(n, dtype=np.int64) for v, n in zip(videos, n_of) if v in by_name]
    key = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    order = sort_order(key)  # listed order need not be vid order
    cols = ([ens.probs[:, j] for j in range(NUM_EXPRESSIONS)] if ens.probs is not None else []) + (
        [ens.va[:, j] for j in range(2)] if ens.va is not None else []
    )
    defaults = np.array(
        ([1.0 / NUM_EXPRESSIONS] * NUM_EXPRESSIONS if ens.probs is not None else []) + ([0.0, 0.0] if ens.va is not None else []),
        dtype=np.float32,
    )
    values = np.empty((key.shape[0], len(cols)), dtype=np.float32)
    if key.size:
        sorted_key = key if order is None else key[order]
        filled = np.empty_like(values)
        fill_columns(gt.key, None, cols, sorted_key, defaults, filled)
        if order is None:
            values = filled
        else:
            values[order] = filled
    expr = values[:, :NUM_EXPRESSIONS].argmax(axis=1) if ens.probs is not None else None
    va = np.clip(values[:, -2:], -1, 1) if ens.va is not None else None
    tasks = [t for t, x in (("EXPR", expr), ("VA", va)) if x is not None]
    for t in tasks:
        (out_dir / t).mkdir(parents=True, exist_ok=True)
    start = 0
    for v, n in zip(videos, n_of):
        if v in by_name:
            rows = slice(start, start + n)
            start += n
            e_v = expr[rows] if expr is not None else None
            va_v = va[rows] if va is not None else None
        else:
            e_v = np.zeros(n, np.int64)
            va_v = np.zeros((n, 2), np.float32)
        if e_v is not None:
            atomic.write_text(out_dir / "EXPR" / f"{v}.txt", EXPR_HEADER + "\n" + "".join(f"{c}\n" for c in e_v.tolist()))
        if va_v is not None:
            with atomic.atomic_path(out_dir / "VA" / f"{v}.txt") as tmp:
                pl.DataFrame({"valence": va_v[:, 0], "arousal": va_v[:, 1]}).write_csv(tmp, float_precision=6)
    return {"dir": str(out_dir), "tasks": tasks, "videos": len(videos), "frames": int(sum(n_of))}


def _frames(frames: list[int], few: int = 5) -> str:
    """``"frame 10"``, ``"frames 3, 4, 9"``, ``"frames 3, 4, 5, 6, 7, ... (12 in all)"``."""
    listed = ", ".join(map(str, frames[:few])) + (f", ... ({len(frames)} in all)" if len(frames) > few else "")
    return ("frame " if len(frames) == 1 else "frames ") + listed


def frame_count_mismatches(accounting: pl.DataFrame, split: str, videos: Sequence[str],
                           frame_counts: Mapping[str, int]) -> list[str]:
    """Where a submitted video's lines (one per frame of the video: its frame count, the
    container's, see ``extract.Decoding``) and its frames in the accounting of ``split`` differ,
    one line each: frames that did not decode (``unreadable_frame``; their lines are filled from
    the neighbouring frames), scored frames at or past the frame count (not submitted), and a video
    without a frame count (its lines then end at its last scored frame: a count that depends on
    which frames decoded)."""
    rows = accounting.filter((pl.col("split") == split) & pl.col("video").is_in(list(videos)))
    out = []
    for v in videos:
        mine = rows.filter(pl.col("video") == v)
        n = frame_counts.get(v)
        if n is None:
            out.append(f"{v}: no frame count; its lines end at its last scored frame, a count that depends "
                       f"on which frames decoded")
            continue
        bad = sorted(mine.filter(pl.col("reason") == "unreadable_frame")["frame"].to_list())
        if bad:
            out.append(f"{v}: {len(bad)} of its {n} frames did not decode (unreadable_frame: {_frames(bad)}); "
                       f"their lines are filled from the neighbouring frames")
        scored = mine.filter(is_scored())
        past = sorted(scored.filter(pl.col("frame") >= n)["frame"].to_list())
        if past:
            out.append(f"{v}: {len(past)} scored frames at or past its {n} frames ({_frames(past)}) "
                       f"are not in the submission")
    return out


def check_submission(
    sub_dir: str | os.PathLike, frame_counts: Mapping[str, int] | None = None, videos: Sequence[str] | None = None
) -> list[str]:
    """Problems of an ABAW3 submission directory (empty when it is fine).

    Checks, per task folder present (``EXPR``, ``VA``): the header, one line per frame of the
    video (when its count is known), values (EXPR: an integer 0..7; VA: two numbers in [-1, 1]),
    and that every listed video has a file.
    """
    sub_dir = Path(sub_dir)
    frame_counts = frame_counts or {}
    problems = []
    tasks = [t for t in ("EXPR", "VA") if (sub_dir / t).is_dir()]
    if not tasks:
        return [f"{sub_dir}: neither an EXPR nor a VA folder"]
    for task in tasks:
        header = EXPR_HEADER if task == "EXPR" else VA_HEADER
        files = sorted((sub_dir / task).glob("*.txt"))
        for name in sorted(set(videos or ()) - {f.stem for f in files}):
            problems.append(f"{task}/{name}.txt: missing")
        for f in files:
            where = f"{task}/{f.name}"
            lines = f.read_text().splitlines()
            if not lines or lines[0] != header:
                problems.append(f"{where}: first line must be {header!r}")
                continue
            body = lines[1:]
            want = frame_counts.get(f.stem)
            if want is not None and len(body) != want:
                problems.append(f"{where}: {len(body)} frame lines, the video has {want} frames")
            try:
                if task == "EXPR":
                    x = np.array(body, dtype=np.int64)
                    ok = bool(((x >= 0) & (x < NUM_EXPRESSIONS)).all())
                else:
                    x = np.array([line.split(",") for line in body], dtype=np.float64).reshape(len(body), 2)
                    ok = bool((np.abs(x) <= 1).all())
            except ValueError:
                problems.append(f"{where}: a line is not {'an integer' if task == 'EXPR' else 'two numbers'}")
                continue
            if not ok:
                problems.append(f"{where}: values outside {'0..7' if task == 'EXPR' else '[-1, 1]'}")
    return problems
