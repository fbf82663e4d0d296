"""The training split's label index: memory and CPU of building it, and what it costs forked workers.

Compares this checkout's ``src/`` with a baseline (``--baseline``, a git ref, default ``main``: its
``src/`` is exported with ``git archive`` into a temp folder) on the shards of a ``bench/scale.py``
run (``python bench/scale.py --fractions 0.1 --work W --keep --stages loader`` leaves them in
``W/f0.1/results/shards``). Two measurements per side, each in its own process with that side's
``src/`` first on ``sys.path``:

- **plan**: ``bench/scale.py``'s loader stage (:func:`scale.plan_loader`: labels.parquet read, the
  label index with frame_step 2, one epoch's plan with bootstrap and class balance); CPU seconds and
  peak memory of the process, measured as ``bench/scale.py`` measures a stage (:func:`scale.measure`),
  and the process's own ``ru_maxrss`` before it exits (``plan_self_peak_mib``: without the
  interpreter's teardown, which adds a varying few tens of MiB to the stage's peak).
- **fork**: the label index is built, then 2 workers are forked (as the DataLoader's workers are)
  and each looks up every key of the split (:meth:`LabelIndex.lookup` and ``keep[row]``, as a
  worker's ``_attach`` does per sample; the keys come from one numpy bytes array, no Python object
  of the parent's is touched by the loop itself). Then each worker's USS (memory only it holds,
  including the pages copied on write) and PSS are read with psutil's ``memory_full_info``, after
  the lookups, while both are alive.

Rounds run the sides in ABBA order; per round one ratio baseline / this checkout per measure,
printed as the median over the rounds with its range (> 1: this checkout uses less).

    python bench/label_index.py /tmp/w/f0.1/results/shards --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _use_src(src: str) -> None:
    """Import ferflow from ``src`` (before bench/scale.py puts this checkout's src/ first)."""
    sys.path.insert(0, src)
    import ferflow

    if not Path(ferflow.__file__).resolve().is_relative_to(Path(src).resolve()):
        raise RuntimeError(f"ferflow imported from {ferflow.__file__}, not from {src}")
    sys.path.insert(0, str(HERE))


def child_plan(src: str, shards: str) -> None:
    _use_src(src)
    import scale

    scale.plan_loader(shards)
    # the process's own peak before it exits (the stage's peak also holds the interpreter's teardown)
    print(json.dumps({"plan_self_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def child_fork(src: str, shards: str, workers: int = 2) -> None:
    _use_src(src)
    import multiprocessing as mp

    import polars as pl
    import psutil

    from ferflow import data

    import numpy as np

    labels = data.read_labels(shards)
    index = data.label_index(labels, "train", frame_step=2)
    keys = np.array(labels.filter(pl.col("split") == "train")["key"].to_list(), dtype="S")  # one object
    del labels
    gc.collect()
    ctx = mp.get_context("fork")
    done, release = ctx.Barrier(workers + 1), ctx.Event()

    def work() -> None:  # no polars after fork (its thread pool does not survive it)
        kept = 0
        for key in keys:
            kept += bool(index.keep[index.lookup(key.decode("utf-8"), "probe")])
        done.wait()
        release.wait()

    procs = [ctx.Process(target=work) for _ in range(workers)]
    for p in procs:
        p.start()
    done.wait()
    mem = [psutil.Process(p.pid).memory_full_info() for p in procs]
    me = psutil.Process().memory_full_info()
    release.set()
    for p in procs:
        p.join()
    mib = 2**20
    print(json.dumps({"keys": len(keys), "worker_uss_mib": statistics.mean(m.uss for m in mem) / mib,
                      "worker_pss_mib": statistics.mean(m.pss for m in mem) / mib,
                      "parent_rss_mib": me.rss / mib}))


def export_src(ref: str, dest: Path) -> Path:
    """``ref``'s ``src/`` under ``dest`` (git archive)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shards", nargs="?", help="a shards folder (labels.parquet, train/shard-*.tar)")
    ap.add_argument("--baseline", default="main", help="git ref of the baseline (default main)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=3, metavar=("WHAT", "SRC", "SHARDS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        what, src, shards = args.child
        (child_plan if what == "plan" else child_fork)(src, shards)
        return 0
    if not args.shards:
        ap.error("a shards folder is needed")
    sys.path.insert(0, str(HERE))
    import scale
    from _abba import load_line, ratio_line

    print(load_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="label-index-") as tmp:
        tmp = Path(tmp)
        sides = {args.baseline: export_src(args.baseline, tmp), "this": REPO / "src"}
        names = list(sides)
        rounds = []
        for r in range(args.rounds):
            got = {n: {} for n in names}
            for i, name in enumerate(names + names[::-1]):
                src = sides[name]
                c = scale.measure([sys.executable, __file__, "--child", "plan", str(src), args.shards],
                                  tmp / f"plan{i}.log", src=src)
                fork = subprocess.run([sys.executable, __file__, "--child", "fork", str(src), args.shards],
                                      check=True, capture_output=True, text=True,
                                      env={**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"})
                f = json.loads(fork.stdout.strip().splitlines()[-1])
                own = json.loads((tmp / f"plan{i}.log").read_text().strip().splitlines()[-1])
                for k, v in {"plan_cpu_s": c.cpu_s, "plan_peak_mib": c.peak_mib, **own, **f}.items():
                    got[name].setdefault(k, []).append(v)
            rounds.append({n: {k: statistics.mean(v) for k, v in m.items()} for n, m in got.items()})
            print(f"  round {r + 1}: " + "; ".join(
                f"{n} " + ", ".join(f"{k} {v:.1f}" for k, v in rounds[-1][n].items() if k != "keys")
                for n in names), flush=True)
    print(f"\ntrain split: {rounds[0]['this']['keys']:.0f} labels; median over {args.rounds} rounds "
          f"(each side's value in a round: the mean of its 2 runs)")
    measures = ("plan_cpu_s", "plan_peak_mib", "plan_self_peak_mib", "worker_uss_mib", "worker_pss_mib",
                "parent_rss_mib")
    for k in measures:
        med = {n: statistics.median(r[n][k] for r in rounds) for n in names}
        print(f"  {k:18s} " + "  ".join(f"{n} {v:8.1f}" for n, v in med.items()))
    print()
    for k in measures:
        print(ratio_line(f"{k}, {args.baseline} / this", [r[args.baseline][k] / r["this"][k] for r in rounds]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
