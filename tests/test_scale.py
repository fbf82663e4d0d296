"""bench/scale.py: the growth exponent, and the bench at 1% of ABAW3 with its outputs read back."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import scale  # noqa: E402


def test_growth_exponent_is_the_slope_of_log_cost_against_log_size():
    assert scale.growth_exponent([10, 100], [2.0, 20.0]) == pytest.approx(1.0)
    assert scale.growth_exponent([1000, 10_000], [5.0, 500.0]) == pytest.approx(2.0)
    assert scale.growth_exponent([28_000, 280_000], [7.0, 7.0]) == pytest.approx(0.0)
    # three points on 3 * x^1.5: least squares gives the power exactly
    xs = [1e4, 1e5, 1e6]
    assert scale.growth_exponent(xs, [3 * x**1.5 for x in xs]) == pytest.approx(1.5)
    # three points off a line in log-log: the least-squares slope, computed by hand
    lx = [math.log(x) for x in xs]
    ly = [math.log(c) for c in (1.0, 12.0, 90.0)]
    mx, my = sum(lx) / 3, sum(ly) / 3
    want = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    assert scale.growth_exponent(xs, [1.0, 12.0, 90.0]) == pytest.approx(want)


def test_growth_exponent_is_nan_without_two_usable_points():
    assert math.isnan(scale.growth_exponent([10], [1.0]))
    assert math.isnan(scale.growth_exponent([10, 100], [0.0, 5.0]))  # a zero cost has no logarithm
    assert math.isnan(scale.growth_exponent([10, 10], [1.0, 2.0]))  # the sizes do not differ


def test_video_lengths_are_heavy_tailed_and_add_up():
    lengths = scale.video_lengths(560, 2_800_000)
    assert abs(sum(lengths) - 2_800_000) < 560  # rounding of each length
    minutes = sorted(n / 30 / 60 for n in lengths)
    assert sum(1 <= m <= 5 for m in minutes) > len(minutes) / 2  # most videos 1-5 minutes
    assert minutes[-1] > 30  # the longest over half an hour
    assert minutes[len(minutes) // 2] < 3  # median well below the mean: a long tail


@pytest.mark.slow
def test_bench_at_one_percent_writes_complete_outputs_that_add_up(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "scale.py"), "--fractions", "0.01", "0.1",
                           "--max-fraction", "0.01", "--work", str(tmp_path), "--keep",
                           "--json", str(tmp_path / "scale.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.startswith("load average ")
    assert "fraction 0.1 " not in proc.stdout  # --max-fraction left 10% out
    work = tmp_path / "f0.01"
    data, res = work / "data", work / "results"

    # the annotated rows, counted from the input files themselves
    expected: dict[tuple[str, str], int] = {}
    per_name: dict[tuple[str, str], int] = {}
    for task_dir in ("EXPR_Classification_Challenge", "VA_Estimation_Challenge"):
        for f in (data / "affwild2" / task_dir).glob("*/*.txt"):
            split = {"Train_Set": "train", "Validation_Set": "validation"}[f.parent.name]
            n = len(f.read_text().splitlines()) - 1
            per_name[(split, f.stem)] = max(per_name.get((split, f.stem), 0), n)  # one row per line of either task
    for (split, _), n in per_name.items():
        expected[("affwild2", split)] = expected.get(("affwild2", split), 0) + n
    csv = data / "affectnet" / "Manually_Annotated_file_lists" / "training.csv"
    expected[("affectnet", "train")] = len(csv.read_text().splitlines()) - 1
    expected[("expw", "train")] = len((data / "expw" / "label" / "label.lst").read_text().splitlines())

    acc = pl.read_parquet(res / "accounting.parquet")
    got = {(s, sp): n for s, sp, n in acc.group_by("source", "split").len().iter_rows()}
    assert got == expected
    assert acc.filter(pl.col("status") == "dropped")["reason"].null_count() == 0
    written = acc.filter(pl.col("status") == "written")
    assert written.height + acc.filter(pl.col("status") == "dropped").height == acc.height

    # every written row is in labels.parquet and in exactly one shard member
    labels = pl.read_parquet(res / "shards" / "labels.parquet")
    assert sorted(labels["key"].to_list()) == sorted(written["key"].to_list())
    members = []
    for shard in sorted((res / "shards").glob("*/shard-*.tar")):
        with tarfile.open(shard) as t:
            members += [m.name[: -len(".jpg")] for m in t.getmembers()]
    assert sorted(members) == sorted(labels["key"].to_list())

    # the loader's plan: the training split's labels, every 2nd frame of a video (all stills)
    plan = json.loads((work / "logs" / "loader.log").read_text().strip().splitlines()[-1])
    train = labels.filter(pl.col("split") == "train")
    assert plan["labels"] == train.height
    assert plan["batches"] == math.ceil(plan["samples"] / 1024)

    # six prediction files, one row per validation sample each; the evaluation scored them all
    validation = labels.filter(pl.col("split") == "validation").height
    for k in range(scale.VARIANTS):
        assert pl.read_parquet(res / "predictions" / f"v{k}" / "validation.parquet").height == validation
    metrics = json.loads((res / "evaluation" / "metrics.json").read_text())
    assert sorted(metrics["variants"]) == [f"v{k}" for k in range(scale.VARIANTS)]
    scored = acc.filter((pl.col("split") == "validation")
                        & ((pl.col("status") == "written") | pl.col("reason").is_in(["no_face", "unreadable_frame"])))
    assert metrics["ground_truth"]["n_frames"] == scored.height

    # the JSON has a measured cost for every stage
    run, = json.loads((tmp_path / "scale.json").read_text())["runs"]
    assert set(run["costs"]) == set(scale.STAGES)
    assert all(c["cpu_s"] > 0 and c["peak_mib"] > 0 for c in run["costs"].values())


def test_stages_flag_runs_a_stage_with_what_it_needs():
    index = {"index_affwild2", "index_affectnet", "index_expw"}
    assert scale.stages_to_run(None) == set(scale.STAGES)
    assert scale.stages_to_run(["loader"]) == index | {"shards", "loader"}
    assert scale.stages_to_run(["evaluate"]) == index | {"shards", "predict_write", "evaluate"}
    assert scale.stages_to_run(["index_expw"]) == index
    with pytest.raises(SystemExit):  # argparse: not a stage
        scale.main(["--stages", "decode"])


@pytest.mark.parametrize("argv, message", [
    (["--fractions", "nan"], "--fractions: nan is not a fraction"),
    (["--fractions", "0"], "--fractions: 0 is not a fraction"),
    (["--fractions", "-0.01"], "--fractions: -0.01 is not a fraction"),
    (["--max-fraction", "0"], "nothing to measure"),
    (["--fractions", "--extract", "--extract-frames", "300"], "give two different lengths"),
    (["--fractions", "--extract-detectors", "haar", "--extract-detector-frames", "0"], "0 frames; give at least 1"),
    (["--fractions", "--evaluate-frames", "-5"], "--evaluate-frames: -5 frames"),
])
def test_bench_refuses_values_it_cannot_measure_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        scale.main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and message in err.strip().splitlines()[-1], err
    assert "load average" not in out  # refused before anything ran


def test_bench_refuses_a_work_path_that_is_a_file_and_a_json_path_that_is_a_folder(capsys, tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for argv, message in ((["--fractions", "0.01", "--work", str(a_file)], "exists and is not a folder"),
                          (["--fractions", "0.01", "--json", str(tmp_path)], "is a folder")):
        with pytest.raises(SystemExit) as exc:
            scale.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
