"""Cluster execution: profiles/slurm against a real single-node SLURM cluster, and what it relies on.

The cluster test starts munged + slurmctld + slurmd (tests/slurm_cluster.py; Debian packages
installed in CI by .ci/system-deps) with two partitions, `cpu` (the default) and `gpu` (as named in
the profile), and two fake GPUs, runs the tiny demo through `--workflow-profile profiles/slurm`, and
checks what was submitted and what the jobs saw. The overrides for this test cluster:
`--slurm-status-command squeue` (it has no accounting database, so sacct fails),
a 2 s first status check and a short latency-wait (local disk). It fails, never skips, under CI=true
when SLURM is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import slurm_cluster

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config.yaml"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
PROFILE = REPO / "profiles" / "slurm"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

GPU_RULES = {"train_variant", "predict_variant", "annotate_video"}
SUBMITTED = {"extract_video_faces": 4, "extract_image_faces": 2, "write_shards": 1, "train_variant": 2,
             "predict_variant": 2, "evaluate_ensemble": 1, "report_evaluation": 1,
             "annotate_video": 1}  # the demo ends by annotating one video; make_demo and index_source are localrules

# a faster tiny run: every job's status is polled at growing intervals (2, 12, 22 s, ...), so a
# training job that ends within ~35 s of its submission saves a whole polling round
FAST = """\
training:
  input_size: 32
  batch_size: 32
  epochs: 1
  frame_step: 3
