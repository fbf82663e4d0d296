"""Ground truth of an evaluation: the scored frames of one split, and checks on predictions.

Ground truth
    The ACCOUNTING rows of the split that are either ``written`` (a face crop exists) or dropped
    for ``no_face`` or ``unreadable_frame``: ABAW scores every frame of a video, including those
    where no face was found and those our decoder could not read (their predictions are filled
    from the neighbouring frames). Rows dropped for any other reason (beyond the video's end, unannotated, invalid value,
    unmapped label, ...) are not scored. A frame's expression is scored where it is not null; its
    valence/arousal where both are not null (Aff-Wild2's -5 markers were nulled upstream).

Frames are held as numpy arrays sorted by the integer key ``video_id << 32 | frame``
(:class:`GroundTruth`), which :mod:`ferflow.ensemble` and :mod:`ferflow.abaw` search with
``np.searchsorted``. Problems with the inputs raise :class:`EvaluationError`, whose message names
the file and what is wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import polars as pl

from . import schemas
from .labels import NUM_EXPRESSIONS


PROB_COLS = [f"p{i}" for i in range(NUM_EXPRESSIONS)]
VA_COLS = ["valence", "arousal"]
SCORED_REASONS = ("no_face", "unreadable_frame")  # dropped rows that are still scored (no prediction -> filled)
_FRAME_LIMIT = 1 << 31  # frames live in the low 32 bits of the sort key


def is_scored() -> pl.Expr:
    """Boolean polars expression over ACCOUNTING rows: the frame is scored (written, or dropped for
    one of :data:`SCORED_REASONS`, whose prediction is then filled); null where status and reason are."""
    return (pl.col("status") == "written") | pl.col("reason").is_in(list(SCORED_REASONS))


class EvaluationError(ValueError):
    """A problem with the evaluation's inputs; the message names the file and what is wrong."""


# --------------------------------------------------------------------------------------------
# ground truth


@dataclass
class GroundTruth:
    """The scored frames of one split, sorted by (source, video, frame), as numpy arrays."""

    split: str
    sources: list[str]  # sorted names; a source's code is its index
    video_names: list[str]  # sorted names; a video name's code is its index
    vid_table: np.ndarray  # int64 (len(sources), len(video_names)): video id, -1 when not scored
    key: np.ndarray  # int64, vid << 32 | frame, strictly increasing
    expression: np.ndarray  # int8, -1 where not scored
    va: np.ndarray  # float32 (N, 2), NaN where not scored
    expr_mask: np.ndarray  # bool: expression scored
    va_mask: np.ndarray  # bool: valence and arousal scored
    n_no_face: int  # scored frames without a face crop (no face, or the frame did not decode; always filled)

    @property
    def n(self) -> int:
        return self.key.shape[0]

    @property
    def n_videos(self) -> int:
        return int((self.vid_table >= 0).sum())

    def video_ids(self, source: pl.Series, video: pl.Series) -> np.ndarray:
        """Video id of each (source, video) pair; -1 for pairs outside the ground truth."""
        s = _codes(source, self.sources)
        v = _codes(video, self.video_names)
        known = (s >= 0) & (v >= 0)
        return np.where(known, self.vid_table[np.where(known, s, 0), np.where(known, v, 0)], -1)

    def videos(self) -> pl.DataFrame:
        """One row per scored video: vid, source, video (in vid order)."""
        s, v = np.nonzero(self.vid_table >= 0)
        order = np.argsort(self.vid_table[s, v])
        return pl.DataFrame({
            "vid": self.vid_table[s, v][order],
            "source": [self.sources[i] for i in s[order]],
            "video": [self.video_names[i] for i in v[order]],
        })

    def frame_table(self) -> pl.DataFrame:
        """The scored frames as a table: source, video, frame, expression, valence, arousal."""
        videos = self.videos()
        vid = pl.Series(self.key >> 32)
        return pl.DataFrame({
            "source": videos["source"].gather(vid),
            "video": videos["video"].gather(vid),
            "frame": self.key & 0xFFFFFFFF,
            "expression": pl.Series(np.where(self.expr_mask, self.expression, 0)).cast(pl.Int8),
            "valence": self.va[:, 0].astype(np.float32),
            "arousal": self.va[:, 1].astype(np.float32),
        }).with_columns(
            expression=pl.when(pl.Series(self.expr_mask)).then(pl.col("expression")),
            valence=pl.col("valence").fill_nan(None),
            arousal=pl.col("arousal").fill_nan(None),
        )


def _run_starts(names: pl.Series) -> np.ndarray:
    if names.len() == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(names.ne_missing(names.shift(1)).fill_null(True).to_numpy())


def _distinct(names: pl.Series) -> list[str]:
    """Sorted distinct non-null values."""
    starts = _run_starts(names)
    runs = names.gather(starts) if starts.size < names.len() // 4 else names
    return sorted(x for x in runs.unique().to_list() if x is not None)


def _codes(names: pl.Series, categories: list[str]) -> np.ndarray:
    """int64 index of each name in ``categories`` (sorted), -1 when absent or null.

    Rows usually come grouped by video, so the strings are looked up once per run of equal values.
    """
    n = names.len()
    starts = _run_starts(names)
    runs = names.gather(starts) if starts.size < n // 4 else names
    codes = runs.cast(pl.Enum(categories), strict=False).to_physical().cast(pl.Int64).fill_null(-1).to_numpy()
    if runs is names:
        return codes
    return np.repeat(codes, np.diff(np.append(starts, n)))


