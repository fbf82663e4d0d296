"""How long `snakemake -n` takes on an Aff-Wild2-sized dataset, against an empty workflow.

Generates, in a temporary folder, the ABAW3 layout of Aff-Wild2 with ``--videos`` videos (empty
video files; annotation files holding only their header line: a dry run reads no video, and counts
the annotation lines only for the extraction jobs' resources, ~0.1 s for Aff-Wild2's 33 MB), about
3% of them with two annotated people (``_left``/``_right``), 80% in Train_Set and 20% in
Validation_Set, EXPR annotations for about 55% of the videos and VA for about 75%. The config is
config.yaml with the demo off, that one source, and ``--variants`` training variants. Then it times
``snakemake -n`` of ferflow on it (parse, schema validation, listing the layout, input functions,
the DAG of every job, per-stage code hashes) and of a Snakefile with one empty rule (the fixed cost
of starting Snakemake) in alternating rounds (``bench/_abba.py``: ferflow, empty, empty, ferflow),
and prints the load average first, the median seconds of each, and the median per-round ratio
with its range.

Goal (issue 7): the full dry run under 20 s on the 2-core development machine.

``--baseline DIR`` also times another checkout of ferflow (e.g. ``git worktree add /tmp/base main``)
in the same rounds, alternating, in a work folder of its own, and prints the median ratio of this
checkout to it. ``--video-mib N`` makes each video a sparse file of N MiB instead of an empty one
(the content fingerprints read 2 MiB of each; the first round computes them, later rounds take
them from the cache, as a second run on an unchanged dataset does).

    python bench/dag.py                        # 560 videos, 6 variants, 3 rounds
    python bench/dag.py --videos 20 --variants 2 --rounds 1     # smoke mode (tests)
    python bench/dag.py --baseline /tmp/base --video-mib 50
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _abba import load_line, ratio_line, run_rounds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXPR_HEADER = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n"
VA_HEADER = "valence,arousal\n"


def make_layout(root: Path, n_videos: int, video_mib: int = 0) -> int:
    """Write the Aff-Wild2 layout under root; returns the number of annotation files."""
    videos = root / "videos"
    videos.mkdir(parents=True)
    n_files = 0
    for i in range(n_videos):
        stem = f"{i:03d}-30-{'1280x720' if i % 3 else '640x360'}"
        video = videos / f"{stem}{'.avi' if i % 7 == 0 else '.mp4'}"
        with open(video, "wb") as fh:
            fh.truncate(video_mib << 20)  # sparse: no disk space
        split = "Validation_Set" if i % 5 == 0 else "Train_Set"
        people = [f"{stem}_left", f"{stem}_right"] if i % 33 == 0 else [stem]
        tasks = []
        if i % 20 < 11:
            tasks.append(("EXPR_Classification_Challenge", EXPR_HEADER))
        if i % 4 != 3 or not tasks:
            tasks.append(("VA_Estimation_Challenge", VA_HEADER))
        for task_dir, header in tasks:
            d = root / task_dir / split
            d.mkdir(parents=True, exist_ok=True)
            for name in people:
                (d / f"{name}.txt").write_text(header)
                n_files += 1
    return n_files


def write_config(work: Path, data: Path, n_variants: int) -> Path:
    config = {
        "demo": {"enabled": False},
        "sources": [{"name": "affwild2", "kind": "affwild2", "root": str(data),
                     "splits": {"Train_Set": "train", "Validation_Set": "validation"}, "tasks": ["expr", "va"]}],
        "variants": [{"name": f"v{i}", "seed": i} for i in range(1, n_variants + 1)],
    }
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def dry_run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=560)
    p.add_argument("--variants", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3, help="ABBA rounds (default 3)")
    p.add_argument("--baseline", type=Path, help="another ferflow checkout to time in the same rounds")
    p.add_argument("--video-mib", type=int, default=0, help="size of each (sparse) video file")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ferflow-dag-") as tmp:
        tmp = Path(tmp)
        data = tmp / "affwild2"
        n_files = make_layout(data, args.videos, args.video_mib)
        work = tmp / "work"
        work.mkdir()
        config = write_config(work, data, args.variants)
        empty = tmp / "empty"
        empty.mkdir()
        (empty / "Snakefile").write_text("rule all:\n    input: [],\n")

        full_cmd = [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "--directory", str(work),
                    "--configfile", str(REPO / "config.yaml"), str(config), "--cores", "1"]
        empty_cmd = [sys.executable, "-m", "snakemake", "-n", "-s", str(empty / "Snakefile"), "--cores", "1"]
        other_cmd = other = None
        if args.baseline is not None:
            other = tmp / "work-baseline"
            other.mkdir()
            other_cmd = [*full_cmd[:5], str(args.baseline / "Snakefile"), "--directory", str(other),
                         "--configfile", str(args.baseline / "config.yaml"), *full_cmd[10:]]
        print(load_line())
        print(f"layout: {args.videos} videos of {args.video_mib} MiB, {n_files} annotation files, "
              f"{args.variants} variants; seconds per round (two runs each):", flush=True)
        jobs = []

        def full() -> float:
            seconds, out = dry_run(full_cmd, work)
            m = re.search(r"^total\s+(\d+)$", out, re.MULTILINE)
            jobs.append(int(m.group(1)) if m else None)
            return seconds

        sides = {"ferflow": full, "empty": lambda: dry_run(empty_cmd, empty)[0]}
        if other_cmd is not None:
            sides["baseline"] = lambda: dry_run(other_cmd, other)[0]
        per_round = run_rounds(sides, args.rounds, log=lambda line: print(line, flush=True))
        f = statistics.median(r["ferflow"] / 2 for r in per_round)
        b = statistics.median(r["empty"] / 2 for r in per_round)
        print(f"snakemake -n, median per run: ferflow {f:.2f} s ({jobs[-1]} jobs), empty workflow {b:.2f} s; "
              f"goal < 20 s: {'met' if f < 20 else 'NOT met'}")
        print(ratio_line("RATIO ferflow dry run / empty workflow's, time", [r["ferflow"] / r["empty"] for r in per_round],
                         digits=1))
        if other_cmd is not None:
            print(ratio_line("      this checkout / baseline checkout, time (first round: fingerprints computed)",
                             [r["ferflow"] / r["baseline"] for r in per_round]))


if __name__ == "__main__":
    main()
