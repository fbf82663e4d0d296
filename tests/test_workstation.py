"""Running on one machine: GPU jobs under `--resources gpu=2`, Snakemake's lock, a hard kill and its
resume, and reruns of only the stages a change makes stale.

One full run (module fixture) of a copy of the workflow (Snakefile, workflow/, src/, envs/) in a scratch
folder, on the tiny demo data generated there with the demo switched off, so that the tests can
edit the copied code and add a video the way a user would. Four training variants, two fake GPUs
(FERFLOW_NUM_GPUS=2), `--resources gpu=2`, and enough cores for four jobs, so the GPU limit is what
holds training back. The run is killed hard once training has started, then resumed. Afterwards
every rerun test is a dry run (`-n`) whose job table must list exactly the stale jobs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from workflow_helpers import REPO, TINY, kill_session
VARIANTS = ["a", "b", "c", "d"]

pytestmark = pytest.mark.slow

SETTINGS = """\
demo:
  enabled: false            # the demo data was generated once into demo_data/, like real data
training:
  input_size: 32
  batch_size: 32
  epochs: 1
"""
VARIANTS_YAML = """\
variants:
  - {name: a, seed: 1}
  - {name: b, seed: 2}
  - {name: c, seed: 3, heads: 1}
  - {name: d, seed: 4, heads: 1}
