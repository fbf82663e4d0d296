"""Stage 6, ``evaluate_ensemble``: fill, vote, smooth and score the variants' predictions.

``python -m ferflow.evaluate --predictions a=results/predictions/a/validation.parquet
b=results/predictions/b/validation.parquet --accounting results/accounting.parquet
--split validation --smoothing auto --out-dir results/evaluation``

The ground truth is read by :mod:`ferflow.truth` (every frame of a video is scored, faces
found or not); filling, soft voting (never summing logits), smoothing and scoring are
:mod:`ferflow.ensemble`'s; the ABAW submission is :mod:`ferflow.abaw`'s. ``--smoothing auto``
picks, on this split, the best window from ``--smoothing-windows`` separately for expression
(macro F1) and VA (mean CCC) of the ensemble; a window chosen on the split it is scored on is
optimistic, and ``metrics.json`` says so (``chosen_on``). Metrics are always reported both
without (top level) and with smoothing (``"smoothed"``).

Outputs in ``--out-dir``: ``metrics.json`` (see :func:`evaluate`), ``ensemble_{split}.parquet``
(PREDICTIONS of the ensemble on every ground-truth frame, unsmoothed; plus
``ensemble_{split}_smoothed.parquet`` when smoothing), and the plots of :mod:`ferflow.plots`.
With ``--submission-dir``, the (smoothed, when smoothing) ensemble is also written in the ABAW3
format, one file per video and task, every frame of the video
(:func:`ferflow.abaw.export_submission`; the line count is the video's frame count, which does
not depend on how many frames decoded), and checked (:func:`ferflow.abaw.check_submission`;
``--check-submission DIR`` checks a folder on its own); where a video's lines and its frames in the
accounting differ (frames that did not decode, scored frames past the count, no count known) it is
said in the log and in ``metrics.json`` (:func:`ferflow.abaw.frame_count_mismatches`).
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
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import polars as pl

from . import atomic, schemas
from .abaw import check_submission, export_submission, frame_count_mismatches, read_frame_counts, read_test_list
from .ensemble import AUTO_WINDOWS, Aligned, build_ensemble, choose_windows, score, smoothed, smoothing_from
from .inputcheck import error, prog_of
from .truth import PROB_COLS, VA_COLS, EvaluationError, GroundTruth, load_ground_truth


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
    temporal: Mapping[str, str | os.PathLike | pl.DataFrame] | None = None,
    submission_source: str = "frame",
) -> dict:
    """Run the stage and return the content of ``metrics.json``.

    ``metrics.json``::

        {"split": ..., "ensemble": M, "variants": {name: M, ...},   # unsmoothed
         "smoothed": null | {"window": {"expr": We, "va": Wv}, "auto": bool, "chosen_on": split|null,
                             "search": [{"window", "expr_f1", "va_ccc_mean"}...],
                             "ensemble": M, "variants": {name: M}},
         "vote": {"weights": {...}, "va_weights": {...}, "rule": ...},
         "ground_truth": {...}, "inputs": {...}, "outputs": {...},
         "temporal": null | {"ensemble": M, "variants": {name: M}},   # the temporal heads' outputs, unsmoothed
         "submission": null | {"dir", "tasks", "videos", "frames", "smoothed", "source", "problems", "mismatches"}}

    where M holds ``expr_f1`` (macro over 8 classes), ``expr_accuracy``, ``expr_f1_per_class``
    (class name -> F1), ``expr_confusion`` (8x8 counts, rows = truth), ``va_ccc_valence``,
    ``va_ccc_arousal``, ``va_ccc_mean``, ``n_frames`` (scored frames), ``n_expr``, ``n_va``
    (frames with that label), ``n_filled`` / ``n_filled_va`` (frames without the variant's own
    prediction, interpolated) and ``n_no_video`` / ``n_no_video_va`` (frames of videos without
    any prediction, uniform / 0). Undefined numbers are null.

    ``temporal``: the temporal heads' PREDICTIONS per variant (``ferflow.temporal``), aligned,
    filled, soft-voted (same weights) and scored by the same code as the frame-level ones; written
    as ``temporal_{split}.parquet``. ``submission_source`` ``"temporal"`` exports the temporal
    ensemble (unsmoothed) instead of the frame-level one (smoothed when smoothing).

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
    if submission_source not in ("frame", "temporal"):
        raise EvaluationError(f"submission source must be 'frame' or 'temporal', got {submission_source!r}")
    if submission_source == "temporal" and submission_dir is not None and not temporal:
        raise EvaluationError("submission source 'temporal' needs the temporal predictions (--temporal)")
    if temporal is not None and set(temporal) - set(names):
        raise EvaluationError(f"--temporal: unknown variant(s) {sorted(set(temporal) - set(names))}; variants are {names}")
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

    temporal_block = None
    ens_t = None
    if temporal:
        temporal_metrics: dict[str, dict] = {}
        ens_t = build_ensemble(gt, temporal, weights, va_weights,
                               lambda name, a: temporal_metrics.__setitem__(name, score(gt, a)))
        temporal_block = {"ensemble": score(gt, ens_t), "variants": temporal_metrics}
        outputs["temporal"] = str(out_dir / f"temporal_{split}.parquet")
        schemas.write_table(_ensemble_frame(gt, ens_t), outputs["temporal"], schemas.PREDICTIONS)

    result = {
        "split": split,
        "ensemble": ens_metrics,
        "variants": variant_metrics,
        "smoothed": smoothed_block,
        "temporal": temporal_block,
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
        "temporal_inputs": {n: (str(p) if not isinstance(p, pl.DataFrame) else None) for n, p in (temporal or {}).items()},
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
        if submission_source == "temporal":
            final = ens_t
        else:
            final = ens_s if ens_s is not None else ens
        sub = export_submission(gt, final, submission_dir, test_list, frame_counts)
        sub["smoothed"] = submission_source == "frame" and ens_s is not None
        sub["source"] = submission_source
        sub["problems"] = check_submission(submission_dir, frame_counts, test_list)
        listed = list(test_list) if test_list is not None else list(dict.fromkeys(gt.videos()["video"].to_list()))
        rows = (pl.scan_parquet(accounting).filter((pl.col("split") == split) & pl.col("video").is_in(listed))
                .select("split", "video", "frame", "status", "reason").collect())
        sub["mismatches"] = frame_count_mismatches(rows, split, listed, frame_counts or {})
        result["submission"] = sub
        _log(f"submission: {sub['videos']} videos, {sub['frames']} frames in {submission_dir} "
             f"({', '.join(sub['tasks'])}; {submission_source}, {'smoothed' if sub['smoothed'] else 'unsmoothed'})")
        for mismatch in sub["mismatches"]:
            _log(f"submission: frame count: {mismatch}")
        for problem in sub["problems"]:
            _log(f"submission problem: {problem}")

    result = _json_clean(result)
    atomic.write_text(out_dir / "metrics.json", dumps(result))
    if result["submission"] and result["submission"]["problems"]:
        raise EvaluationError(f"submission in {submission_dir} fails its check: {result['submission']['problems'][:5]}")
    return result


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
    t = result.get("temporal")
    if t:
        block("temporal head (per-variant transformer over frame features; unsmoothed)", t["variants"], t["ensemble"])
        lines.append("")
        for k in ("expr_f1", "va_ccc_mean"):
            lines.append(f"temporal head changes ensemble {k} {_fmt(result['ensemble'][k])} -> {_fmt(t['ensemble'][k])}")
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
        prog=prog_of("evaluate"),
        description="Fill, soft-vote, smooth and score the variants' predictions against the ground truth.",
    )
    p.add_argument("--predictions", nargs="+", metavar="NAME=PATH",
                   help="one PREDICTIONS parquet per variant")
    p.add_argument("--weights", nargs="*", metavar="NAME=W",
                   help="weights of the class-probability vote (default 1; unnamed variants get 1)")
    p.add_argument("--va-weights", nargs="*", metavar="NAME=W",
                   help="weights of the valence/arousal mean (default 1; unnamed variants get 1)")
    p.add_argument("--accounting", help="ACCOUNTING parquet (the ground truth)")
    p.add_argument("--split", default="validation", help="split of the ground truth to score (default: validation)")
    p.add_argument("--smoothing", type=_smoothing_arg, default=0, metavar="W|auto",
                   help="centred mean window in frames (odd; 0 = off) or 'auto' to choose it on this split")
    p.add_argument("--smoothing-from", metavar="METRICS_JSON",
                   help="use the windows recorded in another evaluation's metrics.json (e.g. chosen on the "
                        "validation split, for a test split without labels); overrides --smoothing")
    p.add_argument("--smoothing-windows", default=",".join(map(str, AUTO_WINDOWS)), metavar="W,W,...",
                   help="candidate windows for --smoothing auto (default %(default)s)")
    p.add_argument("--out-dir", default="results/evaluation",
                   help="folder for metrics.json, ensemble_<split>.parquet and the plots (default: results/evaluation)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--temporal", nargs="*", metavar="NAME=PATH",
                   help="the temporal heads' PREDICTIONS per variant (ferflow.temporal), scored and voted beside the frame-level ones")
    sub = p.add_argument_group("submission (ABAW3 format)")
    sub.add_argument("--submission-source", choices=("frame", "temporal"), default="frame",
                     help="export the frame-level ensemble (smoothed when smoothing; default) or the temporal one")
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
            temporal=_pairs(args.temporal, "--temporal") or None, submission_source=args.submission_source,
        )
    except (EvaluationError, schemas.SchemaError, FileNotFoundError) as exc:
        error(prog_of("evaluate"), str(exc))
        return 2
    print(format_table(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
