"""The ensemble on a split's frames: align each variant's predictions, fill the frames without
one, soft-vote, smooth, and score. Pure functions of arrays and frames (no files written), used by
the evaluation stage (:mod:`ferflow.evaluate`) and by the ABAW export (:mod:`ferflow.abaw`).

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
    (weights default to 1 each) and its class is the argmax of that mean (ties go to the lower
    class index). It never sums logits: summing logits lets one over-confident model dominate and is
    not an average of anything calibrated (the mistake of the method's published code, see
    ``docs/method.md``). Its valence/arousal are the mean of the variants' values (VA weights,
    default 1 each: an expression weight says nothing about a variant's VA). A variant whose file
    has null probabilities (or null VA) everywhere takes no part in that vote.

Smoothing
    Optional, per video, a centred mean over the frames within ``W // 2`` frame numbers on each
    side (W odd; the window shrinks at the ends of a video and over dropped frames), applied to the
    probabilities (then argmax) and to VA. :func:`choose_windows` picks, on the split, the best
    window of a list separately for expression (macro F1) and VA (mean CCC) of the ensemble.

Scoring
    ABAW's: macro F1 over the 8 classes and accuracy for expression, CCC of valence and of arousal
    and their mean, over all scored frames of the split concatenated (:func:`score`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import polars as pl

from . import metrics
from .labels import EXPRESSIONS, NUM_EXPRESSIONS
from .truth import (
    PROB_COLS,
    VA_COLS,
    EvaluationError,
    GroundTruth,
    check_keys,
    check_predictions,
    load_predictions,
    sort_order,
)


AUTO_WINDOWS = (1, 3, 5, 9, 15, 25, 41, 65, 101)


# --------------------------------------------------------------------------------------------
# align to the ground truth, fill


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
    frame = check_keys(pred, where)
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
    order = sort_order(key)
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


def smoothing_from(path: str | os.PathLike) -> dict[str, int]:
    """The per-task smoothing windows recorded in a metrics.json (0 when it was not smoothed):
    ``{"expr": W, "va": W}`` from its ``"smoothed"."window"``; EvaluationError naming an unreadable file."""
    try:
        block = json.loads(Path(path).read_text()).get("smoothed")
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{path}: cannot read the smoothing windows: {exc}") from exc
    if not block:
        return {"expr": 0, "va": 0}
    return {"expr": int(block["window"]["expr"]), "va": int(block["window"]["va"])}


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