"""


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)  # common.smk puts the copy's src/ first for the jobs
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["FERFLOW_NUM_GPUS"] = "2"  # devices.py believes there are two GPUs and claims one per job
    env["FERFLOW_GPU_LOCK_DIR"] = str(work / "gpu-locks")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cmd(work: Path, *args: str, configs: tuple[Path, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(work / "Snakefile"), "--directory", str(work),
            "--configfile", str(work / "config.yaml"), str(TINY), str(work / "workstation.yaml"),
            *map(str, configs), *args]


RUN_ARGS = ("--cores", "4", "--resources", "gpu=2", "--set-threads", "train_variant=1", "predict_variant=1")


def _run(work: Path, *args: str, configs: tuple[Path, ...] = (), check: bool = True,
         timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(work, *args, configs=configs), cwd=work, env=_env(work), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run, without `all` and `total`; {} when nothing is to be done."""
    if "Nothing to be done" in output:
        return {}
    lines = output.splitlines()
    start = lines.index("Job stats:")
    counts = {}
    for line in lines[start + 3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    counts.pop("all", None)
    return counts


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"snakemake ended ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def workstation(tmp_path_factory):
    work = tmp_path_factory.mktemp("workstation")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copy2(REPO / "Snakefile", work / "Snakefile")
    shutil.copy2(REPO / "config.yaml", work / "config.yaml")
    shutil.copytree(REPO / "workflow", work / "workflow", ignore=ignore)
    shutil.copytree(REPO / "src", work / "src", ignore=ignore)
    shutil.copytree(REPO / "envs", work / "envs")
    (work / "workstation.yaml").write_text(SETTINGS + VARIANTS_YAML)
    subprocess.run([sys.executable, "-m", "ferflow.demo", "--root", str(work / "demo_data"), "--seed", "0",
                    "--size", "tiny"], cwd=work, env={**_env(work), "PYTHONPATH": str(work / "src")},
                   check=True, capture_output=True, timeout=300)
    info = {}

    # 1. the full run, in the background, in its own process group (to kill it like a power cut)
    with open(work / "first_run.log", "w") as out:
        first = subprocess.Popen(_cmd(work, *RUN_ARGS), cwd=work, env=_env(work), stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        locks = work / ".snakemake" / "locks"
        _wait_for(lambda: locks.is_dir() and any(locks.iterdir()), 120, "the lock", first)
        # 2. a second snakemake on the same folder while the first runs. It is refused either by
        # the lock or, when it looks while a job of the first run is finishing (its output written,
        # the job not yet done), because that output is still marked incomplete; then look again.
        info["second"] = []
        for _ in range(5):
            info["second"].append(_run(work, "--cores", "1", check=False, timeout=300))
            if "LockException" in info["second"][-1].stderr or first.poll() is not None:
                break
        # 3. kill everything hard once training has started
        train_logs = work / "logs" / "train_variant"
        _wait_for(lambda: any("claimed GPU" in f.read_text() for f in train_logs.glob("*.log")), 400,
                  "a training job", first)
    finally:
        kill_session(first)
    info["killed_models"] = sorted(p.parent.name for p in (work / "results" / "models").glob("*/model.pt"))
    # 4. the next plain run is refused (stale lock); --unlock, then --rerun-incomplete resumes
    info["after_kill"] = _run(work, *RUN_ARGS, check=False)
    info["unlock"] = _run(work, "--unlock", "--cores", "1")
    info["resumed"] = _run(work, *RUN_ARGS, "--rerun-incomplete")
    return work, info


# ---- lock, kill, resume --------------------------------------------------------------------------
def test_second_snakemake_is_refused_by_the_lock(workstation):
    _, info = workstation
    for second in info["second"]:
        out = second.stdout + second.stderr
        assert second.returncode != 0 and ("LockException" in out or "seem to be incomplete" in out), out[-3000:]
    assert "LockException" in info["second"][-1].stdout + info["second"][-1].stderr


def test_hard_kill_resumes_with_rerun_incomplete(workstation):
    work, info = workstation
    assert info["killed_models"] != VARIANTS, "the kill came after every variant had trained"
    refused = info["after_kill"]
    assert refused.returncode != 0 and "--unlock" in refused.stdout + refused.stderr
    assert "Unlocked working directory" in info["unlock"].stdout + info["unlock"].stderr
    metrics = json.loads((work / "results" / "evaluation" / "metrics.json").read_text())
    assert set(metrics["variants"]) == set(VARIANTS)
    for v in VARIANTS:
        assert (work / "results" / "models" / v / "model.pt").stat().st_size > 0
        assert (work / "results" / "predictions" / v / "validation.parquet").exists()
    assert job_counts(_run(work, "-n").stdout) == {}


# ---- GPU jobs under --resources gpu=2 ------------------------------------------------------------
def _stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _gpu_jobs(work: Path) -> list[dict]:
    """Every training and prediction job of the resumed run.

    ``start``/``end``: Snakemake's own record of the job (metadata of its first output), i.e. when
    the scheduler counted it against ``gpu=2``. ``device``, ``claimed``, ``last``: from the job's
    log, the GPU that ferflow.devices claimed ("claimed GPU i of 2", logged right after the flock)
    and the times of that line and of the last line, an interval inside the time the lock was held.
    """
    jobs = []
    outputs = {f"train {v}": (f"results/models/{v}/model.pt", f"logs/train_variant/{v}.log") for v in VARIANTS}
    outputs.update({f"predict {v}": (f"results/predictions/{v}/validation.parquet",
                                     f"logs/predict_variant/{v}/validation.log") for v in VARIANTS})
    for job, (output, log) in outputs.items():
        meta = json.loads((work / ".snakemake" / "metadata" / base64.b64encode(output.encode()).decode()).read_text())
        lines = (work / log).read_text().splitlines()
        claims = [line for line in lines if "claimed GPU" in line]
        assert len(claims) == 1, f"{log}: {claims}"
        jobs.append({"job": job, "start": meta["starttime"], "end": meta["endtime"],
                     "device": re.search(r"claimed GPU (\d+) of 2", claims[0]).group(1),
                     "claimed": _stamp(claims[0]), "last": _stamp(lines[-1])})
    return jobs


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])  # ends first at ties
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_at_most_two_gpu_jobs_at_a_time_each_on_its_own_device(workstation):
    work, _ = workstation
    jobs = _gpu_jobs(work)
    table = "\n".join(f"{j['job']}: {j['start']:.2f}-{j['end']:.2f} GPU {j['device']} "
                      f"({j['claimed']:.2f}-{j['last']:.2f})" for j in jobs)
    # the scheduler ran two GPU jobs side by side (four would have fitted in --cores 4), never three
    assert _most_at_once([(j["start"], j["end"]) for j in jobs]) == 2, table
    # jobs alive at the same time held different devices
    for i, a in enumerate(jobs):
        for b in jobs[i + 1:]:
            if a["claimed"] < b["last"] and b["claimed"] < a["last"]:
                assert a["device"] != b["device"], f"{a['job']} and {b['job']} shared GPU {a['device']}\n{table}"
    # and training used both devices
    assert {j["device"] for j in jobs if j["job"].startswith("train")} == {"0", "1"}, table


