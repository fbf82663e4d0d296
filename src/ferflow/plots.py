"""Evaluation plots: confusion matrix, per-class F1 of each variant against the ensemble, 2-D
histograms of predicted against true valence/arousal (CCC in the titles), per-video scores sorted
worst first, valence/arousal over time for a few videos (prediction against ground truth), and
the class support per split.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no display) and
written atomically. Each plot is a function of plain arrays, so it can be called on its own;
``python -m ferflow.plots`` redraws them from an evaluation's ``metrics.json`` (and, for the VA
histograms, its ``ensemble_{split}.parquet`` with the accounting).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .atomic import atomic_path  # noqa: E402
from .labels import EXPRESSIONS  # noqa: E402
from .metrics import ccc  # noqa: E402

DPI = 110


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def row_normalise(cm) -> np.ndarray:
    """Each row divided by its sum (rows without frames stay 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    sums = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, sums, out=np.zeros_like(cm), where=sums > 0)


def confusion(cm, path: str | os.PathLike, title: str = "ensemble", class_names: Sequence[str] = EXPRESSIONS) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted class)."""
    cm = np.asarray(cm)
    norm = row_normalise(cm)
    k = len(class_names)
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), [f"{c} ({n})" for c, n in zip(class_names, cm.sum(axis=1))])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (frames)")
    ax.set_title(f"confusion, {title} (row-normalised)")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    return _save(fig, path)


def f1_per_class(per_class: Mapping[str, Sequence[float] | Mapping[str, float]], path: str | os.PathLike,
                 class_names: Sequence[str] = EXPRESSIONS, highlight: Sequence[str] = ("ensemble",)) -> Path:
    """Grouped bars: one group per class, one bar per model (variants grey-ish, ensembles bold)."""
    names = list(per_class)
    values = []
    for n in names:
        v = per_class[n]
        v = [v[c] for c in class_names] if isinstance(v, Mapping) else list(v)
        values.append([np.nan if x is None else float(x) for x in v])
    values = np.asarray(values, dtype=np.float64)
    k = len(class_names)
    m = len(names)
    width = 0.8 / max(m, 1)
    fig = Figure(figsize=(max(9.0, 1.2 * k + 0.1 * m * k), 4.8), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10"]
    x = np.arange(k)
    n_variants = 0
    for i, n in enumerate(names):
        strong = any(n.startswith(h) for h in highlight)
        colour = ("black" if n == "ensemble" else "tab:red") if strong else cmap(n_variants % 10)
        n_variants += 0 if strong else 1
        macro = np.nanmean(values[i]) if np.isfinite(values[i]).any() else np.nan
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(values[i]), width, color=colour,
               alpha=1.0 if strong else 0.6, label=f"{n} (macro {macro:.3f})")
    ax.set_xticks(x, class_names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title("per-class F1: variants and ensemble")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def va_hist(va_true, va_pred, path: str | os.PathLike, bins: int = 50, title: str = "ensemble") -> Path:
    """2-D histograms of prediction against truth for valence and arousal (log counts); each title
    gives the CCC of its frames, a red dashed diagonal marks perfect predictions."""
    fig = Figure(figsize=(12, 5.2), layout="constrained")
    va_true = np.asarray(va_true, dtype=np.float64).reshape(-1, 2) if va_true is not None else np.zeros((0, 2))
    va_pred = np.asarray(va_pred, dtype=np.float64).reshape(-1, 2) if va_pred is not None else np.zeros((0, 2))
    edges = np.linspace(-1, 1, bins + 1)
    for j, name in enumerate(("valence", "arousal")):
        ax = fig.add_subplot(1, 2, j + 1)
        if va_true.shape[0] and va_pred.shape[0] == va_true.shape[0]:
            t = np.clip(va_true[:, j], -1, 1)
            p = np.clip(va_pred[:, j], -1, 1)
            h, _, _ = np.histogram2d(t, p, bins=[edges, edges])
            im = ax.pcolormesh(edges, edges, h.T, norm=LogNorm(vmin=1, vmax=max(h.max(), 1)), cmap="viridis")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="frames")
            ax.set_title(f"{name}, {title}: CCC {ccc(va_true[:, j], va_pred[:, j]):.3f} ({t.size} frames)")
        else:
            ax.text(0, 0, "no frames", ha="center", va="center")
            ax.set_title(f"{name}, {title}")
        ax.plot([-1, 1], [-1, 1], color="tab:red", lw=1.2, ls="--", label="prediction = truth")
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.set_aspect("equal")
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
    return _save(fig, path)


def class_colours() -> list[tuple[float, float, float]]:
    """One RGB colour (0..1) per ABAW class, in class order (matplotlib's tab10)."""
    from matplotlib import colormaps

    return [tuple(float(c) for c in colormaps["tab10"](i)[:3]) for i in range(len(EXPRESSIONS))]


def va_over_time(time, track, valence, arousal, expression, path: str | os.PathLike, title: str = "") -> Path:
    """Valence and arousal over time, one panel per track, the expression as a coloured band.

    ``time`` (seconds), ``track`` (int; frames without a face are left out by the caller),
    ``valence``/``arousal`` (float, NaN: none), ``expression`` (class index, -1: none): arrays of
    the same length, one entry per (frame, track). A video without any face gets one empty panel.
    """
    time = np.asarray(time, np.float64)
    track = np.asarray(track, np.int64)
    valence = np.asarray(valence, np.float64)
    arousal = np.asarray(arousal, np.float64)
    expression = np.asarray(expression, np.int64)
    tracks = sorted(set(track.tolist()))
    colours = class_colours()
    fig = Figure(figsize=(11, 2.4 + 2.2 * max(len(tracks), 1)), layout="constrained")
    axes = fig.subplots(max(len(tracks), 1), 1, squeeze=False)[:, 0]
    if not tracks:
        axes[0].text(0.5, 0.5, "no face in this video", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_title(title)
    step = float(np.median(np.diff(np.unique(time)))) if np.unique(time).size > 1 else 1.0
    for ax, t in zip(axes, tracks):
        sel = np.flatnonzero(track == t)
        sel = sel[np.argsort(time[sel], kind="stable")]
        x = time[sel]
        for cls in range(len(EXPRESSIONS)):  # the band: one bar per frame, in its class's colour
            on = expression[sel] == cls
            if on.any():
                ax.bar(x[on], 0.12, width=step, bottom=-1.18, color=colours[cls], align="center", linewidth=0)
        ax.plot(x, valence[sel], color="tab:red", lw=1.2, label="valence")
        ax.plot(x, arousal[sel], color="tab:blue", lw=1.2, label="arousal")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_ylim(-1.2, 1.05)
        ax.set_ylabel(f"track {t}")
        ax.set_title(f"{title} track {t}: {sel.size} frames".strip())
    axes[-1].set_xlabel("time (s)")
    from matplotlib.patches import Patch

    handles = [Patch(color=colours[i], label=name) for i, name in enumerate(EXPRESSIONS)]
    lines = axes[0].get_legend_handles_labels()[0]
    fig.legend(handles=lines + handles, loc="outside right upper", fontsize=8)
    return _save(fig, path)


def per_video(videos: Sequence[str], expr_f1: Sequence[float], va_ccc: Sequence[float],
              path: str | os.PathLike, title: str = "ensemble") -> Path:
    """Two horizontal bar panels, one bar per video: expression F1 and VA mean CCC, each sorted
    worst first (at the top), so the videos that pull the score down stand out. NaN (a video without
    that label) is left out of its panel."""
    videos = list(videos)
    panels = [("expression F1 (macro over the video's classes)", np.asarray(expr_f1, dtype=np.float64), (0, 1)),
              ("VA mean CCC", np.asarray(va_ccc, dtype=np.float64), (-1, 1))]
    n = max([1] + [int(np.isfinite(v).sum()) for _, v, _ in panels])
    fig = Figure(figsize=(12, min(2.0 + 0.22 * n, 60)), layout="constrained")
    for j, (label, values, lim) in enumerate(panels):
        ax = fig.add_subplot(1, 2, j + 1)
        keep = np.flatnonzero(np.isfinite(values))
        order = keep[np.argsort(values[keep], kind="stable")]
        y = np.arange(order.size)
        vals = values[order]
        middle = np.median(vals) if vals.size else 0.0
        ax.barh(y, vals, color=["tab:red" if v < middle else "tab:blue" for v in vals])
        ax.set_yticks(y, [videos[i] for i in order], fontsize=7)
        ax.invert_yaxis()  # worst at the top
        ax.set_xlim(*lim)
        ax.axvline(0, color="black", lw=0.6)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(label)
        ax.set_title(f"{label.split(' (')[0]} per video, {title}\n({order.size} videos, worst at the top; "
                     "red: below the median)" if order.size else f"{label}: no video with this label", fontsize=10)
    return _save(fig, path)


def va_against_truth(series: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Valence and arousal against frame number for a few videos, prediction against ground truth.

    series: one mapping per video with ``video`` (name), ``frame`` (N,), ``true`` (N, 2), ``pred``
    (N, 2) and optionally ``smoothed`` (N, 2) and ``label`` for the smoothed line. Frames without a
    label are NaN in ``true`` (gaps in the black line). Titles give each panel's CCC over its
    labelled frames.
    """
    rows = max(len(series), 1)
    fig = Figure(figsize=(13, 2.6 * rows + 0.6), layout="constrained")
    if not series:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no video with valence/arousal labels", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)
    for i, item in enumerate(series):
        frame = np.asarray(item["frame"])
        true = np.asarray(item["true"], dtype=np.float64).reshape(-1, 2)
        pred = np.asarray(item["pred"], dtype=np.float64).reshape(-1, 2)
        smooth = item.get("smoothed")
        for j, name in enumerate(("valence", "arousal")):
            ax = fig.add_subplot(rows, 2, 2 * i + j + 1)
            ok = np.isfinite(true[:, j]) & np.isfinite(pred[:, j])
            ax.plot(frame, true[:, j], color="black", lw=1.2, label="ground truth")
            ax.plot(frame, pred[:, j], color="tab:blue", lw=0.9, alpha=0.8, label="ensemble")
            if smooth is not None:
                ax.plot(frame, np.asarray(smooth, dtype=np.float64).reshape(-1, 2)[:, j], color="tab:orange",
                        lw=1.0, label=item.get("label", "smoothed"))
            ax.set_ylim(-1.05, 1.05)
            ax.axhline(0, color="grey", lw=0.5)
            score = ccc(true[ok, j], pred[ok, j]) if ok.any() else float("nan")
            ax.set_title(f"{item['video']}: {name}, CCC {score:.3f}", fontsize=9)
            ax.set_ylabel(name)
            if i == rows - 1:
                ax.set_xlabel("frame")
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def class_support(counts: Mapping[str, Sequence[int]], path: str | os.PathLike,
                  class_names: Sequence[str] = EXPRESSIONS) -> Path:
    """Grouped bars: the share of each expression class per split (frames with an expression
    label written to the shards), the count written on each bar."""
    splits = list(counts)
    k = len(class_names)
    width = 0.8 / max(len(splits), 1)
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(k)
    for i, split in enumerate(splits):
        c = np.asarray(counts[split], dtype=np.float64)
        share = c / c.sum() if c.sum() else np.zeros(k)
        bars = ax.bar(x - 0.4 + width * (i + 0.5), share, width, label=f"{split} ({int(c.sum())} frames)")
        ax.bar_label(bars, [str(int(v)) for v in c], fontsize=7, rotation=90, padding=2)
    ax.set_xticks(x, class_names, rotation=30, ha="right")
    ax.set_ylabel("share of the split's labelled frames")
    ax.set_ylim(0, 1.1 * max([1e-9] + [max(np.asarray(c) / max(sum(c), 1)) for c in counts.values()]) + 0.05)
    ax.set_title("expression class support per split")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_evaluation(result: Mapping, out_dir: str | os.PathLike, va_true=None, va_pred=None) -> dict[str, Path]:
    """The three plots of an evaluation from its ``metrics.json`` content (plus VA arrays)."""
    out_dir = Path(out_dir)
    out: dict[str, Path] = {}
    ens = result["ensemble"]
    cm = ens.get("expr_confusion")
    if cm is None:
        cm = np.zeros((len(EXPRESSIONS),) * 2, dtype=np.int64)
    out["confusion"] = confusion(cm, out_dir / "confusion.png")
    per_class = {n: m["expr_f1_per_class"] for n, m in result["variants"].items()}
    per_class["ensemble"] = ens["expr_f1_per_class"]
    s = result.get("smoothed")
    if s and s["window"]["expr"] > 1:  # a window of 1 is no smoothing: its bar would repeat the ensemble's
        per_class[f"ensemble smoothed (w={s['window']['expr']})"] = s["ensemble"]["expr_f1_per_class"]
    out["f1_per_class"] = f1_per_class(per_class, out_dir / "f1_per_class.png")
    out["va_hist"] = va_hist(va_true, va_pred, out_dir / "va_hist.png")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ferflow.plots", description="Redraw an evaluation's plots.")
    p.add_argument("--metrics", required=True, help="metrics.json written by ferflow.evaluate")
    p.add_argument("--ensemble", help="ensemble_{split}.parquet (for the VA histograms)")
    p.add_argument("--accounting", help="ACCOUNTING parquet (for the VA histograms)")
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(argv)
    result = json.loads(Path(args.metrics).read_text())
    va_true = va_pred = None
    if args.ensemble and args.accounting:
        import polars as pl

        from . import schemas, truth

        gt = truth.load_ground_truth(args.accounting, result["split"])
        ens = schemas.read_table(args.ensemble, schemas.PREDICTIONS)
        joined = gt.frame_table().with_row_index("_row").join(ens, on=["source", "video", "frame"], how="inner")
        joined = joined.filter(pl.Series(gt.va_mask[joined["_row"].to_numpy()]))
        va_true = joined.select(pl.col("valence").cast(pl.Float64), pl.col("arousal").cast(pl.Float64)).to_numpy()
        va_pred = joined.select(pl.col("valence_right").cast(pl.Float64), pl.col("arousal_right").cast(pl.Float64)).to_numpy()
    for name, path in plot_evaluation(result, args.out_dir, va_true, va_pred).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
