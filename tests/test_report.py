"""The report stage (ferflow.report): per-video scores, class support, the accounting table, the
landing-page HTML, and its figures; the plot fixes of ferflow.plots and of the training curves."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import numpy as np
import polars as pl
import pytest

from ferflow import plots, report, schemas
from ferflow.labels import EXPRESSIONS

sk = pytest.importorskip("sklearn.metrics")


def _ccc(x, y):
    """Lin's CCC written out independently of ferflow.metrics (population moments)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    cov = np.mean((x - x.mean()) * (y - y.mean()))
    return 2 * cov / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def _frames(rng: np.random.Generator) -> tuple[pl.DataFrame, dict]:
    """Three videos: v1 perfect, v2 noisy, v3 without VA labels; v2 has two unlabelled frames."""
    rows, truth = [], {}
    for video, n in (("v1", 30), ("v2", 50), ("v3", 20)):
        e = rng.integers(0, 3, n)
        va = rng.uniform(-1, 1, (n, 2))
        if video == "v1":
            pe, pva = e.copy(), va.copy()
        else:
            pe = np.where(rng.random(n) < 0.6, e, rng.integers(0, 8, n))
            pva = np.clip(va + rng.normal(0, 0.4, (n, 2)), -1, 1)
        e_lab = e.astype(object)
        va_lab = va.astype(object)
        if video == "v2":
            e_lab[[3, 7]] = None
        if video == "v3":
            va_lab[:] = None
        truth[video] = (e_lab, va_lab, pe, pva)
        for i in range(n):
            rows.append({"source": "aff", "video": video, "frame": i, "expression": e_lab[i],
                         "valence": va_lab[i, 0], "arousal": va_lab[i, 1], "pred_expression": int(pe[i]),
                         "pred_valence": float(pva[i, 0]), "pred_arousal": float(pva[i, 1])})
    schema = {"source": pl.String, "video": pl.String, "frame": pl.Int64, "expression": pl.Int8,
              "valence": pl.Float32, "arousal": pl.Float32, "pred_expression": pl.Int8,
              "pred_valence": pl.Float64, "pred_arousal": pl.Float64}
    return pl.DataFrame(rows, schema=schema), truth


def test_per_video_scores_match_sklearn_and_a_written_out_ccc():
    frames, truth = _frames(np.random.default_rng(0))
    table = report.per_video_scores(frames)
    assert table.columns == report.PER_VIDEO_COLUMNS
    assert table["video"].to_list() == ["v1", "v2", "v3"]
    for row in table.iter_rows(named=True):
        e_lab, va_lab, pe, pva = truth[row["video"]]
        keep = np.array([x is not None for x in e_lab])
        y, p = e_lab[keep].astype(int), pe[keep]
        # sklearn's macro F1 over the labels present in truth or prediction (its default labels)
        assert row["expr_f1"] == pytest.approx(sk.f1_score(y, p, average="macro"), abs=1e-12)
        assert row["expr_accuracy"] == pytest.approx(np.mean(y == p))
        assert row["expr_frames"] == keep.sum() and row["frames"] == len(e_lab)
        if row["video"] == "v3":
            assert row["va_frames"] == 0 and math.isnan(row["va_ccc_mean"])
        else:
            t = va_lab.astype(float)
            assert row["valence_ccc"] == pytest.approx(_ccc(t[:, 0], pva[:, 0]), abs=1e-5)
            assert row["arousal_ccc"] == pytest.approx(_ccc(t[:, 1], pva[:, 1]), abs=1e-5)
            assert row["va_ccc_mean"] == pytest.approx((row["valence_ccc"] + row["arousal_ccc"]) / 2)
    v1 = table.row(0, named=True)
    assert v1["expr_f1"] == 1.0 and v1["va_ccc_mean"] == pytest.approx(1.0, abs=1e-6)


def _accounting() -> pl.DataFrame:
    rows = []

    def add(n, source, split, status, reason=None, expression=0, va=(0.1, 0.2)):
        for i in range(n):
            rows.append({"source": source, "split": split, "video": f"{source}-{split}", "frame": len(rows),
                         "expression": expression, "valence": va[0] if va else None,
                         "arousal": va[1] if va else None, "status": status, "reason": reason,
                         "key": f"k{len(rows)}" if status == "written" else None})

    add(5, "aff", "train", "written", expression=1)
    add(3, "aff", "train", "written", expression=4, va=None)
    add(2, "aff", "train", "written", expression=None)
    add(4, "aff", "train", "dropped", "no_face", expression=1)
    add(1, "aff", "train", "dropped", "unannotated", expression=None, va=None)
    add(6, "aff", "validation", "written", expression=6)
    add(2, "aff", "validation", "dropped", "beyond_video_end")
    add(7, "img", "train", "written", expression=0, va=None)
    return pl.DataFrame(rows, schema=schemas.ACCOUNTING)