# ---- only stale stages rerun -----------------------------------------------------------------------
TRAIN_ON = {"train_variant": 4, "predict_variant": 4, "evaluate_ensemble": 1, "report_evaluation": 1}


def _dry_run(work: Path, configs: tuple[Path, ...] = ()) -> dict[str, int]:
    return job_counts(_run(work, "-n", *RUN_ARGS, configs=configs).stdout)


def test_a_training_parameter_reruns_training_onward(workstation, tmp_path):
    work, _ = workstation
    change = tmp_path / "lr.yaml"
    change.write_text("training:\n  lr: 0.002\n")
    assert _dry_run(work, (change,)) == TRAIN_ON


def test_one_variant_parameter_reruns_that_variant_only(workstation, tmp_path):
    work, _ = workstation
    change = tmp_path / "variant.yaml"
    change.write_text(VARIANTS_YAML.replace("seed: 4", "seed: 5"))
    assert _dry_run(work, (change,)) == {"train_variant": 1, "predict_variant": 1, "evaluate_ensemble": 1,
                                         "report_evaluation": 1}


def test_samples_per_shard_reruns_shards_onward(workstation, tmp_path):
    work, _ = workstation
    change = tmp_path / "shards.yaml"
    change.write_text("shards:\n  samples_per_shard: 32\n")
    assert _dry_run(work, (change,)) == {"write_shards": 1, **TRAIN_ON}


def test_a_new_video_is_extracted_alone(workstation):
    work, _ = workstation
    aff = work / "demo_data" / "affwild2"
    video = next(aff.glob("videos/t02-*"))  # a train-split video with one person
    new = f"t05{video.stem[3:]}"
    added = [aff / "videos" / f"{new}{video.suffix}"]
    shutil.copy2(video, added[0])
    for task_dir in ("EXPR_Classification_Challenge", "VA_Estimation_Challenge"):
        src = aff / task_dir / "Train_Set" / f"{video.stem}.txt"
        added.append(src.with_name(f"{new}.txt"))
        shutil.copy2(src, added[-1])
    try:
        counts = _dry_run(work)
    finally:
        for f in added:
            f.unlink()
    # its source is indexed again (one manifest per source), the other videos are not extracted again
    assert counts == {"index_source": 1, "extract_video_faces": 1, "write_shards": 1, **TRAIN_ON}
    assert _dry_run(work) == {}


@pytest.mark.parametrize("module, expected", [
    ("train", TRAIN_ON),
    ("evaluate", {"evaluate_ensemble": 1, "report_evaluation": 1}),
    ("report", {"report_evaluation": 1}),
    ("extract", {"extract_video_faces": 4, "extract_image_faces": 2, "write_shards": 1, **TRAIN_ON}),
])
def test_a_code_change_reruns_its_stage_onward(workstation, module, expected):
    work, _ = workstation
    path = work / "src" / "ferflow" / f"{module}.py"
    original = path.read_bytes()
    path.write_bytes(original + b"\nEDITED_BY_A_TEST = True\n")  # code: a comment reruns nothing (test_codeversion.py)
    try:
        counts = _dry_run(work)
    finally:
        path.write_bytes(original)
    assert counts == expected
