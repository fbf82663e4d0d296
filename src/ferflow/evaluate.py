"""Stage 6, ``evaluate_ensemble``: fill, vote, smooth and score the variants' predictions.

``python -m ferflow.evaluate --predictions a=results/predictions/a/validation.parquet
b=results/predictions/b/validation.parquet --accounting results/accounting.parquet
--split validation --smoothing auto --out-dir results/evaluation``

Ground truth
    The ACCOUNTING rows of the split that are either ``written`` (a face crop exists) or dropped
    for ``no_face``: ABAW scores every frame of a video, including those where no face was
    found. Rows dropped for any other reason (beyond the video's end, unannotated, invalid value,
    unmapped label, ...) are not scored. A frame's expression is scored where it is not null; its
    valence/arousal where both are not null (Aff-Wild2's -5 markers were nulled upstream).

Filling
    Each variant predicts only the frames that had a face. For every ground-truth frame without a
    prediction, its class probabilities and VA are interpolated linearly, by frame number, between
    the nearest predicted frames of the same (source, video) before and after it (any predicted
    frame counts, scored or not); before the first and after the last predicted frame the nearest
    value is copied. A video with no prediction at all gets uniform probabilities and VA 0; those
    frames are counted (``n_no_video``) and reported. All of this is vectorised over a sorted
    integer key ``video_id << 32 | frame`` (``np.searchsorted``), no loop over frames or videos.

Soft voting
    The ensemble's class probabilities are the weighted mean of the variants' probabilities
    (``--weights``, default 1 each) and its class is the argmax of that mean (ties go to the lower
    class index). It never sums logits: summing logits lets one over-confident model dominate and is
    not an average of anything calibrated (the mistake of the method's published code, see
    ``shared/docs/method.md``). Its valence/arousal are the mean of the variants' values
    (``--va-weights``, default 1 each: an expression weight says nothing about a variant's VA). A
    variant whose file has null probabilities (or null VA) everywhere takes no part in that vote.

Smoothing
    Optional, per video, a centred mean over the frames within ``W // 2`` frame numbers on each
    side (W odd; the window shrinks at the ends of a video and over dropped frames), applied to the
    probabilities (then argmax) and to VA. ``--smoothing auto`` picks, on this split, the best
    window from ``--smoothing-windows`` separately for expression (macro F1) and VA (mean CCC) of
    the ensemble; a window chosen on the split it is scored on is optimistic, and ``metrics.json``
    says so (``chosen_on``). Metrics are always reported both without (top level) and with
    smoothing (``"smoothed"``).

Outputs in ``--out-dir``: ``metrics.json`` (see :func:`evaluate`), ``ensemble_{split}.parquet``
(PREDICTIONS of the ensemble on every ground-truth frame, unsmoothed; plus
``ensemble_{split}_smoothed.parquet`` when smoothing), and the plots of :mod:`ferflow.plots`.
With ``--submission-dir``, the (smoothed, when smoothing) ensemble is also written in the ABAW3
format, one file per video and task, every frame of the video (see :func:`export_submission`),
and checked (:func:`check_submission`; ``--check-submission DIR`` checks a folder on its own).
A table is printed at the end, whose last line is
``ensemble: expr_f1=0.xxx va_ccc_mean=0.xxx (valence 0.xxx, arousal 0.xxx)`` (unsmoothed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import polars as pl

from . import atomic, layout, metrics, schemas
from .labels import EXPR_HEADER, EXPRESSIONS, NUM_EXPRESSIONS, VA_HEADER

PROB_COLS = [f"p{i}" for i in range(NUM_EXPRESSIONS)]
VA_COLS = ["valence", "arousal"]
SCORED_REASONS = ("no_face",)  # dropped rows that are still scored (no prediction -> filled)
AUTO_WINDOWS = (1, 3, 5, 9, 15, 25, 41, 65, 101)
_FRAME_LIMIT = 1 << 31  # frames live in the low 32 bits of the sort key


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
    n_no_face: int  # scored frames that had no face (always filled)

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


def _check_keys(df: pl.DataFrame, where: str) -> np.ndarray:
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


def _sort_order(key: np.ndarray) -> np.ndarray | None:
    """Permutation sorting ``key`` (None when it is sorted already)."""
    if key.size < 2 or bool((key[1:] >= key[:-1]).all()):
        return None
    return np.argsort(key, kind="stable")


def ground_truth_from_accounting(accounting: pl.DataFrame, split: str, where: str = "accounting") -> GroundTruth:
    """Select the scored frames of ``split`` from an ACCOUNTING table (see the module docstring)."""
    scored = (pl.col("split") == split) & (
        (pl.col("status") == "written") | pl.col("reason").is_in(list(SCORED_REASONS))
    )
    mask = accounting.select(scored.fill_null(False)).to_series().to_numpy()
    if not mask.any():
        present = sorted(s for s in accounting["split"].unique().to_list() if s is not None)
        n_split = accounting.filter(pl.col("split") == split).height
        raise EvaluationError(
            f"{where}: no ground-truth rows for split {split!r} (status 'written' or reason 'no_face'); "
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
    order = _sort_order(key)
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
# predictions: check, align to the ground truth, fill


@dataclass
class Aligned:
    """One variant's (or the ensemble's) values on every ground-truth frame, in its order."""

    probs: np.ndarray | None  # float32 (N, 8); None when the source had no probabilities
    va: np.ndarray | None  # float32 (N, 2); None when the source had no VA
    filled: np.ndarray  # bool (N,): probabilities not predicted for this frame (interpolated)
    no_video: np.ndarray  # bool (N,): no probabilities anywhere in the video (uniform)
    filled_va: np.ndarray
    no_video_va: np.ndarray
    n_unmatched: int = 0  # prediction rows of videos outside the ground truth (ignored)


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


def interpolate_rows(
    anchor_key: np.ndarray, anchor_values: np.ndarray, key: np.ndarray, default
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values at ``key`` interpolated linearly between anchors of the same video.

    Keys are ``vid << 32 | frame``, both arrays sorted; ``anchor_values`` is (M, C). Returns
    ``(values, exact, no_video)``: ``exact`` marks keys that are anchors themselves, ``no_video``
    keys whose video has no anchor (given ``default``). Outside a video's first/last anchor the
    nearest anchor is copied.
    """
    anchor_values = np.asarray(anchor_values)
    out = np.empty((key.shape[0], anchor_values.shape[1]), dtype=anchor_values.dtype)
    columns = [anchor_values[:, j] for j in range(anchor_values.shape[1])]
    exact, no_video = fill_columns(anchor_key, None, columns, key, np.broadcast_to(default, out.shape[1:]), out)
    return out, exact, no_video