def test_class_support_counts_written_frames_per_split_and_class():
    support = report.class_support(_accounting())
    assert support["split"].to_list() == ["train", "validation"]
    train = support.row(0, named=True)
    assert [train[c] for c in EXPRESSIONS] == [7, 5, 0, 0, 3, 0, 0, 0]   # dropped no_face rows not counted
    assert train["total"] == 15 and train["va"] == 7                      # 5 + 2 with VA, written only
    val = support.row(1, named=True)
    assert val["Surprise"] == 6 and val["total"] == 6 and val["va"] == 6


def test_accounting_table_adds_up_per_source_and_split():
    acc = _accounting()
    table = report.accounting_table(acc)
    assert table.select("source", "split").rows() == [("aff", "train"), ("aff", "validation"), ("img", "train")]
    first = table.row(0, named=True)
    assert first == {"source": "aff", "split": "train", "rows": 15, "written": 10, "written_expr": 8,
                     "written_va": 7, "dropped: unannotated": 1, "dropped: beyond_video_end": 0,
                     "dropped: no_face": 4}
    dropped = [c for c in table.columns if c.startswith("dropped: ")]
    for row in table.iter_rows(named=True):
        assert row["rows"] == row["written"] + sum(row[c] for c in dropped)
    assert table["rows"].sum() == acc.height


def _result(smoothing_window=5) -> dict:
    def m(f1, ccc):
        return {"expr_f1": f1, "expr_accuracy": f1 + 0.1, "va_ccc_valence": ccc, "va_ccc_arousal": ccc - 0.1,
                "va_ccc_mean": ccc - 0.05, "n_expr": 90, "n_va": 80, "expr_f1_per_class": {c: f1 for c in EXPRESSIONS},
                "expr_confusion": None}
    smoothed = None if smoothing_window is None else {
        "window": {"expr": smoothing_window, "va": 3}, "auto": True, "chosen_on": "validation",
        "ensemble": m(0.61, 0.71), "variants": {"a": m(0.51, 0.61), "b": m(0.41, 0.51)}}
    return {"split": "validation", "ensemble": m(0.6, 0.7), "variants": {"a": m(0.5, 0.6), "b": m(0.4, 0.5)},
            "smoothed": smoothed,
            "ground_truth": {"n_frames": 100, "n_videos": 3, "n_no_face": 4, "n_expr": 90, "n_va": 80}}


class _Tables(HTMLParser):
    """Cells of every table by id."""

    def __init__(self):
        super().__init__()
        self.tables, self._id, self._row, self._cell = {}, None, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._id = dict(attrs)["id"]
            self.tables[self._id] = []
        elif tag == "tr" and self._id:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._id].append(self._row)
            self._row = None
        elif tag == "table":
            self._id = None


def test_summary_html_holds_the_four_tables():
    frames, _ = _frames(np.random.default_rng(1))
    per_video = report.per_video_scores(frames)
    acc = _accounting()
    text = report.summary_html(_result(), per_video, report.class_support(acc), report.accounting_table(acc))
    parser = _Tables()
    parser.feed(text)
    t = parser.tables
    assert list(t) == ["ferflow-metrics", "ferflow-per-video", "ferflow-class-support", "ferflow-accounting"]
    metrics = t["ferflow-metrics"]
    assert metrics[0][:3] == ["model", "smoothing", "expr F1 (macro)"]
    assert [r[0] for r in metrics[1:]] == ["a", "b", "ensemble"] * 2            # without, then with smoothing
    assert metrics[3][1:7] == ["none", "0.600", "0.700", "0.700", "0.600", "0.650"]
    assert metrics[6][1] == "expr 5, VA 3 frames (chosen on validation)" and metrics[6][2] == "0.610"
    assert metrics[3][7:] == ["90", "80"]
    # per video: worst expression F1 first
    f1 = [float(r[3]) for r in t["ferflow-per-video"][1:]]
    assert f1 == sorted(f1) and len(f1) == 3
    assert t["ferflow-accounting"][1][:4] == ["aff", "train", "15", "10"]
    assert "optimistic" in text


def test_metrics_rows_without_smoothing():
    rows = report.metrics_rows(_result(smoothing_window=None))
    assert [(r["model"], r["smoothing"]) for r in rows] == [("a", "none"), ("b", "none"), ("ensemble", "none")]


