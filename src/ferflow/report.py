"""Stage 7, ``report_evaluation``: the first page of ``snakemake --report``, and the figures people
in the field look at.

``python -m ferflow.report --metrics results/evaluation/metrics.json --ensemble
results/evaluation/ensemble_validation.parquet --accounting results/accounting.parquet
--video-sources affwild2 --out-dir results/report``

Writes into ``--out-dir``:

- ``summary.html``: an HTML fragment that the workflow's report puts on its landing page
  (``workflow/report/workflow.rst`` includes it): the metrics table (every variant and the
  ensemble, without and with smoothing: expression macro F1, accuracy, valence/arousal CCC and
  their mean, frames scored), the per-video table sorted worst first, the class support per split
  and the accounting table (annotated frames written and dropped, per source, split and reason).
- ``per_video.csv``: one row per video of the evaluation split (video sources only): frames,
  expression F1 and accuracy, valence/arousal CCC. ``per_video.png``: both scores per video,
  sorted worst first.
- ``va_over_time.png``: valence and arousal against frame number, prediction against ground
  truth, for the worst, the median and the best video by mean CCC (the standard Aff-Wild2 figure).
- ``class_support.png``: the share of each expression class per split.

Per-video scores use the unsmoothed ensemble (the smoothing window is chosen on this split, so its
numbers are optimistic). A video's expression F1 is the mean F1 over the classes that occur in
its ground truth or its predictions (sklearn's ``f1_score(average="macro")`` without ``labels``):
over all 8 classes, as the challenge scores the whole split, one video with two classes could score
at most 0.25. CCC is Lin's, over the video's frames with both labels (:mod:`ferflow.metrics`).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import polars as pl

from . import metrics, plots, schemas
from .atomic import write_text
from .inputcheck import prog_of, require_inputs
from .labels import EXPRESSIONS, NUM_EXPRESSIONS
from .truth import PROB_COLS, load_ground_truth

#: columns of per_video.csv, in order
PER_VIDEO_COLUMNS = ["source", "video", "frames", "expr_frames", "expr_f1", "expr_accuracy", "va_frames",
                     "valence_ccc", "arousal_ccc", "va_ccc_mean"]


# ---- numbers ---------------------------------------------------------------------------------------
def scored_frames(accounting: str | os.PathLike, ensemble: pl.DataFrame, split: str) -> pl.DataFrame:
    """The split's scored frames (as :mod:`ferflow.evaluate` scores them) with truth and the
    ensemble's prediction: source, video, frame, expression, valence, arousal (truth, null where
    not labelled), pred_expression (argmax of p0..p7, ties to the lower class), pred_valence,
    pred_arousal. Raises ValueError when the ensemble lacks a scored frame."""
    truth = load_ground_truth(accounting, split).frame_table()
    pred = ensemble.select(
        "source", "video", "frame",
        pred_expression=pl.concat_list(PROB_COLS).list.arg_max().cast(pl.Int8),
        pred_valence=pl.col("valence").cast(pl.Float64), pred_arousal=pl.col("arousal").cast(pl.Float64),
    )
    joined = truth.join(pred, on=["source", "video", "frame"], how="left", maintain_order="left")
    missing = joined.filter(pl.all_horizontal(pl.col("pred_expression", "pred_valence").is_null())
                            & (pl.col("expression").is_not_null() | pl.col("valence").is_not_null()))
    if missing.height and ensemble.height:
        row = missing.row(0, named=True)
        raise ValueError(f"ensemble predictions lack {missing.height} scored frames of split {split!r}, "
                         f"e.g. {row['source']}/{row['video']} frame {row['frame']}")
    return joined


def _video_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean F1 over the classes present in y_true or y_pred (NaN without frames)."""
    if y_true.size == 0:
        return math.nan
    present = np.zeros(NUM_EXPRESSIONS, dtype=bool)
    present[np.unique(y_true)] = True
    present[np.unique(y_pred)] = True
    return float(metrics.per_class_f1(y_true, y_pred)[present].mean())