"""


def _require(what: str, why: str | None) -> None:
    if why is None:
        return
    if IN_CI:
        pytest.fail(f"{what} must run in CI, but: {why}")
    pytest.skip(why)


def _plugin_missing() -> str | None:
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[test]')"
    return None


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)  # common.smk puts the workflow's src/ first for the jobs
    env.pop("CUDA_VISIBLE_DEVICES", None)  # whatever a job sees comes from SLURM
    env["OMP_NUM_THREADS"] = "1"
    return env


# ---- what the profile relies on (no cluster needed) ------------------------------------------------
def _parse(*argv: str):
    from snakemake.cli import parse_args

    _, args = parse_args(["-s", str(REPO / "Snakefile"), *argv])
    return args


def test_workflow_profile_replaces_the_default_profile():
    """`--workflow-profile profiles/slurm` (the README's command) drops profiles/default entirely."""
    _require("the SLURM profile test", _plugin_missing())
    args = _parse("--workflow-profile", str(PROFILE))
    assert args.executor == "slurm"
    assert not args.resources, "no GPU count limit on a cluster: SLURM allocates the GPUs"
    assert args.latency_wait == 60 and args.jobs == 100
    assert args.set_resources["train_variant"]["slurm_partition"]
    # the trap the README warns about: --profile alone still loads profiles/default, whose keys win
    trap = _parse("--profile", str(PROFILE))
    assert trap.executor == "slurm" and trap.resources["gpu"].value == 1
    assert not _parse("--profile", str(PROFILE), "--workflow-profile", "none").resources


def test_plugin_requests_gpus_only_for_gpu_rules():
    """gpu=1 becomes `--gpus=1`; gpu=0 (extraction with the Haar detector) and no gpu give no flag."""
    _require("the SLURM profile test", _plugin_missing())
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    def flags(**resources):
        return set_gres_string(SimpleNamespace(resources=Resources(resources))).split()

    assert flags(gpu=1) == ["--gpus=1"]
    assert flags(gpu=0) == []
    assert flags(mem_mb=1000) == []


def test_conda_env_lists_the_package_dependencies():
    """envs/ferflow.yaml (for --sdm conda) pins what pyproject.toml does, except snakemake itself."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    env = yaml.safe_load((REPO / "envs" / "ferflow.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(pip) == sorted(d for d in project if not d.startswith("snakemake"))
    assert not any(d.startswith(("-e", ".", "/")) for d in pip), "relative paths resolve against a copy"
    assert os.access(REPO / "envs" / "ferflow.post-deploy.sh", os.X_OK)


def test_lint_passes():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--cores", "1"], cwd=REPO, env=_base_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- the real cluster -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    _require("the SLURM cluster test", slurm_cluster.why_unusable())
    root = Path(tempfile.mkdtemp(prefix="ffslurm-"))  # short: the munge socket path has a length limit
    c = slurm_cluster.SlurmCluster(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm")
    (work / "fast.yaml").write_text(FAST)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(CONFIG), str(TINY), str(work / "fast.yaml"),
           "--workflow-profile", str(PROFILE),
           # overrides for this test cluster
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
           "--latency-wait", "5"]
    try:
        proc = subprocess.run(cmd, cwd=work, env=cluster.env(_base_env()), capture_output=True, text=True,
                              timeout=900)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the SLURM run did not finish in {exc.timeout} s{cluster.logs()}")
    # SLURM's own record of each job (finished jobs stay in slurmctld for MinJobAge=300 s)
    jobs = subprocess.run(["scontrol", "show", "job", "-o"], env=cluster.env(), capture_output=True, text=True)
    return work, proc, cluster.sbatch_calls(), jobs.stdout.splitlines()


def _rule(call: list[str]) -> str:
    comment = call[call.index("--comment") + 1]  # rule_<name>[_wildcards_<...>]
    return re.match(r"rule_(.+?)(?:_wildcards_.*)?$", comment).group(1)


def _partition(call: list[str]) -> str:
    return call[call.index("-p") + 1]


@pytest.mark.slow
@pytest.mark.slurm
def test_demo_runs_through_the_slurm_profile(slurm_run):
    work, proc, _, _ = slurm_run
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{out[-6000:]}"
    assert "profiles/default" not in out  # only profiles/slurm was used
    assert (work / "results" / "evaluation" / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.slurm
def test_gpu_rules_were_submitted_with_one_gpu_and_the_others_without(slurm_run):
    _, proc, calls, _ = slurm_run
    assert proc.returncode == 0
    rules = [_rule(c) for c in calls]
    assert {r: rules.count(r) for r in set(rules)} == SUBMITTED
    for call, rule in zip(calls, rules):
        gpu_flags = [a for a in call if a.startswith(("--gpus", "--gres", "--gpus-per"))]
        if rule in GPU_RULES:
            assert gpu_flags == ["--gpus=1"], call
            assert _partition(call) == "gpu", call
        else:
            assert gpu_flags == [], call
            assert _partition(call) == "cpu", call  # the cluster's default partition
    # the rules' own resources reach sbatch (train_variant: mem_mb=16000, runtime=24 h)
    train = next(c for c, r in zip(calls, rules) if r == "train_variant")
    assert train[train.index("--mem") + 1] == "16000" and train[train.index("-t") + 1] == "1440"


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_allocated_a_gpu_to_each_gpu_job(slurm_run):
    _, proc, _, jobs = slurm_run
    assert proc.returncode == 0
    gpu_jobs = [j for j in jobs if re.search(r"Comment=rule_(train|predict)_variant", j)]
    assert len(gpu_jobs) == 4, jobs
    for j in gpu_jobs:
        assert "TresPerJob=gres:gpu:1" in j and "Partition=gpu" in j and "JobState=COMPLETED" in j, j


@pytest.mark.slow
@pytest.mark.slurm
def test_gpu_jobs_used_the_device_slurm_gave_them(slurm_run):
    work, proc, _, _ = slurm_run
    assert proc.returncode == 0
    logs = sorted((work / "logs" / "train_variant").glob("*.log")) + sorted(
        (work / "logs" / "predict_variant").glob("*/*.log"))
    assert len(logs) == 4
    for log in logs:
        # ferflow.devices logs the device it was given instead of claiming one itself
        seen = re.findall(r"using CUDA_VISIBLE_DEVICES='([^']*)' as set by the environment", log.read_text())
        assert seen and seen[0] in {"0", "1"}, f"{log}:\n{log.read_text()[:2000]}"