def check_keys(df: pl.DataFrame, where: str) -> np.ndarray:
    """The frame numbers of ``df``, after checking that no key column is null."""
    nulls = [c for c in ("source", "video", "frame") if df[c].null_count()]
    if nulls:
        raise EvaluationError(f"{where}: null values in key column(s) {nulls}")
    frame = df["frame"].to_numpy()
    _check_frames(frame, where)
    return frame


def _check_frames(frame: np.ndarray, where: str) -> None:
    if frame.size and (frame.min() < 0 or frame.max() >= _FRAME_LIMIT):
        raise EvaluationError(f"{where}: frame numbers must lie in 0..{_FRAME_LIMIT - 1}, got {frame.min()}..{frame.max()}")


def sort_order(key: np.ndarray) -> np.ndarray | None:
    """Permutation sorting ``key`` (None when it is sorted already)."""
    if key.size < 2 or bool((key[1:] >= key[:-1]).all()):
        return None
    return np.argsort(key, kind="stable")


def ground_truth_from_accounting(accounting: pl.DataFrame, split: str, where: str = "accounting") -> GroundTruth:
    """Select the scored frames of ``split`` from an ACCOUNTING table (see the module docstring)."""
    scored = (pl.col("split") == split) & is_scored()
    mask = accounting.select(scored.fill_null(False)).to_series().to_numpy()
    if not mask.any():
        present = sorted(s for s in accounting["split"].unique().to_list() if s is not None)
        n_split = accounting.filter(pl.col("split") == split).height
        raise EvaluationError(
            f"{where}: no ground-truth rows for split {split!r} (status 'written' or reason "
            f"{' or '.join(repr(r) for r in SCORED_REASONS)}); "
            f"{n_split} rows of that split in all, splits present: {present}"
        )
    rows = accounting.select(
        "frame", "expression", "valence", "arousal", no_face=pl.col("status") != "written"
    ).filter(pl.Series(mask))
    nulls = [c for c in ("source", "video", "frame")
             if accounting[c].null_count() and accounting[c].is_null().to_numpy()[mask].any()]
    if nulls:
        raise EvaluationError(f"{where}: null values in key column(s) {nulls}")
    frame = rows["frame"].to_numpy()
    _check_frames(frame, where)
    # integer codes of the names, looked up once per run of equal names (rows come grouped by video)
    sources = _distinct(accounting["source"])
    video_names = _distinct(accounting["video"])
    s = _codes(accounting["source"], sources)[mask]
    v = _codes(accounting["video"], video_names)[mask]
    pair = s * len(video_names) + v
    del s, v
    used = np.unique(pair)  # sorted: video ids follow (source, video) order
    vid_table = np.full(len(sources) * len(video_names), -1, dtype=np.int64)
    vid_table[used] = np.arange(used.size)
    key = vid_table[pair] * (1 << 32) + frame
    del pair
    vid_table = vid_table.reshape(len(sources), len(video_names))
    expr = rows["expression"].fill_null(-1).to_numpy()  # int8
    va = np.column_stack([rows[c].cast(pl.Float32).to_numpy() for c in VA_COLS])  # null -> NaN
    n_no_face = int(rows["no_face"].sum())
    del rows
    order = sort_order(key)
    if order is not None:
        key, expr, va = key[order], expr[order], va[order]
    dup = np.flatnonzero(key[1:] == key[:-1])
    if dup.size:
        k = int(key[dup[0]])
        s, v = np.argwhere(vid_table == k >> 32)[0]
        raise EvaluationError(
            f"{where}: {dup.size} duplicate scored frames in split {split!r}, "
            f"e.g. source={sources[s]!r} video={video_names[v]!r} frame={k & 0xFFFFFFFF}"
        )
    if expr.size and expr.max() >= NUM_EXPRESSIONS:
        raise EvaluationError(f"{where}: expression labels outside 0..{NUM_EXPRESSIONS - 1}")
    return GroundTruth(
        split=split,
        sources=sources,
        video_names=video_names,
        vid_table=vid_table,
        key=key,
        expression=expr,
        va=va,
        expr_mask=expr >= 0,
        va_mask=~np.isnan(va).any(axis=1),
        n_no_face=n_no_face,
    )


def load_ground_truth(path: str | os.PathLike, split: str) -> GroundTruth:
    return ground_truth_from_accounting(schemas.read_table(path, schemas.ACCOUNTING), split, where=str(path))


# --------------------------------------------------------------------------------------------
# predictions: read and check


def load_predictions(path: str | os.PathLike, split: str) -> pl.DataFrame:
    """Read one variant's PREDICTIONS and check that it is for ``split``."""
    df = schemas.read_table(path, schemas.PREDICTIONS)
    check_predictions(df, split, str(path))
    return df


def check_predictions(df: pl.DataFrame, split: str, where: str) -> None:
    if df.height == 0:
        raise EvaluationError(f"{where}: the predictions file is empty")
    if df["split"].ne_missing(split).any():
        splits = sorted(s if s is not None else "<null>" for s in df["split"].unique().to_list())
        raise EvaluationError(f"{where}: predictions for split(s) {splits}, but evaluating split {split!r}")