def per_video_scores(frames: pl.DataFrame) -> pl.DataFrame:
    """One row per (source, video) of :func:`scored_frames`' table, PER_VIDEO_COLUMNS, sorted by
    source and video. Scores of a task the video has no labelled frame for are NaN."""
    rows = []
    for (source, video), g in frames.group_by(["source", "video"], maintain_order=True):
        e = g.filter(pl.col("expression").is_not_null() & pl.col("pred_expression").is_not_null())
        y_true = e["expression"].to_numpy().astype(np.int64)
        y_pred = e["pred_expression"].to_numpy().astype(np.int64)
        v = g.filter(pl.all_horizontal(pl.col("valence", "arousal", "pred_valence", "pred_arousal").is_not_null()))
        truth = v.select("valence", "arousal").to_numpy().astype(np.float64)
        pred = v.select("pred_valence", "pred_arousal").to_numpy().astype(np.float64)
        c_v, c_a, c_m = metrics.va_ccc(truth, pred) if v.height else (math.nan,) * 3
        rows.append({"source": source, "video": video, "frames": g.height, "expr_frames": e.height,
                     "expr_f1": _video_f1(y_true, y_pred),
                     "expr_accuracy": metrics.accuracy(y_true, y_pred),
                     "va_frames": v.height, "valence_ccc": c_v, "arousal_ccc": c_a, "va_ccc_mean": c_m})
    schema = {c: (pl.String if c in ("source", "video") else pl.Int64 if c.endswith("frames") else pl.Float64)
              for c in PER_VIDEO_COLUMNS}
    return pl.DataFrame(rows, schema=schema).sort("source", "video")


def class_support(accounting: pl.DataFrame) -> pl.DataFrame:
    """Frames written to the shards with an expression label, per split and class: columns split,
    then one per class (EXPRESSIONS order), then total and va (frames written with valence and
    arousal). Splits in the order train, validation, test, others."""
    written = accounting.filter(pl.col("status") == "written")
    splits = sorted(set(written["split"].drop_nulls().to_list()),
                    key=lambda s: (["train", "validation", "test"].index(s) if s in ("train", "validation", "test") else 3, s))
    rows = []
    for split in splits:
        w = written.filter(pl.col("split") == split)
        counts = np.bincount(w["expression"].drop_nulls().to_numpy().astype(np.int64), minlength=NUM_EXPRESSIONS)
        va = w.filter(pl.col("valence").is_not_null() & pl.col("arousal").is_not_null()).height
        rows.append({"split": split, **dict(zip(EXPRESSIONS, counts.tolist())), "total": int(counts.sum()), "va": va})
    schema = {"split": pl.String, **{c: pl.Int64 for c in EXPRESSIONS}, "total": pl.Int64, "va": pl.Int64}
    return pl.DataFrame(rows, schema=schema)


def accounting_table(accounting: pl.DataFrame) -> pl.DataFrame:
    """Annotated frames per source and split: rows (all), written, written with an expression
    label, written with valence/arousal, then one column per drop reason that occurs (frames
    dropped for it). Sorted by source and split."""
    keys = ["source", "split"]
    base = accounting.group_by(keys).agg(
        rows=pl.len(),
        written=(pl.col("status") == "written").sum(),
        written_expr=((pl.col("status") == "written") & pl.col("expression").is_not_null()).sum(),
        written_va=((pl.col("status") == "written") & pl.col("valence").is_not_null()
                    & pl.col("arousal").is_not_null()).sum(),
    )
    dropped = accounting.filter(pl.col("status") != "written")
    reasons = [r for r in schemas.DROP_REASONS if r in set(dropped["reason"].drop_nulls().to_list())]
    reasons += sorted(set(dropped["reason"].drop_nulls().to_list()) - set(reasons))
    if reasons:
        per_reason = dropped.group_by(keys).agg(
            **{f"dropped: {r}": (pl.col("reason") == r).sum() for r in reasons})
        base = base.join(per_reason, on=keys, how="left", nulls_equal=True)
    return base.with_columns(pl.exclude(keys).fill_null(0).cast(pl.Int64)).sort(keys, nulls_last=True)


def metrics_rows(result: Mapping) -> list[dict]:
    """The metrics table: each variant and the ensemble, without smoothing, (when the
    evaluation smoothed) with, and (when it scored temporal heads) their outputs (smoothing
    "temporal head"), as dicts of model, smoothing, expr_f1, expr_accuracy, va_ccc_valence,
    va_ccc_arousal, va_ccc_mean, n_expr, n_va (frames scored for each task)."""
    keys = ["expr_f1", "expr_accuracy", "va_ccc_valence", "va_ccc_arousal", "va_ccc_mean", "n_expr", "n_va"]
    blocks = [("none", result["variants"], result["ensemble"])]
    s = result.get("smoothed")
    if s:
        w = s["window"]
        how = f"chosen on {s['chosen_on']}" if s.get("auto") else "fixed"
        blocks.append((f"expr {w['expr']}, VA {w['va']} frames ({how})", s["variants"], s["ensemble"]))
    t = result.get("temporal")
    if t:
        blocks.append(("temporal head", t["variants"], t["ensemble"]))
    rows = []
    for smoothing, variants, ensemble in blocks:
        for name, m in [*variants.items(), ("ensemble", ensemble)]:
            rows.append({"model": name, "smoothing": smoothing, **{k: m.get(k) for k in keys}})
    return rows


