"""Benchmark of the ensemble step of ``ferflow.ensemble`` against polars and pandas versions.

The step: from an ACCOUNTING table and the PREDICTIONS of several variants (in memory), select the
scored frames of the split, fill each variant's missing frames by linear interpolation within each
video (ends copied, uniform / 0 for videos without predictions) and soft-vote (mean of
probabilities and of VA) onto every scored frame. Ours is ``truth.ground_truth_from_accounting``
+ ``ensemble.build_ensemble`` (integer codes + numpy searchsorted). The baselines are what one
would write with a data-frame library:

- ``polars`` (the headline's baseline): a full join of the scored frames with each variant,
  ``interpolate_by("frame").over(source, video)`` then forward / backward fill (the ends), the
  defaults for the rest, the mean; polars' own multi-threaded kernels;
- ``pandas``: merge, ``groupby(video).apply(interpolate(method="index"))``, mean: the textbook
  pandas version (one Python call per video).

All run side by side in this process in alternating rounds (``bench/_abba.py``: ours, polars,
pandas, pandas, polars, ours; the median per-round ratio with its range; the load average is
printed first), on the same data; the results are checked equal in the first round.

Memory: the median over runs of each one's peak resident set size (sampled every 2 ms by a thread)
above its size when the step started. tracemalloc is not used: it does not see polars' (Rust)
allocations. So that one run's freed memory does not hide the next run's peak, jemalloc (polars)
is told to return freed pages at once (``_RJEM_MALLOC_CONF``, set before polars is imported) and
glibc's ``malloc_trim`` runs between steps.

Bench dependency (not a project dependency): pandas (``pip install pandas``).

    python bench/evaluate.py                      # 5 variants, 500k frames (a few minutes on 2 cores)
    python bench/evaluate.py --frames 3000000     # Aff-Wild2's scale
    python bench/evaluate.py --frames 20000 --rounds 1   # smoke mode (tests)
"""

from __future__ import annotations

import os

# before polars loads: return freed memory to the OS immediately, so RSS peaks are comparable
os.environ.setdefault("_RJEM_MALLOC_CONF", "background_thread:false,dirty_decay_ms:0,muzzy_decay_ms:0")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ferflow import ensemble, schemas, truth  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _abba import load_line, ratio_line, ratios, run_rounds  # noqa: E402

try:
    import pandas as pd
except ImportError:  # pragma: no cover
    sys.exit("bench/evaluate.py needs pandas for its baseline: pip install pandas")

KEYS = ["source", "video", "frame"]
PROB_COLS = [f"p{i}" for i in range(8)]
COLS = PROB_COLS + ["valence", "arousal"]
PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------------------
# synthetic data