def fill_columns(
    anchor_key: np.ndarray,
    anchor_rows: np.ndarray | None,
    columns: Sequence[np.ndarray],
    key: np.ndarray,
    defaults: np.ndarray,
    out: np.ndarray,
    chunk: int = 1 << 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Fill ``out[:, j]`` at the sorted ``key`` from ``columns[j]``, interpolating between anchors.

    Anchor ``i`` (sorted ``anchor_key[i]``) is row ``anchor_rows[i]`` of the columns (``i`` when
    None), so the columns are read where they lie, never sorted or copied. Works in chunks of
    ``chunk`` keys so that its temporaries stay small. Returns ``(exact, no_video)``.
    """
    n = key.shape[0]
    m = anchor_key.shape[0]
    exact = np.zeros(n, bool)
    no_video = np.ones(n, bool)
    if m == 0:
        out[:] = defaults
        return exact, no_video
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        k = key[lo:hi]
        vid = k >> 32
        pos = np.searchsorted(anchor_key, k, side="left")
        right = np.minimum(pos, m - 1)
        left = np.maximum(pos - 1, 0)
        right_key = anchor_key[right]
        right_ok = (pos < m) & ((right_key >> 32) == vid)
        left_ok = (pos > 0) & ((anchor_key[left] >> 32) == vid)
        del pos, vid
        ex = right_ok & (right_key == k)
        only_left = np.flatnonzero(left_ok & ~right_ok)
        both = np.flatnonzero(left_ok & right_ok & ~ex)
        none = np.flatnonzero(~(left_ok | right_ok))
        lk = anchor_key[left[both]]
        w = ((k[both] - lk) / (right_key[both] - lk)).astype(out.dtype)
        if anchor_rows is not None:
            right, left = anchor_rows[right], anchor_rows[left]
        left_both = left[both]
        left_only = left[only_left]
        o = out[lo:hi]
        for j, col in enumerate(columns):
            oj = o[:, j]
            np.take(col, right, out=oj)  # exact rows and rows with only a right anchor
            oj[only_left] = col[left_only]
            lv = col[left_both]
            oj[both] = lv + (oj[both] - lv) * w
            oj[none] = defaults[j]
        exact[lo:hi] = ex
        no_video[lo:hi] = False
        no_video[lo + none] = True
    return exact, no_video


def align(gt: GroundTruth, pred: pl.DataFrame, where: str = "predictions") -> Aligned:
    """Put one variant's predictions on the ground-truth frames, filling those without one."""
    frame = _check_keys(pred, where)
    vid = gt.video_ids(pred["source"], pred["video"])
    matched = vid >= 0
    n_unmatched = int((~matched).sum())
    if not matched.any():
        sample = pred.select("source", "video").unique().head(3).rows()
        raise EvaluationError(
            f"{where}: none of its {pred.height} rows belongs to a video of the ground truth for split "
            f"{gt.split!r} (its videos include {sample}; the ground truth has {gt.n_videos} videos)"
        )
    key = vid * (1 << 32) + frame
    del vid, frame
    rows = np.flatnonzero(matched) if n_unmatched else None  # anchor i is row rows[i] of pred
    if rows is not None:
        key = key[rows]
    order = _sort_order(key)
    if order is not None:
        key = key[order]
        rows = order if rows is None else rows[order]
    del order
    dup = np.flatnonzero(key[1:] == key[:-1])
    if dup.size:
        k = int(key[dup[0]])
        s, v = np.argwhere(gt.vid_table == k >> 32)[0]
        raise EvaluationError(
            f"{where}: {dup.size} duplicate predicted frames, e.g. source={gt.sources[s]!r} "
            f"video={gt.video_names[v]!r} frame={k & 0xFFFFFFFF}"
        )
    # the columns as they lie (null -> NaN), and which rows hold a usable value
    cols = [pred[c].cast(pl.Float32).to_numpy() for c in PROB_COLS + VA_COLS]

    def usable(group: list[np.ndarray]) -> np.ndarray | None:
        """Anchors (sorted) whose values in ``group`` are all present; None when all are."""
        if not any(np.isnan(c.sum(dtype=np.float64)) for c in group):
            return None
        bad = np.zeros(pred.height, bool)
        for c in group:
            bad |= np.isnan(c)
        return ~(bad if rows is None else bad[rows])

    ok_p, ok_va = usable(cols[:NUM_EXPRESSIONS]), usable(cols[NUM_EXPRESSIONS:])
    defaults = np.array([1.0 / NUM_EXPRESSIONS] * NUM_EXPRESSIONS + [0.0, 0.0], dtype=np.float32)
    out = np.empty((gt.n, len(cols)), dtype=np.float32)

    def fill(ok: np.ndarray | None, cols_: slice):
        if ok is not None and not ok.any():
            return False, np.ones(gt.n, bool), np.ones(gt.n, bool)
        if ok is None:
            k, r = key, rows
        else:
            k = key[ok]
            r = np.flatnonzero(ok) if rows is None else rows[ok]
        exact, no_video = fill_columns(k, r, cols[cols_], gt.key, defaults[cols_], out[:, cols_])
        return True, ~exact, no_video

    same = (ok_p is None and ok_va is None) or (
        ok_p is not None and ok_va is not None and np.array_equal(ok_p, ok_va)
    )
    if same:  # the usual case: one pass for all ten columns
        has, filled, no_video = fill(ok_p, slice(None))
        if not has:
            raise EvaluationError(f"{where}: every prediction row has null probabilities and VA")
        has_va, filled_va, no_video_va = has, filled, no_video
    else:
        has, filled, no_video = fill(ok_p, slice(0, NUM_EXPRESSIONS))
        has_va, filled_va, no_video_va = fill(ok_va, slice(NUM_EXPRESSIONS, None))
    probs = out[:, :NUM_EXPRESSIONS] if has else None
    va = out[:, NUM_EXPRESSIONS:] if has_va else None
    return Aligned(probs, va, filled, no_video, filled_va, no_video_va, n_unmatched)


# --------------------------------------------------------------------------------------------
# soft voting


class SoftVote:
    """Running weighted means of probabilities and of VA; add variants one at a time."""

    def __init__(self, n: int):
        self.n = n
        self.probs = None
        self.va = None
        self.w = 0.0
        self.w_va = 0.0
        self.filled = np.zeros(n, bool)
        self.no_video = np.zeros(n, bool)
        self.filled_va = np.zeros(n, bool)
        self.no_video_va = np.zeros(n, bool)

    def add(self, a: Aligned, weight: float = 1.0, va_weight: float = 1.0) -> None:
        if a.probs is not None and weight > 0:
            self.probs = _accumulate(self.probs, a.probs, weight)
            self.w += weight
            self.filled |= a.filled
            self.no_video |= a.no_video
        if a.va is not None and va_weight > 0:
            self.va = _accumulate(self.va, a.va, va_weight)
            self.w_va += va_weight
            self.filled_va |= a.filled_va
            self.no_video_va |= a.no_video_va

    def result(self) -> Aligned:
        probs = self.probs / np.float32(self.w) if self.probs is not None else None
        va = self.va / np.float32(self.w_va) if self.va is not None else None
        return Aligned(probs, va, self.filled, self.no_video, self.filled_va, self.no_video_va)


def _accumulate(acc: np.ndarray | None, x: np.ndarray, w: float) -> np.ndarray:
    if acc is None:
        return x * np.float32(w) if w != 1 else x.copy()
    if w == 1:
        acc += x
    else:
        acc += x * np.float32(w)
    return acc


def soft_vote(
    aligned: Sequence[Aligned], weights: Sequence[float] | None = None, va_weights: Sequence[float] | None = None
) -> Aligned:
    """Weighted mean of class probabilities (argmax it for the class) and weighted mean of VA."""
    if not aligned:
        raise ValueError("soft_vote needs at least one variant")
    weights = [1.0] * len(aligned) if weights is None else list(weights)
    va_weights = [1.0] * len(aligned) if va_weights is None else list(va_weights)
    vote = SoftVote(aligned[0].filled.shape[0])
    for a, w, wv in zip(aligned, weights, va_weights, strict=True):
        vote.add(a, w, wv)
    return vote.result()


def build_ensemble(
    gt: GroundTruth,
    predictions: Mapping[str, pl.DataFrame | str | os.PathLike],
    weights: Mapping[str, float] | None = None,
    va_weights: Mapping[str, float] | None = None,
    on_variant: Callable[[str, Aligned], None] | None = None,
) -> Aligned:
    """Align each variant (a DataFrame, or a path read with :func:`load_predictions`) and vote.

    Variants are read and aligned one at a time; ``on_variant(name, aligned)`` sees each before
    it is dropped, so memory holds one variant plus the running vote.
    """
    weights = weights or {}
    va_weights = va_weights or {}
    vote = SoftVote(gt.n)
    for name, src in predictions.items():
        if isinstance(src, pl.DataFrame):
            where = f"predictions {name!r}"
            check_predictions(src, gt.split, where)
            df = src
        else:
            where = str(src)
            df = load_predictions(src, gt.split)
        a = align(gt, df, where)
        del df
        vote.add(a, weights.get(name, 1.0), va_weights.get(name, 1.0))
        if on_variant is not None:
            on_variant(name, a)
        del a
    if vote.probs is None and vote.va is None:
        raise EvaluationError("no variant contributes to the vote (all weights 0 or all values null)")
    return vote.result()


# --------------------------------------------------------------------------------------------
# smoothing


def smooth(key: np.ndarray, values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving mean within each video: frames ``f - W//2 .. f + W//2`` that are present.

    ``key`` is the sorted ``vid << 32 | frame`` of the rows of ``values``. Window 0 or 1 returns
    ``values`` unchanged; an even window is an error (it has no centre).
    """
    if window <= 1:
        return values
    if window % 2 == 0:
        raise ValueError(f"smoothing window must be odd to be centred, got {window}")
    h = window // 2
    lo = np.searchsorted(key, key - h, side="left")
    hi = np.searchsorted(key, key + h, side="right")
    count = (hi - lo).astype(np.float64)
    out = np.empty(values.shape, dtype=values.dtype)
    cs = np.zeros(key.shape[0] + 1, dtype=np.float64)
    for c in range(values.shape[1]):
        np.cumsum(values[:, c], dtype=np.float64, out=cs[1:])
        out[:, c] = (cs[hi] - cs[lo]) / count
    return out


def smoothed(gt: GroundTruth, a: Aligned, window_expr: int, window_va: int) -> Aligned:
    return Aligned(
        smooth(gt.key, a.probs, window_expr) if a.probs is not None else None,
        smooth(gt.key, a.va, window_va) if a.va is not None else None,
        a.filled, a.no_video, a.filled_va, a.no_video_va, a.n_unmatched,
    )


# --------------------------------------------------------------------------------------------
# scoring


def expression_scores(gt: GroundTruth, probs: np.ndarray | None) -> dict:
    n = int(gt.expr_mask.sum())
    if probs is None or n == 0:
        nan = float("nan")
        return {"expr_f1": nan, "expr_accuracy": nan, "expr_f1_per_class": {c: nan for c in EXPRESSIONS},
                "expr_confusion": None}
    y_true = gt.expression[gt.expr_mask]
    y_pred = probs[gt.expr_mask].argmax(axis=1)
    return {
        "expr_f1": metrics.macro_f1(y_true, y_pred),
        "expr_accuracy": metrics.accuracy(y_true, y_pred),
        "expr_f1_per_class": dict(zip(EXPRESSIONS, metrics.per_class_f1(y_true, y_pred).tolist())),
        "expr_confusion": metrics.confusion_matrix(y_true, y_pred).tolist(),
    }


def va_scores(gt: GroundTruth, va: np.ndarray | None) -> dict:
    if va is None or not gt.va_mask.any():
        nan = float("nan")
        return {"va_ccc_valence": nan, "va_ccc_arousal": nan, "va_ccc_mean": nan}
    v, a, m = metrics.va_ccc(gt.va[gt.va_mask], va[gt.va_mask])
    return {"va_ccc_valence": v, "va_ccc_arousal": a, "va_ccc_mean": m}


def score(gt: GroundTruth, a: Aligned) -> dict:
    """All metrics of one variant or the ensemble, over all scored frames concatenated (ABAW)."""
    out = {**expression_scores(gt, a.probs), **va_scores(gt, a.va)}
    out.update(
        n_frames=gt.n,
        n_expr=int(gt.expr_mask.sum()),
        n_va=int(gt.va_mask.sum()),
        n_filled=int(a.filled.sum()),
        n_no_video=int(a.no_video.sum()),
        n_filled_va=int(a.filled_va.sum()),
        n_no_video_va=int(a.no_video_va.sum()),
    )
    return out


def choose_windows(gt: GroundTruth, ens: Aligned, candidates: Sequence[int]) -> tuple[int, int, list[dict]]:
    """Best odd window for expression (macro F1) and for VA (mean CCC) of the ensemble."""
    search = []
    for w in candidates:
        s = {"window": int(w)}
        if ens.probs is not None:
            s["expr_f1"] = expression_scores(gt, smooth(gt.key, ens.probs, w))["expr_f1"]
        if ens.va is not None:
            s["va_ccc_mean"] = va_scores(gt, smooth(gt.key, ens.va, w))["va_ccc_mean"]
        search.append(s)

    def best(k: str) -> int:
        scored = [(s[k], -s["window"]) for s in search if k in s and not math.isnan(s[k])]
        return -max(scored)[1] if scored else 1

    return best("expr_f1"), best("va_ccc_mean"), search


# --------------------------------------------------------------------------------------------
# the stage


def _ensemble_frame(gt: GroundTruth, a: Aligned) -> pl.DataFrame:
    cols = {}
    for i, c in enumerate(PROB_COLS):
        cols[c] = a.probs[:, i] if a.probs is not None else pl.Series(c, [None] * gt.n, pl.Float32)
    for i, c in enumerate(VA_COLS):
        cols[c] = a.va[:, i] if a.va is not None else pl.Series(c, [None] * gt.n, pl.Float32)
    return gt.frame_table().select(pl.lit(gt.split).alias("split"), "source", "video", "frame").with_columns(
        **{k: (v if isinstance(v, pl.Series) else pl.Series(k, v)) for k, v in cols.items()}
    )


def _json_clean(x):
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _json_clean(x.item())
    return x


def dumps(result: dict) -> str:
    """JSON with two-space indents, lists of plain numbers (confusion rows) kept on one line."""
    text = json.dumps(result, indent=2, allow_nan=False)
    return re.sub(r"\[\s*([-+0-9.eE,\s]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def _log(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def evaluate(
    predictions: Mapping[str, str | os.PathLike | pl.DataFrame],
    accounting: str | os.PathLike,
    split: str = "validation",
    out_dir: str | os.PathLike = "results/evaluation",
    weights: Mapping[str, float] | None = None,
    va_weights: Mapping[str, float] | None = None,
    smoothing: int | str = 0,
    smoothing_windows: Sequence[int] = AUTO_WINDOWS,
    plots: bool = True,
    submission_dir: str | os.PathLike | None = None,
    test_list: Sequence[str] | None = None,
    frame_counts: Mapping[str, int] | None = None,
) -> dict:
    """Run the stage and return the content of ``metrics.json``.

    ``metrics.json``::

        {"split": ..., "ensemble": M, "variants": {name: M, ...},   # unsmoothed
         "smoothed": null | {"window": {"expr": We, "va": Wv}, "auto": bool, "chosen_on": split|null,
                             "search": [{"window", "expr_f1", "va_ccc_mean"}...],
                             "ensemble": M, "variants": {name: M}},
         "vote": {"weights": {...}, "va_weights": {...}, "rule": ...},
         "ground_truth": {...}, "inputs": {...}, "outputs": {...},
         "submission": null | {"dir", "tasks", "videos", "frames", "smoothed", "problems"}}

    where M holds ``expr_f1`` (macro over 8 classes), ``expr_accuracy``, ``expr_f1_per_class``
    (class name -> F1), ``expr_confusion`` (8x8 counts, rows = truth), ``va_ccc_valence``,
    ``va_ccc_arousal``, ``va_ccc_mean``, ``n_frames`` (scored frames), ``n_expr``, ``n_va``
    (frames with that label), ``n_filled`` / ``n_filled_va`` (frames without the variant's own
    prediction, interpolated) and ``n_no_video`` / ``n_no_video_va`` (frames of videos without
    any prediction, uniform / 0). Undefined numbers are null.

    Memory: one variant at a time plus the running vote (about 80 bytes per scored frame); with
    smoothing every variant's filled values are kept until the smoothed scores (40 bytes per frame
    and variant).
    """
    names = list(predictions)
    if not names:
        raise EvaluationError("no predictions given")
    weights = dict(weights or {})
    va_weights = dict(va_weights or {})
    for label, ws in (("--weights", weights), ("--va-weights", va_weights)):
        unknown = sorted(set(ws) - set(names))
        if unknown:
            raise EvaluationError(f"{label}: unknown variant(s) {unknown}; variants are {names}")
        bad = {k: v for k, v in ws.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise EvaluationError(f"{label}: weights must be finite and >= 0, got {bad}")
    weights = {n: float(weights.get(n, 1.0)) for n in names}
    va_weights = {n: float(va_weights.get(n, 1.0)) for n in names}
    if isinstance(smoothing, Mapping):  # per-task windows, e.g. those chosen on the validation split
        if set(smoothing) != {"expr", "va"} or any(
                not isinstance(w, int) or w < 0 or (w > 1 and w % 2 == 0) for w in smoothing.values()):
            raise EvaluationError(f"smoothing windows must be {{'expr': W, 'va': W}} with W 0, 1 or odd, got {smoothing!r}")
    elif isinstance(smoothing, str) and smoothing != "auto":
        raise EvaluationError(f"--smoothing must be a window in frames or 'auto', got {smoothing!r}")
    if isinstance(smoothing, int) and smoothing > 1 and smoothing % 2 == 0:
        raise EvaluationError(f"--smoothing: a centred window must be odd, got {smoothing}")
    if smoothing == "auto":
        bad = [w for w in smoothing_windows if w < 1 or w % 2 == 0]
        if bad or not smoothing_windows:
            raise EvaluationError(f"--smoothing-windows must be odd windows >= 1, got {list(smoothing_windows)}")

    out_dir = Path(out_dir)
    gt = load_ground_truth(accounting, split)
    _log(
        f"{split}: {gt.n} scored frames in {gt.n_videos} videos ({gt.n_no_face} without a face), "
        f"{int(gt.expr_mask.sum())} with expression, {int(gt.va_mask.sum())} with valence/arousal"
    )

    if isinstance(smoothing, Mapping):
        smoothing_on = max(smoothing.values()) > 1
    else:
        smoothing_on = smoothing == "auto" or smoothing > 1
    kept: dict[str, Aligned] = {}
    variant_metrics: dict[str, dict] = {}

    def on_variant(name: str, a: Aligned) -> None:
        variant_metrics[name] = score(gt, a)
        m = variant_metrics[name]
        _log(
            f"variant {name}: {m['n_filled']} frames filled ({m['n_no_video']} in videos without any "
            f"prediction), {a.n_unmatched} prediction rows outside the ground truth ignored"
        )
        if a.n_unmatched:
            _log(f"warning: variant {name} has {a.n_unmatched} predicted frames of videos not in the {split} ground truth")
        if smoothing_on:
            kept[name] = a

    ens = build_ensemble(gt, predictions, weights, va_weights, on_variant)
    ens_metrics = score(gt, ens)

    smoothed_block = None
    ens_s = None
    if smoothing_on:
        if smoothing == "auto":
            w_expr, w_va, search = choose_windows(gt, ens, smoothing_windows)
            _log(f"smoothing chosen on {split}: expression window {w_expr}, VA window {w_va}")
        elif isinstance(smoothing, Mapping):
            w_expr, w_va = int(smoothing["expr"]), int(smoothing["va"])
            search = []
        else:
            w_expr = w_va = int(smoothing)
            search = []
        ens_s = smoothed(gt, ens, w_expr, w_va)
        smoothed_block = {
            "window": {"expr": w_expr, "va": w_va},
            "auto": smoothing == "auto",
            "chosen_on": split if smoothing == "auto" else None,
            "search": search,
            "ensemble": score(gt, ens_s),
            "variants": {n: score(gt, smoothed(gt, kept.pop(n), w_expr, w_va)) for n in names},
        }

    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"metrics": str(out_dir / "metrics.json"), "ensemble": str(out_dir / f"ensemble_{split}.parquet")}
    schemas.write_table(_ensemble_frame(gt, ens), outputs["ensemble"], schemas.PREDICTIONS)
    if ens_s is not None:
        outputs["ensemble_smoothed"] = str(out_dir / f"ensemble_{split}_smoothed.parquet")
        schemas.write_table(_ensemble_frame(gt, ens_s), outputs["ensemble_smoothed"], schemas.PREDICTIONS)

    result = {
        "split": split,
        "ensemble": ens_metrics,
        "variants": variant_metrics,
        "smoothed": smoothed_block,
        "vote": {
            "weights": weights,
            "va_weights": va_weights,
            "rule": "weighted mean of class probabilities, class = argmax of the mean; weighted mean of valence/arousal",
        },
        "ground_truth": {
            "accounting": str(accounting),
            "n_frames": gt.n,
            "n_videos": gt.n_videos,
            "n_no_face": gt.n_no_face,
            "n_expr": int(gt.expr_mask.sum()),
            "n_va": int(gt.va_mask.sum()),
        },
        "inputs": {n: (str(p) if not isinstance(p, pl.DataFrame) else None) for n, p in predictions.items()},
        "outputs": outputs,
    }

    if plots:
        from . import plots as plotting

        va_pred = ens.va[gt.va_mask] if ens.va is not None else None
        outputs.update(
            {k: str(v) for k, v in plotting.plot_evaluation(result, out_dir, gt.va[gt.va_mask], va_pred).items()}
        )

    result["submission"] = None
    if submission_dir is not None:
        final = ens_s if ens_s is not None else ens
        sub = export_submission(gt, final, submission_dir, test_list, frame_counts)
        sub["smoothed"] = ens_s is not None
        sub["problems"] = check_submission(submission_dir, frame_counts, test_list)
        result["submission"] = sub
        _log(f"submission: {sub['videos']} videos, {sub['frames']} frames in {submission_dir} "
             f"({', '.join(sub['tasks'])}; {'smoothed' if sub['smoothed'] else 'unsmoothed'})")
        for problem in sub["problems"]:
            _log(f"submission problem: {problem}")

    result = _json_clean(result)
    atomic.write_text(out_dir / "metrics.json", dumps(result))
    if result["submission"] and result["submission"]["problems"]:
        raise EvaluationError(f"submission in {submission_dir} fails its check: {result['submission']['problems'][:5]}")
    return result


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
    """Frames of each video from parquet files with ``video`` and ``n_frames`` columns (FACES)."""
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

    Every frame ``0 .. n-1`` of a video gets a line, ``n`` from ``frame_counts`` (the decoded
    video) or else the last scored frame + 1: frames between or beyond the scored ones are
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
    order = _sort_order(key)  # listed order need not be vid order
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


# --------------------------------------------------------------------------------------------
# report


def _fmt(x) -> str:
    return "  -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def format_table(result: dict) -> str:
    """A readable table of every variant and the ensemble, with and without smoothing."""
    gt = result["ground_truth"]
    lines = [
        f"split {result['split']}: {gt['n_frames']} scored frames in {gt['n_videos']} videos "
        f"({gt['n_no_face']} without a face; {gt['n_expr']} with expression, {gt['n_va']} with VA)"
    ]
    names = list(result["variants"])
    width = max([len(n) for n in names] + [len("ensemble")]) + 2

    def block(title: str, variants: dict, ensemble: dict) -> None:
        lines.append("")
        lines.append(title)
        lines.append(f"{'':{width}}{'expr_f1':>8}{'acc':>8}{'valence':>9}{'arousal':>9}{'va_mean':>9}   filled (no video)")
        for n, m in [*variants.items(), ("ensemble", ensemble)]:
            lines.append(
                f"{n:{width}}{_fmt(m['expr_f1']):>8}{_fmt(m['expr_accuracy']):>8}{_fmt(m['va_ccc_valence']):>9}"
                f"{_fmt(m['va_ccc_arousal']):>9}{_fmt(m['va_ccc_mean']):>9}   {m['n_filled']} ({m['n_no_video']})"
            )

    block("without smoothing", result["variants"], result["ensemble"])
    s = result.get("smoothed")
    if s:
        how = f"chosen on {s['chosen_on']}" if s["auto"] else "fixed"
        block(f"smoothed (window: expression {s['window']['expr']}, VA {s['window']['va']}; {how})",
              s["variants"], s["ensemble"])
        lines.append("")
        for k in ("expr_f1", "va_ccc_mean"):
            lines.append(f"smoothing changes ensemble {k} {_fmt(result['ensemble'][k])} -> {_fmt(s['ensemble'][k])}")
    e = result["ensemble"]
    lines.append("")
    lines.append(
        f"ensemble: expr_f1={_fmt(e['expr_f1'])} va_ccc_mean={_fmt(e['va_ccc_mean'])} "
        f"(valence {_fmt(e['va_ccc_valence'])}, arousal {_fmt(e['va_ccc_arousal'])})"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI


def _pairs(items: Sequence[str] | None, what: str, convert=str) -> dict:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise EvaluationError(f"{what}: expected NAME=VALUE, got {item!r}")
        if name in out:
            raise EvaluationError(f"{what}: variant {name!r} given twice")
        try:
            out[name] = convert(value)
        except ValueError:
            raise EvaluationError(f"{what}: {item!r}: {value!r} is not a number") from None
    return out


def smoothing_from(path: str | os.PathLike) -> dict[str, int]:
    """The per-task smoothing windows recorded in a metrics.json (0 when it was not smoothed)."""
    try:
        block = json.loads(Path(path).read_text()).get("smoothed")
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{path}: cannot read the smoothing windows: {exc}") from exc
    if not block:
        return {"expr": 0, "va": 0}
    return {"expr": int(block["window"]["expr"]), "va": int(block["window"]["va"])}


def _smoothing_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        w = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a window in frames (odd, 0 = off) or 'auto', got {value!r}") from None
    if w < 0 or (w > 1 and w % 2 == 0):
        raise argparse.ArgumentTypeError(f"a centred window must be 0, 1 or odd, got {w}")
    return w


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ferflow.evaluate",
        description="Fill, soft-vote, smooth and score the variants' predictions against the ground truth.",
    )
    p.add_argument("--predictions", nargs="+", metavar="NAME=PATH",
                   help="one PREDICTIONS parquet per variant")
    p.add_argument("--weights", nargs="*", metavar="NAME=W",
                   help="weights of the class-probability vote (default 1; unnamed variants get 1)")
    p.add_argument("--va-weights", nargs="*", metavar="NAME=W",
                   help="weights of the valence/arousal mean (default 1; unnamed variants get 1)")
    p.add_argument("--accounting", help="ACCOUNTING parquet (the ground truth)")
    p.add_argument("--split", default="validation")
    p.add_argument("--smoothing", type=_smoothing_arg, default=0, metavar="W|auto",
                   help="centred mean window in frames (odd; 0 = off) or 'auto' to choose it on this split")
    p.add_argument("--smoothing-from", metavar="METRICS_JSON",
                   help="use the windows recorded in another evaluation's metrics.json (e.g. chosen on the "
                        "validation split, for a test split without labels); overrides --smoothing")
    p.add_argument("--smoothing-windows", default=",".join(map(str, AUTO_WINDOWS)), metavar="W,W,...",
                   help="candidate windows for --smoothing auto (default %(default)s)")
    p.add_argument("--out-dir", default="results/evaluation")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    sub = p.add_argument_group("submission (ABAW3 format)")
    sub.add_argument("--submission-dir", help="write EXPR/{video}.txt and VA/{video}.txt here (smoothed when smoothing)")
    sub.add_argument("--test-list", help="videos to export, one name a line (default: every video of the split)")
    sub.add_argument("--frame-counts", nargs="+", metavar="PARQUET",
                     help="tables with video and n_frames (FACES) giving each video's real frame count")
    sub.add_argument("--check-submission", metavar="DIR",
                     help="only check an existing submission folder (with --frame-counts / --test-list)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.check_submission is None and (not args.predictions or not args.accounting):
        parser.error("--predictions and --accounting are required (unless --check-submission)")
    try:
        test_list = read_test_list(args.test_list) if args.test_list else None
        frame_counts = read_frame_counts(args.frame_counts) if args.frame_counts else None
        if args.check_submission is not None:
            problems = check_submission(args.check_submission, frame_counts, test_list)
            for problem in problems:
                print(problem)
            print(f"{args.check_submission}: {'OK' if not problems else f'{len(problems)} problems'}")
            return 1 if problems else 0
        predictions = _pairs(args.predictions, "--predictions")
        weights = _pairs(args.weights, "--weights", float)
        va_weights = _pairs(args.va_weights, "--va-weights", float)
        try:
            windows = [int(w) for w in args.smoothing_windows.split(",") if w.strip()]
        except ValueError:
            raise EvaluationError(f"--smoothing-windows: not a list of integers: {args.smoothing_windows!r}") from None
        smoothing = args.smoothing if args.smoothing_from is None else smoothing_from(args.smoothing_from)
        result = evaluate(
            predictions, args.accounting, split=args.split, out_dir=args.out_dir, weights=weights,
            va_weights=va_weights, smoothing=smoothing, smoothing_windows=windows, plots=not args.no_plots,
            submission_dir=args.submission_dir, test_list=test_list, frame_counts=frame_counts,
        )
    except (EvaluationError, schemas.SchemaError, FileNotFoundError) as exc:
        print(f"ferflow.evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
