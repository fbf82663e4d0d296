"""The ensemble evaluation stage: ground truth, filling, soft voting, smoothing, ABAW conventions,
and the CLI end to end on small parquet files written with ``schemas.write_table``."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import sklearn.metrics as sklearn_metrics  # a test dependency: never skipped

import ferflow
from ferflow import abaw, ensemble, evaluate, metrics, schemas, truth
from ferflow.labels import EXPR_HEADER, EXPRESSIONS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAST_LINE = re.compile(
    r"^ensemble: expr_f1=(\d\.\d{3}) va_ccc_mean=(-?\d\.\d{3}) \(valence (-?\d\.\d{3}), arousal (-?\d\.\d{3})\)$"
)


def reference_ccc(x, y) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).mean()
    return 2 * cov / (((x - mx) ** 2).mean() + ((y - my) ** 2).mean() + (mx - my) ** 2)


def accounting(rows) -> pl.DataFrame:
    """ACCOUNTING rows from dicts (source, split, status, reason, labels default sensibly)."""
    full = []
    for r in rows:
        r = {"source": "aw", "split": "validation", "expression": None, "valence": None, "arousal": None,
             "status": "written", "reason": None, "key": None, "expr_fate": None, "va_fate": None, **r}
        full.append(r)
    return schemas.conform(pl.DataFrame(full, schema_overrides=schemas.ACCOUNTING), schemas.ACCOUNTING, "test")


def predictions(video, frames, probs, va, source="aw", split="validation") -> pl.DataFrame:
    probs = np.asarray(probs, dtype=np.float32).reshape(len(frames), 8)
    va = np.asarray(va, dtype=np.float32).reshape(len(frames), 2)
    df = pl.DataFrame({
        "split": [split] * len(frames), "source": [source] * len(frames),
        "video": [video] * len(frames) if isinstance(video, str) else list(video),
        "frame": np.asarray(frames, dtype=np.int64),
        **{f"p{i}": probs[:, i] for i in range(8)},
        "valence": va[:, 0], "arousal": va[:, 1],
    })
    return schemas.conform(df, schemas.PREDICTIONS, "test")


def onehot(i, n=8):
    v = np.zeros(n)
    v[i] = 1
    return v


def softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


# ------------------------------------------------------------------------------------------------
# ground truth


def test_ground_truth_scores_written_and_no_face_frames_only():
    acc = accounting([
        {"video": "v", "frame": 0, "expression": 1, "valence": 0.1, "arousal": 0.2},
        {"video": "v", "frame": 1, "expression": 2, "valence": 0.3, "arousal": 0.4, "status": "dropped", "reason": "no_face"},
        {"video": "v", "frame": 2, "expression": 3, "status": "dropped", "reason": "beyond_video_end"},
        {"video": "v", "frame": 3, "status": "dropped", "reason": "unannotated"},
        {"video": "v", "frame": 4, "status": "dropped", "reason": "invalid_value"},
        {"video": "v", "frame": 5, "status": "dropped", "reason": "unmapped_label"},
        {"video": "v", "frame": 6, "valence": 0.5, "arousal": -0.5},  # VA only: no expression
        {"video": "v", "frame": 7, "expression": 0, "valence": 0.5},  # arousal missing: no VA
        {"video": "v", "frame": 8, "expression": 5, "status": "dropped", "reason": "unreadable_frame"},  # scored, filled
        {"video": "w", "frame": 0, "expression": 4, "split": "train"},
    ])
    gt = truth.ground_truth_from_accounting(acc, "validation")
    table = gt.frame_table()
    assert table["frame"].to_list() == [0, 1, 6, 7, 8]
    assert table["expression"].to_list() == [1, 2, None, 0, 5]
    assert table["arousal"].to_list() == pytest.approx([0.2, 0.4, -0.5, None, None])
    assert gt.n_no_face == 2
    assert gt.expr_mask.tolist() == [True, True, False, True, True]
    assert gt.va_mask.tolist() == [True, True, True, False, False]
    assert gt.expression[gt.expr_mask].tolist() == [1, 2, 0, 5]


def test_ground_truth_errors_name_the_problem():
    acc = accounting([{"video": "v", "frame": 0, "expression": 1}])
    with pytest.raises(truth.EvaluationError, match=r"acc\.parquet: no ground-truth rows for split 'test'.*validation"):
        truth.ground_truth_from_accounting(acc, "test", where="acc.parquet")
    dup = accounting([{"video": "v", "frame": 3, "expression": 1}, {"video": "v", "frame": 3, "expression": 2}])
    with pytest.raises(truth.EvaluationError, match="duplicate scored frames.*video='v' frame=3"):
        truth.ground_truth_from_accounting(dup, "validation")


# ------------------------------------------------------------------------------------------------
# filling


def test_fill_interpolates_by_frame_copies_ends_and_gives_empty_videos_uniform():
    rows = [{"video": "A", "frame": f, "expression": 0} for f in range(10)]
    rows += [{"video": "B", "frame": f, "expression": 0, "status": "dropped", "reason": "no_face"} for f in range(4)]
    rows += [{"video": "C", "frame": f, "expression": 0} for f in (0, 10, 20)]
    gt = truth.ground_truth_from_accounting(accounting(rows), "validation")
    # A: predicted at 2, 5 and 12 (12 is not scored but still anchors frames 6..9); C: only at 10
    pred = pl.concat([
        predictions("A", [12, 2, 5], [onehot(2), onehot(0), onehot(1)], [[1, 1], [0, 0], [0.3, -0.6]]),
        predictions("C", [10], [onehot(3)], [[0.5, 0.5]]),
    ])
    a = ensemble.align(gt, pred)

    expected_p = []
    expected_va = []
    for f in range(10):  # video A, by hand
        if f <= 2:
            p, va = onehot(0), [0, 0]
        elif f <= 5:
            w = (f - 2) / 3
            p, va = (1 - w) * onehot(0) + w * onehot(1), [0.3 * w, -0.6 * w]
        else:
            w = (f - 5) / 7
            p, va = (1 - w) * onehot(1) + w * onehot(2), [0.3 + 0.7 * w, -0.6 + 1.6 * w]
        expected_p.append(p)
        expected_va.append(va)
    expected_p += [np.full(8, 1 / 8)] * 4  # B: no prediction at all
    expected_va += [[0, 0]] * 4
    expected_p += [onehot(3)] * 3  # C: one prediction, copied both ways
    expected_va += [[0.5, 0.5]] * 3
    np.testing.assert_allclose(a.probs, np.array(expected_p), atol=1e-6)
    np.testing.assert_allclose(a.va, np.array(expected_va), atol=1e-6)
    np.testing.assert_allclose(a.probs.sum(axis=1), 1, atol=1e-6)
    exact = [2, 5, 15]  # rows with their own prediction: A frames 2 and 5, C frame 10
    assert np.flatnonzero(~a.filled).tolist() == exact
    assert a.filled.sum() == 14
    assert np.flatnonzero(a.no_video).tolist() == [10, 11, 12, 13]
    assert a.n_unmatched == 0


def test_fill_uses_separate_anchors_for_null_va_and_reports_unmatched_rows():
    gt = truth.ground_truth_from_accounting(
        accounting([{"video": "A", "frame": f, "expression": 0} for f in range(3)]), "validation"
    )
    pred = predictions("A", [0, 2], [onehot(0), onehot(1)], [[0.2, 0.2], [0.4, 0.4]])
    pred = pred.with_columns(valence=pl.when(pl.col("frame") == 2).then(None).otherwise(pl.col("valence")))
    pred = pl.concat([pred, predictions("elsewhere", [0], [onehot(5)], [[0, 0]])])
    a = ensemble.align(gt, pred)
    np.testing.assert_allclose(a.probs[1], (onehot(0) + onehot(1)) / 2, atol=1e-6)
    np.testing.assert_allclose(a.va, [[0.2, 0.2]] * 3, atol=1e-6)  # frame 2's VA is null: not an anchor
    assert a.filled.tolist() == [False, True, False]
    assert a.filled_va.tolist() == [False, True, True]
    assert a.n_unmatched == 1


@pytest.mark.parametrize("seed", range(3))
def test_fill_matches_a_per_video_np_interp_reference_on_shuffled_input(seed):
    rng = np.random.default_rng(seed)
    rows, parts, expected = [], [], {}
    for s_i, source in enumerate(("aw", "bb")):
        for v in range(4):
            video = f"vid{v}"
            n = int(rng.integers(5, 60))
            gt_frames = np.sort(rng.choice(n + 10, size=n, replace=False))
            rows += [{"source": source, "video": video, "frame": int(f), "expression": 0} for f in gt_frames]
            if v == 3 and s_i == 1:
                expected[(source, video)] = (gt_frames, None)  # no prediction in this video
                continue
            pf = np.sort(rng.choice(n + 10, size=int(rng.integers(1, n)), replace=False))
            vals = rng.random((pf.size, 10)).astype(np.float32)
            parts.append(predictions(video, pf, vals[:, :8], vals[:, 8:], source=source))
            expected[(source, video)] = (gt_frames, (pf, vals))
    parts.append(predictions("not-scored", [0, 1], np.ones((2, 8)), np.zeros((2, 2))))
    pred = pl.concat(parts)
    pred = pred[rng.permutation(pred.height)]  # any row order
    gt = truth.ground_truth_from_accounting(accounting(rows), "validation")
    a = ensemble.align(gt, pred)
    want, want_filled = [], []
    for key in sorted(expected):  # (source, video) order, as the ground truth is sorted
        f, p = expected[key]
        if p is None:
            want.append(np.tile(np.r_[np.full(8, 1 / 8), 0, 0], (f.size, 1)))
            want_filled.append(np.ones(f.size, bool))
        else:
            want.append(np.column_stack([np.interp(f, p[0], p[1][:, j]) for j in range(10)]))
            want_filled.append(~np.isin(f, p[0]))
    np.testing.assert_allclose(np.c_[a.probs, a.va], np.concatenate(want), atol=1e-6)
    assert a.filled.tolist() == np.concatenate(want_filled).tolist()
    assert a.n_unmatched == 2
    # chunking changes nothing
    key = np.sort(rng.choice(1 << 20, 300, replace=False)).astype(np.int64) + (np.arange(300) // 100 << 32)
    ak = np.sort(rng.choice(key, 40, replace=False))
    av = rng.random((40, 3)).astype(np.float32)
    outs = []
    for chunk in (7, 1000):
        out = np.empty((300, 3), np.float32)
        ex, nv = ensemble.fill_columns(ak, None, [av[:, j] for j in range(3)], key, np.zeros(3, np.float32), out, chunk)
        outs.append((out, ex, nv))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    np.testing.assert_array_equal(outs[0][2], outs[1][2])
    values, exact, no_video = ensemble.interpolate_rows(ak, av, key, np.zeros(3, np.float32))
    np.testing.assert_array_equal(values, outs[0][0])
    assert exact.sum() == 40  # every anchor is one of the keys
    np.testing.assert_array_equal(no_video, outs[0][2])


def test_align_rejects_duplicates_and_foreign_videos():
    gt = truth.ground_truth_from_accounting(accounting([{"video": "A", "frame": 0, "expression": 0}]), "validation")
    dup = predictions("A", [0, 0], [onehot(0), onehot(1)], [[0, 0], [0, 0]])
    with pytest.raises(truth.EvaluationError, match="x.parquet: 1 duplicate predicted frames"):
        ensemble.align(gt, dup, "x.parquet")
    foreign = predictions("Z", [0], [onehot(0)], [[0, 0]])
    with pytest.raises(truth.EvaluationError, match="x.parquet: none of its 1 rows belongs to a video"):
        ensemble.align(gt, foreign, "x.parquet")


# ------------------------------------------------------------------------------------------------
# soft voting


def _gt_one_frame(n=1):
    return truth.ground_truth_from_accounting(
        accounting([{"video": "A", "frame": f, "expression": 1, "valence": 0.0, "arousal": 0.0} for f in range(n)]),
        "validation",
    )


def test_soft_vote_averages_probabilities_not_logits():
    logits_a = np.array([1.0, 0, 0, 0, 0, 0, 0, 0])
    logits_b = np.array([0.0, 0.5, -20, -20, -20, -20, -20, -20])
    # summing logits (the published code's "soft voting") picks class 0 ...
    assert np.argmax(logits_a + logits_b) == 0
    gt = _gt_one_frame()
    va = ensemble.align(gt, predictions("A", [0], softmax(logits_a), [[0.2, -0.4]]))
    vb = ensemble.align(gt, predictions("A", [0], softmax(logits_b), [[0.6, 0.0]]))
    ens = ensemble.soft_vote([va, vb])
    # ... the mean of the probabilities, by hand, picks class 1
    e = np.e
    p0 = (e / (e + 7) + 1 / (1 + np.exp(0.5) + 6 * np.exp(-20))) / 2
    p1 = (1 / (e + 7) + np.exp(0.5) / (1 + np.exp(0.5) + 6 * np.exp(-20))) / 2
    assert ens.probs[0, 0] == pytest.approx(p0, abs=1e-6)
    assert ens.probs[0, 1] == pytest.approx(p1, abs=1e-6)
    assert p1 > p0 and np.argmax(ens.probs[0]) == 1
    assert ens.probs.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(ens.va[0], [0.4, -0.2], atol=1e-6)


def test_weighted_vote_weights_probabilities_and_va_separately():
    gt = _gt_one_frame(2)
    pa = np.array([onehot(0) * 0.8 + onehot(2) * 0.2, onehot(1)])
    pb = np.array([onehot(2), onehot(3) * 0.5 + onehot(1) * 0.5])
    preds = {
        "a": predictions("A", [0, 1], pa, [[1.0, 0.0], [0.0, 1.0]]),
        "b": predictions("A", [0, 1], pb, [[0.0, 0.0], [0.0, 0.0]]),
    }
    ens = ensemble.build_ensemble(gt, preds, weights={"a": 3.0, "b": 1.0}, va_weights={"a": 1.0, "b": 3.0})
    np.testing.assert_allclose(ens.probs, (3 * pa + pb) / 4, atol=1e-6)
    # by hand: p0 = 3 * 0.8 / 4 = 0.6, p2 = (3 * 0.2 + 1) / 4 = 0.4: the weights flip the class
    assert ens.probs[0, 0] == pytest.approx(0.6) and ens.probs[0, 2] == pytest.approx(0.4)
    assert ens.probs[0].argmax() == 0
    np.testing.assert_allclose(ens.va, [[0.25, 0.0], [0.0, 0.25]], atol=1e-6)
    # unweighted: plain means
    plain = ensemble.build_ensemble(gt, preds)
    np.testing.assert_allclose(plain.probs, (pa + pb) / 2, atol=1e-6)
    assert plain.probs[0].argmax() == 2
    # a zero weight drops a variant from that vote only
    only_a = ensemble.build_ensemble(gt, preds, weights={"b": 0.0})
    np.testing.assert_allclose(only_a.probs, pa, atol=1e-6)
    np.testing.assert_allclose(only_a.va, [[0.5, 0.0], [0.0, 0.5]], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# smoothing


def test_smoothing_is_a_centred_mean_within_each_video_by_frame_number():
    vid = np.array([0, 0, 0, 0, 1, 1, 1])
    frame = np.array([0, 1, 2, 3, 0, 1, 3])  # video 1 lacks frame 2
    key = vid.astype(np.int64) * (1 << 32) + frame
    x = np.array([0, 3, 6, 9, 10, 20, 40], dtype=np.float32)[:, None]
    np.testing.assert_allclose(ensemble.smooth(key, x, 3)[:, 0], [1.5, 3, 6, 7.5, 15, 15, 40])
    np.testing.assert_allclose(ensemble.smooth(key, x, 5)[:, 0], [3, 4.5, 4.5, 6, 15, 70 / 3, 30], rtol=1e-6)
    assert ensemble.smooth(key, x, 1) is x
    assert ensemble.smooth(key, x, 0) is x
    with pytest.raises(ValueError, match="odd"):
        ensemble.smooth(key, x, 4)


def test_choose_windows_prefers_the_best_and_then_the_smallest():
    # truth alternates in blocks of 10 frames; predictions are the truth with isolated flips
    n = 200
    true_class = (np.arange(n) // 10) % 2
    rows = [{"video": "A", "frame": f, "expression": int(t), "valence": float(t), "arousal": 0.0 if f % 2 else 1.0}
            for f, t in enumerate(true_class)]
    gt = truth.ground_truth_from_accounting(accounting(rows), "validation")
    flip = true_class.copy()
    flip[5::10] = 1 - flip[5::10]
    probs = np.array([onehot(int(c)) * 0.8 + 0.1 * onehot(1 - int(c)) + 0.1 * onehot(7) for c in flip])
    ens = ensemble.align(gt, predictions("A", range(n), probs, np.c_[true_class, np.zeros(n)]))
    w_expr, w_va, search = ensemble.choose_windows(gt, ens, (1, 3, 5, 41))
    by_w = {s["window"]: s for s in search}
    assert by_w[3]["expr_f1"] > by_w[1]["expr_f1"]
    assert by_w[3]["expr_f1"] == by_w[5]["expr_f1"]  # tie: the smaller window wins
    assert w_expr == 3
    assert w_va in (1, 3, 5, 41) and by_w[w_va]["va_ccc_mean"] == max(s["va_ccc_mean"] for s in search)


# ------------------------------------------------------------------------------------------------
# ABAW conventions


def test_scores_concatenate_all_videos_and_exclude_invalid_frames():
    rng = np.random.default_rng(7)
    rows, pa, frames_by_video = [], [], {}
    truth_va, pred_va, truth_e, pred_e = [], [], [], []
    for v, (scale, shift, n) in {"short": (0.2, 0.5, 30), "long": (1.0, -0.3, 120)}.items():
        t = np.clip(shift + scale * rng.uniform(-1, 1, (n, 2)), -1, 1)
        p = t + rng.normal(0, 0.3, (n, 2))
        e = rng.integers(0, 2 if v == "short" else 8, n)  # few classes in the short video
        pe = np.where(rng.random(n) < 0.6, e, rng.integers(0, 8, n))
        for f in range(n):
            rows.append({"video": v, "frame": f, "expression": int(e[f]), "valence": t[f, 0], "arousal": t[f, 1]})
        truth_va.append(t)
        pred_va.append(p)
        truth_e.append(e)
        pred_e.append(pe)
        frames_by_video[v] = n
        pa.append(predictions(v, range(n), np.eye(8)[pe], p))
        # invalid / unannotated / beyond-the-end rows with wild predictions: never scored
        for k, reason in enumerate(("invalid_value", "unannotated", "beyond_video_end")):
            f = n + 5 + k
            rows.append({"video": v, "frame": f, "status": "dropped", "reason": reason,
                         "expression": 0 if reason == "beyond_video_end" else None})
            pa.append(predictions(v, [f], onehot(7), [[-1, 1]]))
    gt = truth.ground_truth_from_accounting(accounting(rows), "validation")
    m = ensemble.score(gt, ensemble.align(gt, pl.concat(pa)))

    t, p = np.concatenate(truth_va), np.concatenate(pred_va)
    e, pe = np.concatenate(truth_e), np.concatenate(pred_e)
    concat_v = reference_ccc(t[:, 0], p[:, 0])
    concat_a = reference_ccc(t[:, 1], p[:, 1])
    assert m["va_ccc_valence"] == pytest.approx(concat_v, abs=1e-5)
    assert m["va_ccc_arousal"] == pytest.approx(concat_a, abs=1e-5)
    assert m["va_ccc_mean"] == pytest.approx((concat_v + concat_a) / 2, abs=1e-5)
    f1 = sklearn_metrics.f1_score(e, pe, average="macro", labels=range(8), zero_division=0)
    assert m["expr_f1"] == pytest.approx(f1, abs=1e-12)
    assert m["n_expr"] == m["n_va"] == m["n_frames"] == 150
    # averaging per video gives different numbers: the construction really tells them apart
    per_video_v = np.mean([reference_ccc(tv[:, 0], pv[:, 0]) for tv, pv in zip(truth_va, pred_va)])
    per_video_f1 = np.mean([metrics.macro_f1(a, b) for a, b in zip(truth_e, pred_e)])
    assert abs(per_video_v - concat_v) > 0.05
    assert abs(per_video_f1 - f1) > 0.1


# ------------------------------------------------------------------------------------------------
# the CLI end to end


def _write_dataset(tmp_path: Path, seed: int = 0):
    """Accounting + two variants' predictions; returns paths and an independent reference."""
    rng = np.random.default_rng(seed)
    rows = []
    videos = {"v0": 80, "v1": 60, "v2": 25}
    for v, n in videos.items():
        expr = np.repeat(rng.integers(0, 8, n // 10 + 1), 10)[:n]
        val = 0.7 * np.sin(np.arange(n) / 9 + len(v))
        aro = 0.5 * np.cos(np.arange(n) / 13)
        for f in range(n):
            r = {"video": v, "frame": f, "expression": int(expr[f]), "valence": float(val[f]), "arousal": float(aro[f])}
            u = rng.random()
            if v == "v2":  # no face anywhere in this video
                r.update(status="dropped", reason="no_face")
            elif u < 0.12:
                r.update(status="dropped", reason="no_face")
            elif u < 0.17:
                r.update(status="dropped", reason="invalid_value", valence=None, arousal=None)
            elif u < 0.22:
                r.update(status="dropped", reason="unannotated", expression=None, valence=None, arousal=None)
            elif u < 0.27:
                r["expression"] = None  # VA-only frame
            rows.append(r)
        rows.append({"video": v, "frame": n + 3, "expression": 1, "status": "dropped", "reason": "beyond_video_end"})
    rows.append({"video": "t0", "frame": 0, "split": "test", "status": "written"})
    acc = accounting(rows)
    acc_path = tmp_path / "accounting.parquet"
    schemas.write_table(acc, acc_path, schemas.ACCOUNTING)

    # predictions: every frame with a face, plus the unannotated / invalid ones (still predicted)
    predicted = acc.filter(
        (pl.col("split") == "validation") & ((pl.col("status") == "written") | pl.col("reason").is_in(["unannotated", "invalid_value"]))
    ).sort("video", "frame")
    n = predicted.height
    paths, raw = {}, {}
    for name, noise in (("a", 1.0), ("b", 1.4)):
        labels = predicted["expression"].fill_null(0).to_numpy()
        logits = rng.normal(0, noise, (n, 8))
        logits[np.arange(n), labels] += 1.6
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        va = np.c_[predicted["valence"].fill_null(0).to_numpy(), predicted["arousal"].fill_null(0).to_numpy()]
        va = va + rng.normal(0, 0.25 * noise, (n, 2))
        df = predictions(predicted["video"].to_list(), predicted["frame"].to_numpy(), p, va)
        paths[name] = tmp_path / f"pred_{name}.parquet"
        schemas.write_table(df, paths[name], schemas.PREDICTIONS)
        raw[name] = df
    return acc_path, paths, raw, acc


def _reference(acc: pl.DataFrame, raw: dict, window: int = 1):
    """Ensemble metrics by an independent, loop-based route: np.interp per video and column."""
    gt = acc.filter(
        (pl.col("split") == "validation") & ((pl.col("status") == "written") | (pl.col("reason") == "no_face"))
    ).sort("video", "frame")
    cols = [f"p{i}" for i in range(8)] + ["valence", "arousal"]
    filled = {}
    for name, df in raw.items():
        parts = []
        for v in gt["video"].unique(maintain_order=True).to_list():
            f = gt.filter(pl.col("video") == v)["frame"].to_numpy()
            pv = df.filter(pl.col("video") == v).sort("frame")
            if pv.height == 0:
                parts.append(np.c_[np.full((f.size, 8), 1 / 8), np.zeros((f.size, 2))])
                continue
            vals = np.column_stack([np.interp(f, pv["frame"].to_numpy(), pv[c].to_numpy().astype(np.float64)) for c in cols])
            if window > 1:
                h = window // 2
                vals = np.array([vals[(f >= fi - h) & (f <= fi + h)].mean(axis=0) for fi in f])
            parts.append(vals)
        filled[name] = np.concatenate(parts)
    out = {}
    for name, x in {**filled, "ensemble": np.mean(list(filled.values()), axis=0)}.items():
        e = gt["expression"].to_numpy()
        ok = ~np.isnan(e.astype(float)) if e.dtype.kind == "f" else gt["expression"].is_not_null().to_numpy()
        y_true = gt["expression"].filter(pl.Series(ok)).to_numpy()
        y_pred = x[ok, :8].argmax(axis=1)
        va_ok = (gt["valence"].is_not_null() & gt["arousal"].is_not_null()).to_numpy()
        v = reference_ccc(gt["valence"].to_numpy()[va_ok], x[va_ok, 8])
        a = reference_ccc(gt["arousal"].to_numpy()[va_ok], x[va_ok, 9])
        out[name] = {
            "expr_f1": sklearn_metrics.f1_score(y_true, y_pred, average="macro", labels=range(8), zero_division=0),
            "expr_accuracy": sklearn_metrics.accuracy_score(y_true, y_pred),
            "va_ccc_valence": v, "va_ccc_arousal": a, "va_ccc_mean": (v + a) / 2,
            "n_expr": int(ok.sum()), "n_va": int(va_ok.sum()), "n_frames": gt.height,
        }
    return out, gt


def _assert_close(got: dict, want: dict):
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=2e-5), k


def test_cli_end_to_end(tmp_path, capsys):
    acc_path, paths, raw, acc = _write_dataset(tmp_path)
    out = tmp_path / "evaluation"
    rc = evaluate.main([
        "--predictions", f"a={paths['a']}", f"b={paths['b']}", "--accounting", str(acc_path),
        "--split", "validation", "--smoothing", "5", "--out-dir", str(out),
    ])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads((out / "metrics.json").read_text())

    # the keys of the first issue, unsmoothed at the top level
    required = {"expr_f1", "va_ccc_valence", "va_ccc_arousal", "va_ccc_mean"}
    assert required <= set(result["ensemble"])
    assert set(result["variants"]) == {"a", "b"}
    for m in result["variants"].values():
        assert required <= set(m)
    want, gt = _reference(acc, raw)
    _assert_close(result["ensemble"], want["ensemble"])
    for name in ("a", "b"):
        _assert_close(result["variants"][name], want[name])
    ens = result["ensemble"]
    assert list(ens["expr_f1_per_class"]) == list(EXPRESSIONS)
    assert ens["expr_f1"] == pytest.approx(np.mean(list(ens["expr_f1_per_class"].values())))
    assert np.array(ens["expr_confusion"]).sum() == ens["n_expr"]
    n_no_face = gt.filter(pl.col("status") == "dropped").height
    assert result["ground_truth"]["n_no_face"] == n_no_face
    assert result["variants"]["a"]["n_filled"] == n_no_face  # exactly the frames without a face
    assert result["variants"]["a"]["n_no_video"] == 25  # all of v2
    assert ens["expr_f1"] > max(m["expr_f1"] for m in result["variants"].values())  # the vote helps here

    # smoothed block: same structure, against the reference with a 5-frame window
    s = result["smoothed"]
    assert s["window"] == {"expr": 5, "va": 5} and s["auto"] is False
    want_s, _ = _reference(acc, raw, window=5)
    _assert_close(s["ensemble"], want_s["ensemble"])
    _assert_close(s["variants"]["b"], want_s["b"])

    # outputs: the ensemble's per-frame predictions and three valid PNGs
    table = schemas.read_table(out / "ensemble_validation.parquet", schemas.PREDICTIONS)
    assert table.height == gt.height and set(table["split"].to_list()) == {"validation"}
    assert (out / "ensemble_validation_smoothed.parquet").is_file()
    import matplotlib.image

    for name in ("confusion.png", "f1_per_class.png", "va_hist.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    # the table, ending with the ensemble line (unsmoothed, as in metrics.json)
    lines = captured.out.strip().splitlines()
    assert any(line.startswith("smoothed (window: expression 5, VA 5") for line in lines)
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    got = [float(x) for x in match.groups()]
    expect = [ens["expr_f1"], ens["va_ccc_mean"], ens["va_ccc_valence"], ens["va_ccc_arousal"]]
    assert got == pytest.approx(expect, abs=6e-4)


def test_cli_as_a_module_with_auto_smoothing_and_plot_redraw(tmp_path):
    acc_path, paths, raw, acc = _write_dataset(tmp_path, seed=1)
    out = tmp_path / "ev"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ferflow.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "ferflow.evaluate", "--predictions", f"a={paths['a']}", f"b={paths['b']}",
           "--weights", "a=2", "--accounting", str(acc_path), "--smoothing", "auto",
           "--smoothing-windows", "1,3,7", "--out-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert LAST_LINE.match(proc.stdout.strip().splitlines()[-1])
    result = json.loads((out / "metrics.json").read_text())
    s = result["smoothed"]
    assert s["auto"] is True and s["chosen_on"] == "validation"
    assert [x["window"] for x in s["search"]] == [1, 3, 7]
    best = max(x["expr_f1"] for x in s["search"])
    assert s["ensemble"]["expr_f1"] == pytest.approx(best)
    assert s["ensemble"]["expr_f1"] >= result["ensemble"]["expr_f1"]
    assert result["vote"]["weights"] == {"a": 2.0, "b": 1.0}
    assert "smoothing chosen on validation" in proc.stderr

    redraw = tmp_path / "redraw"
    proc = subprocess.run(
        [sys.executable, "-m", "ferflow.plots", "--metrics", str(out / "metrics.json"), "--ensemble",
         str(out / "ensemble_validation.parquet"), "--accounting", str(acc_path), "--out-dir", str(redraw)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("confusion.png", "f1_per_class.png", "va_hist.png"):
        assert (redraw / name).read_bytes()[:8] == PNG_MAGIC


def test_cli_errors_name_the_file_and_the_problem(tmp_path, capsys):
    acc_path, paths, raw, acc = _write_dataset(tmp_path)
    out = tmp_path / "ev"

    def run(*args):
        rc = evaluate.main(["--accounting", str(acc_path), "--out-dir", str(out), *args])
        return rc, capsys.readouterr().err

    wrong = tmp_path / "train_preds.parquet"
    schemas.write_table(raw["a"].with_columns(split=pl.lit("train")), wrong, schemas.PREDICTIONS)
    rc, err = run("--predictions", f"a={wrong}")
    assert rc == 2 and str(wrong) in err and "['train']" in err and "'validation'" in err

    missing = tmp_path / "no_valence.parquet"
    raw["a"].drop("valence").write_parquet(missing)
    rc, err = run("--predictions", f"a={missing}")
    assert rc == 2 and str(missing) in err and "valence" in err

    rc, err = run("--predictions", f"a={paths['a']}", "--split", "train")
    assert rc == 2 and str(acc_path) in err and "no ground-truth rows for split 'train'" in err

    rc, err = run("--predictions", f"a={paths['a']}", "--weights", "c=1")
    assert rc == 2 and "unknown variant(s) ['c']" in err

    rc, err = run("--predictions", f"a={tmp_path / 'nope.parquet'}")
    assert rc == 2 and "nope.parquet" in err

    rc, err = run("--predictions", str(paths["a"]))
    assert rc == 2 and "NAME=VALUE" in err

    with pytest.raises(SystemExit):
        evaluate.main(["--predictions", f"a={paths['a']}", "--accounting", str(acc_path), "--smoothing", "4"])
    assert "odd" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------
# submission export (ABAW3 format) and its checker


def test_submission_export_pads_cuts_and_passes_its_checker(tmp_path, capsys):
    acc_path, paths, raw, acc = _write_dataset(tmp_path)
    counts = tmp_path / "faces.parquet"  # FACES-like: one row per frame with the video's frame count
    pl.DataFrame({"video": ["v0"] * 3 + ["v1"] * 2 + ["extra"], "n_frames": [85] * 3 + [55] * 2 + [10]}).write_parquet(counts)
    test_list = tmp_path / "test_list.txt"
    test_list.write_text("v1\nv0.txt\n\nv2\nextra\n")
    out, sub = tmp_path / "ev", tmp_path / "submission"
    rc = evaluate.main([
        "--predictions", f"a={paths['a']}", f"b={paths['b']}", "--accounting", str(acc_path), "--out-dir", str(out),
        "--no-plots", "--submission-dir", str(sub), "--test-list", str(test_list), "--frame-counts", str(counts),
    ])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "metrics.json").read_text())
    assert result["submission"]["problems"] == [] and result["submission"]["videos"] == 4
    assert result["submission"]["frames"] == 85 + 55 + 25 + 10  # v2: last scored frame + 1
    # reported: v1's scored frames past its 55 frames (cut), and v2's count taken from its scored frames
    past = acc.filter((pl.col("video") == "v1") & (pl.col("frame") >= 55)
                      & ((pl.col("status") == "written") | (pl.col("reason") == "no_face"))).height
    mismatches = result["submission"]["mismatches"]
    assert len(mismatches) == 2 and past > 0
    assert mismatches[0].startswith(f"v1: {past} scored frames at or past its 55 frames (frames ")
    assert mismatches[1].startswith("v2: no frame count; its lines end at its last scored frame")

    ens = schemas.read_table(out / "ensemble_validation.parquet", schemas.PREDICTIONS)
    for video, n in (("v0", 85), ("v1", 55), ("v2", 25), ("extra", 10)):
        expr = (sub / "EXPR" / f"{video}.txt").read_text().splitlines()
        va = (sub / "VA" / f"{video}.txt").read_text().splitlines()
        assert expr[0] == "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
        assert va[0] == "valence,arousal"
        assert len(expr) == len(va) == n + 1
        e = ens.filter(pl.col("video") == video).sort("frame")
        if video == "extra":  # not in the split: uniform -> class 0, VA 0
            assert set(expr[1:]) == {"0"} and set(va[1:]) == {"0.000000,0.000000"}
            continue
        probs = e.select([f"p{i}" for i in range(8)]).to_numpy()
        frames = e["frame"].to_numpy()
        got_e = np.array(expr[1:], dtype=int)
        got_va = np.array([line.split(",") for line in va[1:]], dtype=float)
        inside = frames[frames < n]
        assert got_e[inside].tolist() == probs[frames < n].argmax(axis=1).tolist()
        np.testing.assert_allclose(got_va[inside], np.clip(e.select("valence", "arousal").to_numpy()[frames < n], -1, 1), atol=1e-6)
        if n > frames.max() + 1:  # padded past the last scored frame: copies of it
            assert set(got_e[frames.max():].tolist()) == {got_e[frames.max()]}

    # the checker, on its own: clean, then broken in three ways
    assert evaluate.main(["--check-submission", str(sub), "--frame-counts", str(counts), "--test-list", str(test_list)]) == 0
    (sub / "EXPR" / "v0.txt").write_text("Neutral\n" + "0\n" * 85)
    (sub / "EXPR" / "v1.txt").write_text("Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n" + "9\n" * 54)
    (sub / "VA" / "v2.txt").unlink()
    problems = abaw.check_submission(sub, abaw.read_frame_counts([counts]), abaw.read_test_list(test_list))
    assert any(p.startswith("EXPR/v0.txt: first line") for p in problems)
    assert "EXPR/v1.txt: 54 frame lines, the video has 55 frames" in problems
    assert "EXPR/v1.txt: values outside 0..7" in problems
    assert "VA/v2.txt: missing" in problems
    capsys.readouterr()
    assert evaluate.main(["--check-submission", str(sub), "--frame-counts", str(counts), "--test-list", str(test_list)]) == 1
    assert "4 problems" in capsys.readouterr().out


def test_submission_rejects_unknown_videos(tmp_path, capsys):
    acc_path, paths, raw, acc = _write_dataset(tmp_path)
    test_list = tmp_path / "test_list.txt"
    test_list.write_text("v0\nnowhere\n")
    rc = evaluate.main(["--predictions", f"a={paths['a']}", "--accounting", str(acc_path), "--out-dir", str(tmp_path / "ev"),
                        "--no-plots", "--submission-dir", str(tmp_path / "sub"), "--test-list", str(test_list)])
    assert rc == 2
    assert "no scored frame in split 'validation' and no frame count" in capsys.readouterr().err


def test_submission_of_a_video_with_an_undecodable_frame(tmp_path, capsys):
    """Issue 12, item 4: a test-list video (native Aff-Wild2 layout, MJPG AVI of 20 frames) whose
    frame 10 does not decode. The submission has a line for each of the 20 frames (the video's own
    frame count, not the 19 that decoded), frame 10's from its neighbours, and the mismatch is
    reported; a submission with the old 10 lines fails the check."""
    import cv2

    from bad_inputs import break_avi_frame
    from test_accounting import run_pipeline

    root = tmp_path / "aw"
    video = root / "videos" / "t.avi"
    video.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 48))
    for _ in range(20):  # bright (a face for the test detector) and textured (frames over 400 bytes)
        vw.write(rng.integers(150, 250, (48, 64, 3), dtype=np.uint8))
    vw.release()
    break_avi_frame(video, 10)
    (root / "test_list.txt").write_text("t\n")
    rows = run_pipeline([{"name": "aw", "kind": "affwild2", "root": str(root), "test_list": str(root / "test_list.txt")}],
                        tmp_path / "out")
    test = rows.filter(pl.col("split") == "test").sort("frame")
    assert test["frame"].to_list() == list(range(20))
    assert test.filter(pl.col("status") == "dropped").select("frame", "reason").rows() == [(10, "unreadable_frame")]

    # one variant's predictions on the written test frames: class frame % 8, valence frame / 20
    written = test.filter(pl.col("status") == "written")["frame"].to_numpy()
    pred = tmp_path / "test.parquet"
    schemas.write_table(predictions("t", written, [onehot(f % 8) for f in written],
                                    [[f / 20, -f / 40] for f in written], split="test"), pred, schemas.PREDICTIONS)
    faces = str(tmp_path / "out" / "faces" / "aw" / "t.parquet")
    out, sub = tmp_path / "ev", tmp_path / "submission"
    rc = evaluate.main(["--predictions", f"a={pred}", "--accounting", str(tmp_path / "out" / "accounting.parquet"),
                        "--split", "test", "--smoothing", "0", "--no-plots", "--out-dir", str(out),
                        "--submission-dir", str(sub), "--test-list", str(root / "test_list.txt"),
                        "--frame-counts", faces])
    err = capsys.readouterr().err
    assert rc == 0, err
    expr = (sub / "EXPR" / "t.txt").read_text().splitlines()[1:]
    va = np.array([line.split(",") for line in (sub / "VA" / "t.txt").read_text().splitlines()[1:]], dtype=float)
    assert len(expr) == len(va) == 20
    assert [int(c) for i, c in enumerate(expr) if i != 10] == [f % 8 for f in range(20) if f != 10]
    np.testing.assert_allclose(va[:, 0], np.arange(20) / 20, atol=1e-6)  # frame 10: between 9 and 11
    result = json.loads((out / "metrics.json").read_text())
    assert result["submission"]["problems"] == [] and result["submission"]["frames"] == 20
    assert result["submission"]["mismatches"] == [
        "t: 1 of its 20 frames did not decode (unreadable_frame: frame 10); their lines are filled from the "
        "neighbouring frames"]
    assert result["submission"]["mismatches"][0] in err
    # the submission the old count gave (10 frame lines) fails the check against the video's count
    (sub / "EXPR" / "t.txt").write_text("\n".join([EXPR_HEADER, *expr[:10]]) + "\n")
    assert abaw.check_submission(sub, abaw.read_frame_counts([faces]), ["t"]) == [
        "EXPR/t.txt: 10 frame lines, the video has 20 frames"]