def make_data(frames: int, variants: int, mean_video: int, seed: int = 0):
    """Accounting (scored frames + some unscored rows) and predictions of each variant."""
    rng = np.random.default_rng(seed)
    n_videos = max(3, frames // mean_video)
    lengths = rng.integers(mean_video // 2, mean_video * 3 // 2, n_videos)
    lengths = np.maximum(1, np.round(lengths * frames / lengths.sum()).astype(np.int64))
    total = int(lengths.sum())
    vid = np.repeat(np.arange(n_videos), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    frame = np.arange(total) - starts
    names = np.array([f"{10 + v}-{30 + v % 17}-1280x720{'_left' if v % 9 == 0 else ''}" for v in range(n_videos)])
    u = rng.random(total)
    status = np.where(u < 0.10, "dropped", "written")
    reason = pl.Series("reason", np.where(u < 0.07, "no_face", "unannotated")).zip_with(
        pl.Series(u < 0.10), pl.Series([None], dtype=pl.String)
    )
    acc = pl.DataFrame({
        "source": np.where(vid % 4 == 0, "affwild2_b", "affwild2"),
        "split": "validation",
        "video": names[vid],
        "frame": frame,
        "expression": rng.integers(0, 8, total).astype(np.int8),
        "valence": rng.uniform(-1, 1, total).astype(np.float32),
        "arousal": rng.uniform(-1, 1, total).astype(np.float32),
        "status": status,
        "reason": reason,
        "key": pl.Series([None] * total, dtype=pl.String),
        # per-task label fates (ACCOUNTING); the ensemble step does not read them
        "expr_fate": pl.Series([None] * total, dtype=pl.String),
        "va_fate": pl.Series([None] * total, dtype=pl.String),
    })
    acc = schemas.conform(acc, schemas.ACCOUNTING, "bench")
    faces = acc.filter(pl.col("status") == "written")
    preds = {}
    for i in range(variants):
        keep = rng.random(faces.height) > 0.03  # a few more frames lost per variant
        lost_videos = rng.choice(n_videos, size=max(1, n_videos // 100), replace=False)
        df = faces.filter(pl.Series(keep) & ~pl.col("video").is_in(names[lost_videos].tolist()))
        n = df.height
        logits = rng.standard_normal((n, 8), dtype=np.float32)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        va = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
        df = df.select("split", "source", "video", "frame").with_columns(
            **{c: pl.Series(c, p[:, j]) for j, c in enumerate(PROB_COLS)},
            valence=pl.Series(va[:, 0]), arousal=pl.Series(va[:, 1]),
        )
        preds[f"v{i}"] = schemas.conform(df, schemas.PREDICTIONS, "bench")
    return acc, preds


# ------------------------------------------------------------------------------------------------
# the two implementations


def ours(acc: pl.DataFrame, preds: dict[str, pl.DataFrame], split: str = "validation") -> np.ndarray:
    gt = truth.ground_truth_from_accounting(acc, split)
    ens = ensemble.build_ensemble(gt, preds)
    return np.concatenate([ens.probs, ens.va], axis=1)


def polars_baseline(acc: pl.DataFrame, preds: dict[str, pl.DataFrame], split: str = "validation") -> np.ndarray:
    """With polars' expressions: full join, interpolate by frame within each video, fill, mean."""
    gt = (acc.lazy().filter((pl.col("split") == split)
                            & ((pl.col("status") == "written") | (pl.col("reason") == "no_face")))
          .select(KEYS).with_columns(scored=pl.lit(True)))
    total = None
    for p in preds.values():
        m = (gt.join(p.lazy().select(KEYS + COLS), on=KEYS, how="full", coalesce=True)
             .sort(KEYS)
             # predicted frames that are not scored still anchor the interpolation
             .with_columns(pl.col(COLS).interpolate_by("frame").forward_fill().backward_fill().over("source", "video"))
             .filter(pl.col("scored"))
             .with_columns(pl.col(PROB_COLS).fill_null(1 / 8), pl.col("valence", "arousal").fill_null(0.0))
             .select(COLS).collect())
        values = m.to_numpy().astype(np.float64)
        total = values if total is None else total + values
    return total / len(preds)


def _fill_group(g: pd.DataFrame) -> pd.DataFrame:
    filled = g.set_index("frame")[COLS].interpolate(method="index", limit_direction="both")
    return filled.set_axis(g.index)


def pandas_baseline(acc: pd.DataFrame, preds: dict[str, pd.DataFrame], split: str = "validation") -> np.ndarray:
    """What one writes first: merge, groupby-apply interpolate, fill the rest, mean."""
    gt = acc[(acc["split"] == split) & ((acc["status"] == "written") | (acc["reason"] == "no_face"))][KEYS]
    gt = gt.sort_values(KEYS).reset_index(drop=True)
    total = None
    for p in preds.values():
        # outer: predicted frames that are not scored still anchor the interpolation
        m = gt.merge(p[KEYS + COLS], on=KEYS, how="outer", indicator=True).sort_values(KEYS)
        m[COLS] = m.groupby(["source", "video"], sort=False, group_keys=False)[["frame", *COLS]].apply(_fill_group)
        m = m[m["_merge"] != "right_only"]
        m[PROB_COLS] = m[PROB_COLS].fillna(1 / 8)
        m[["valence", "arousal"]] = m[["valence", "arousal"]].fillna(0.0)
        values = m[COLS].to_numpy(dtype=np.float64)
        total = values if total is None else total + values
    return total / len(preds)


# ------------------------------------------------------------------------------------------------
# measuring


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(fn, *args):
    """(seconds, peak RSS above the start in bytes, RSS at the start, result)."""
    _trim()
    start_rss = _rss()
    peak = [start_rss]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - t0
    peak[0] = max(peak[0], _rss())
    stop.set()
    t.join()
    return seconds, peak[0] - start_rss, start_rss, result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=500_000, help="scored frames in all (default 500k)")
    ap.add_argument("--variants", type=int, default=5)
    ap.add_argument("--mean-video", type=int, default=5000, help="mean frames per video")
    ap.add_argument("--rounds", type=int, default=3, help="ABBA rounds (default 3)")
    args = ap.parse_args(argv)
    print(load_line(), flush=True)

    t0 = time.perf_counter()
    acc, preds = make_data(args.frames, args.variants, args.mean_video)
    acc_pd = acc.to_pandas()
    preds_pd = {k: v.to_pandas() for k, v in preds.items()}
    n_pred = sum(p.height for p in preds.values())
    print(
        f"data: {acc.height} accounting rows, {acc['video'].n_unique()} videos, {args.variants} variants, "
        f"{n_pred} predicted frames ({time.perf_counter() - t0:.1f} s to make); "
        f"polars {pl.__version__} ({pl.thread_pool_size()} threads), pandas {pd.__version__}",
        flush=True,
    )

    impls = {"ours": (ours, acc, preds), "polars": (polars_baseline, acc, preds), "pandas": (pandas_baseline, acc_pd, preds_pd)}
    peaks: dict[str, list[int]] = {k: [] for k in impls}
    check: dict[str, np.ndarray] = {}

    def side(name):
        fn, a, p = impls[name]

        def run() -> float:
            seconds, peak, _, result = measure(fn, a, p)
            peaks[name].append(peak)
            if not peaks[name][1:]:  # its first run: kept for the check
                check[name] = result
            return seconds

        return run

    print("seconds per round (two runs each):", flush=True)
    sides = {name: side(name) for name in impls}
    per_round = run_rounds(sides, 1, log=lambda line: print(line, flush=True))
    for name in ("polars", "pandas"):
        np.testing.assert_allclose(check[name], check["ours"], atol=2e-5)
    print(f"  results agree (max abs diff polars {np.abs(check['ours'] - check['polars']).max():.1e}, "
          f"pandas {np.abs(check['ours'] - check['pandas']).max():.1e}; {check['ours'].shape[0]} frames)", flush=True)
    check.clear()
    if args.rounds > 1:
        per_round += run_rounds(sides, args.rounds - 1, log=lambda line: print(line, flush=True), first=2)
    peak = {k: statistics.median(v) / 2**20 for k, v in peaks.items()}
    print("peak memory above the start, median over runs: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in peak.items()))
    print(ratio_line("RATIO ours / polars (interpolate_by over videos), speed", ratios(per_round, "polars", "ours"),
                     goal="goal >= 1.0"))
    print(ratio_line("      ours / pandas (groupby-apply interpolate), speed", ratios(per_round, "pandas", "ours")))
    print(f"      memory: ours {peak['ours'] / peak['polars']:.2f} of polars' peak, {peak['ours'] / peak['pandas']:.2f} "
          f"of pandas' peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