# ---- HTML ------------------------------------------------------------------------------------------
def _cell(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def html_table(columns: Sequence[str], rows: Sequence[Sequence], table_id: str, caption: str = "",
               bold_rows: Sequence[int] = ()) -> str:
    """A plain HTML table (header row, one row per item; floats with 3 decimals, missing as a dash)."""
    out = [f'<table id="{table_id}" class="ferflow-table">']
    if caption:
        out.append(f"<caption>{html.escape(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr></thead><tbody>")
    for i, row in enumerate(rows):
        style = ' class="ferflow-strong"' if i in bold_rows else ""
        out.append(f"<tr{style}>" + "".join(f'<td class="ferflow-text">{_cell(v)}</td>' if isinstance(v, str)
                                            else f"<td>{_cell(v)}</td>" for v in row) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


_STYLE = """<style>
div.prose:has(.ferflow-summary) { max-width: none; }
.ferflow-summary table { border-collapse: collapse; margin: 0.4em 0 1.4em 0; font-size: 0.85em; }
.ferflow-summary caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3em; }
.ferflow-summary th, .ferflow-summary td { border: 1px solid #ccc; padding: 0.15em 0.5em; text-align: right; }
.ferflow-summary th:first-child, .ferflow-summary td.ferflow-text { text-align: left; }
.ferflow-summary tr.ferflow-strong td { font-weight: 700; background: #eef3fb; }
.ferflow-summary p.ferflow-note { font-size: 0.8em; color: #555; max-width: 60em; }
</style>"""


def summary_html(result: Mapping, per_video: pl.DataFrame, support: pl.DataFrame, accounting: pl.DataFrame) -> str:
    """The landing-page fragment: metrics table, per-video table (worst expression F1 first),
    class support per split and the accounting table; tables have ids ferflow-metrics,
    ferflow-per-video, ferflow-class-support, ferflow-accounting."""
    gt = result["ground_truth"]
    parts = [_STYLE, '<div class="ferflow-summary">']
    rows = metrics_rows(result)
    parts.append(html_table(
        ["model", "smoothing", "expr F1 (macro)", "expr accuracy", "valence CCC", "arousal CCC", "VA mean CCC",
         "frames scored (expr)", "frames scored (VA)"],
        [[r["model"], r["smoothing"], r["expr_f1"], r["expr_accuracy"], r["va_ccc_valence"], r["va_ccc_arousal"],
          r["va_ccc_mean"], r["n_expr"], r["n_va"]] for r in rows],
        "ferflow-metrics",
        f"Metrics on split {result['split']}: {gt['n_frames']} scored frames in {gt['n_videos']} videos "
        f"({gt['n_no_face']} without a face, filled from neighbouring frames)",
        bold_rows=[i for i, r in enumerate(rows) if r["model"] == "ensemble"]))
    note = ("ABAW conventions: macro F1 over the 8 classes and CCC over all scored frames of all videos "
            "concatenated; the ensemble is the soft vote (mean of class probabilities, mean of valence/arousal).")
    if result.get("smoothed") and result["smoothed"].get("auto"):
        note += (" The smoothing windows were chosen on this split, so the smoothed rows are optimistic.")
    parts.append(f'<p class="ferflow-note">{html.escape(note)}</p>')
    worst_first = per_video.sort("expr_f1", "va_ccc_mean", nulls_last=True)
    parts.append(html_table(
        ["video", "source", "frames", "expr F1", "expr accuracy", "valence CCC", "arousal CCC", "VA mean CCC"],
        worst_first.select("video", "source", "frames", "expr_f1", "expr_accuracy", "valence_ccc", "arousal_ccc",
                           "va_ccc_mean").rows(),
        "ferflow-per-video",
        f"Per video, ensemble without smoothing, worst expression F1 first ({per_video.height} videos; "
        "F1: mean over the classes in the video's truth or predictions)"))
    parts.append(html_table(support.columns, support.rows(), "ferflow-class-support",
                            "Class support: frames written to the shards with an expression label, per split "
                            "(va: frames with valence and arousal)"))
    parts.append(html_table(accounting.columns, accounting.rows(), "ferflow-accounting",
                            "Accounting: annotated frames per source and split, written and dropped per reason "
                            "(results/accounting.parquet)"))
    parts.append("</div>")
    return "\n".join(parts) + "\n"


# ---- figures ---------------------------------------------------------------------------------------
def va_examples(frames: pl.DataFrame, per_video: pl.DataFrame, smoothed: pl.DataFrame | None = None,
                smoothed_label: str = "smoothed", count: int = 3) -> list[dict]:
    """Series for :func:`ferflow.plots.va_against_truth`: the worst, median and best video by VA mean
    CCC (``count`` videos spread over that order; fewer when fewer videos have VA labels)."""
    ranked = per_video.filter(pl.col("va_frames") > 1, pl.col("va_ccc_mean").is_not_nan()).sort("va_ccc_mean")
    if ranked.height == 0:
        return []
    picks = sorted(set(np.linspace(0, ranked.height - 1, min(count, ranked.height)).round().astype(int).tolist()))
    series = []
    for i in picks:
        source, video = ranked["source"][i], ranked["video"][i]
        g = frames.filter((pl.col("source") == source) & (pl.col("video") == video)).sort("frame")
        item = {
            "video": video, "frame": g["frame"].to_numpy(),
            "true": g.select(pl.col("valence", "arousal").cast(pl.Float64)).fill_null(np.nan).to_numpy(),
            "pred": g.select("pred_valence", "pred_arousal").fill_null(np.nan).to_numpy(),
        }
        if smoothed is not None:
            s = g.select("source", "video", "frame").join(smoothed, on=["source", "video", "frame"], how="left",
                                                          maintain_order="left")
            item["smoothed"] = s.select(pl.col("valence", "arousal").cast(pl.Float64)).fill_null(np.nan).to_numpy()
            item["label"] = smoothed_label
        series.append(item)
    return series


def write_report(metrics_path: str | os.PathLike, ensemble_path: str | os.PathLike, accounting_path: str | os.PathLike,
                 out_dir: str | os.PathLike, video_sources: Sequence[str] | None = None,
                 ensemble_smoothed_path: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write every output of the stage (see the module docstring); returns name -> path."""
    out_dir = Path(out_dir)
    result = json.loads(Path(metrics_path).read_text())
    split = result["split"]
    ensemble = schemas.read_table(ensemble_path, schemas.PREDICTIONS)
    frames = scored_frames(accounting_path, ensemble, split)
    if video_sources is not None:
        frames = frames.filter(pl.col("source").is_in(list(video_sources)))
    per_video = per_video_scores(frames)
    acc = schemas.read_table(accounting_path, schemas.ACCOUNTING)
    support = class_support(acc)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = {"summary": out_dir / "summary.html", "per_video_csv": out_dir / "per_video.csv",
           "per_video": out_dir / "per_video.png", "va_over_time": out_dir / "va_over_time.png",
           "class_support": out_dir / "class_support.png"}
    write_text(out["summary"], summary_html(result, per_video, support, accounting_table(acc)))
    write_text(out["per_video_csv"], per_video.write_csv(float_precision=4))
    plots.per_video(per_video["video"].to_list(), per_video["expr_f1"].to_numpy(), per_video["va_ccc_mean"].to_numpy(),
                    out["per_video"])
    smoothed, label = None, "smoothed"
    s = result.get("smoothed")
    if ensemble_smoothed_path is None:  # the file the same evaluation wrote, when it smoothed
        ensemble_smoothed_path = (result.get("outputs") or {}).get("ensemble_smoothed")
    if ensemble_smoothed_path is not None and s and s["window"]["va"] > 1:
        smoothed = schemas.read_table(ensemble_smoothed_path, schemas.PREDICTIONS)
        label = f"smoothed (window {s['window']['va']})"
    plots.va_against_truth(va_examples(frames, per_video, smoothed, label), out["va_over_time"])
    plots.class_support({r["split"]: [r[c] for c in EXPRESSIONS] for r in support.iter_rows(named=True)},
                        out["class_support"])
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog_of("report"), description=__doc__.split("\n\n")[0])
    p.add_argument("--metrics", required=True, help="metrics.json written by ferflow.evaluate")
    p.add_argument("--ensemble", required=True, help="the ensemble's PREDICTIONS on the evaluation split "
                   "(ensemble_<split>.parquet, written by ferflow.evaluate)")
    p.add_argument("--ensemble-smoothed", help="ensemble_<split>_smoothed.parquet, drawn beside the "
                   "unsmoothed prediction over time (default: the one metrics.json lists, if any)")
    p.add_argument("--accounting", required=True, help="ACCOUNTING parquet (ground truth, class support, accounting)")
    p.add_argument("--video-sources", nargs="*", metavar="SOURCE",
                   help="sources whose videos get per-video scores (default: every source; image sources "
                   "would give one row per image)")
    p.add_argument("--out-dir", required=True, help="folder for summary.html, per_video.csv and the figures")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    require_inputs(prog_of("report"), [("--metrics", args.metrics, "file"), ("--ensemble", args.ensemble, "file"),
                                                ("--ensemble-smoothed", args.ensemble_smoothed, "file"),
                                                ("--accounting", args.accounting, "file")])
    for name, path in write_report(args.metrics, args.ensemble, args.accounting, args.out_dir, args.video_sources,
                                   args.ensemble_smoothed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