def test_va_examples_pick_the_worst_median_and_best_video():
    frames, _ = _frames(np.random.default_rng(2))
    extra = frames.filter(pl.col("video") == "v2").with_columns(video=pl.lit("v4"), pred_valence=-pl.col("pred_valence"))
    frames = pl.concat([frames, extra])
    per_video = report.per_video_scores(frames)
    series = report.va_examples(frames, per_video)
    ranked = per_video.filter(pl.col("va_frames") > 0).sort("va_ccc_mean")["video"].to_list()
    assert [s["video"] for s in series] == [ranked[0], ranked[1], ranked[2]]  # 3 videos with VA: all, worst first
    assert ranked[-1] == "v1" and series[0]["true"].shape == (50, 2)


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_are_written(tmp_path):
    frames, _ = _frames(np.random.default_rng(3))
    per_video = report.per_video_scores(frames)
    plots.per_video(per_video["video"].to_list(), per_video["expr_f1"].to_numpy(),
                    per_video["va_ccc_mean"].to_numpy(), tmp_path / "pv.png")
    plots.va_against_truth(report.va_examples(frames, per_video), tmp_path / "va.png")
    plots.va_against_truth([], tmp_path / "none.png")
    plots.class_support({"train": [5, 1, 0, 0, 3, 0, 0, 0], "validation": [0] * 8}, tmp_path / "cs.png")
    for name in ("pv.png", "va.png", "none.png", "cs.png"):
        assert _is_png(tmp_path / name), name


def test_va_hist_titles_give_the_ccc_and_the_diagonal_is_red(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.setdefault("fig", fig))
    rng = np.random.default_rng(4)
    t = rng.uniform(-1, 1, (200, 2))
    p = t * 0.5 + 0.1
    plots.va_hist(t, p, tmp_path / "x.png")
    fig: Figure = saved["fig"]
    axes = [ax for ax in fig.axes if ax.get_xlabel().startswith("true")]
    for j, ax in enumerate(axes):
        assert f"CCC {_ccc(t[:, j], p[:, j]):.3f}" in ax.get_title()
        (diagonal,) = [ln for ln in ax.lines if list(ln.get_xdata()) == [-1, 1]]
        assert diagonal.get_color() == "tab:red"


def test_no_smoothed_bar_for_a_window_of_one(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(plots, "f1_per_class", lambda per_class, path, **kw: seen.setdefault("names", list(per_class)))
    monkeypatch.setattr(plots, "confusion", lambda *a, **k: None)
    monkeypatch.setattr(plots, "va_hist", lambda *a, **k: None)
    result = _result(smoothing_window=1)
    plots.plot_evaluation(result, tmp_path)
    assert seen.pop("names") == ["a", "b", "ensemble"]
    plots.plot_evaluation(_result(smoothing_window=5), tmp_path)
    assert seen["names"] == ["a", "b", "ensemble", "ensemble smoothed (w=5)"]


@pytest.mark.parametrize("epochs", [1, 2, 30])
def test_training_curves_have_integer_epoch_ticks(tmp_path, monkeypatch, epochs):
    import matplotlib.figure

    from ferflow import train

    figures = []
    original = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    history = [{"epoch": e, "lr": 1e-3, **{f"loss_{p}": 1.0 / e for p in train.LOSS_PARTS},
                "val_expr_f1": 0.1 * e, "val_va_ccc_mean": 0.2 * e} for e in range(1, epochs + 1)]
    train.plot_curves(tmp_path / "curves.png", history, "a")
    assert _is_png(tmp_path / "curves.png")
    for ax in figures[0].axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert min(ticks) <= 1 + (epochs > 12) * 5 and max(ticks) >= epochs - (epochs > 12) * 5


def test_write_report_end_to_end_on_files(tmp_path):
    """write_report on a metrics.json, an ensemble parquet and an accounting parquet."""
    acc = _accounting()
    val = acc.filter(pl.col("split") == "validation", pl.col("status") == "written")
    ensemble = val.select(
        "split", "source", "video", "frame",
        *[pl.lit(1.0 if i == 6 else 0.0, pl.Float32).alias(f"p{i}") for i in range(8)],
        valence=pl.col("valence") * 0.5, arousal=pl.col("arousal"))
    schemas.write_table(acc, tmp_path / "acc.parquet", schemas.ACCOUNTING)
    schemas.write_table(ensemble, tmp_path / "ens.parquet", schemas.PREDICTIONS)
    (tmp_path / "metrics.json").write_text(json.dumps(_result()))
    out = report.write_report(tmp_path / "metrics.json", tmp_path / "ens.parquet", tmp_path / "acc.parquet",
                              tmp_path / "out", video_sources=["aff"])
    per_video = pl.read_csv(out["per_video_csv"])
    assert per_video["video"].to_list() == ["aff-validation"]
    assert per_video["expr_f1"][0] == 1.0 and per_video["expr_accuracy"][0] == 1.0
    for name in ("per_video", "va_over_time", "class_support"):
        assert _is_png(out[name]), name
    assert 'id="ferflow-per-video"' in out["summary"].read_text()
