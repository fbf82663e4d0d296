"""Hard faults: a full disk while the shards are written, and kill -9 of the whole run during
extraction, shard writing, training and evaluation.

A failed shard write leaves the outputs of the last run (or none), never a half-written shard,
labels.parquet or accounting, and no temporary file. A killed run, started again as docs/running.md
says (``--unlock``, then ``--rerun-incomplete``), completes with exactly the metrics and predictions
of an uninterrupted run: every stage is deterministic on the CPU (training resumes exactly from its
last checkpoint, see tests/test_train.py; prediction and evaluation are plain functions of the
weights and the shards, run with the same thread count), so the comparison is exact.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from ferflow import atomic, shards
from ferflow.schemas import PREDICTIONS, read_table
from workflow_helpers import CONFIG, REPO, TINY, env, kill_session, snakemake


# ---- a full disk while writing the shards ----------------------------------------------------------
def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def shard_inputs(tmp_path):
    from test_shards import make_unit, manifest_rows
    from ferflow.schemas import MANIFEST, write_table

    faces = [make_unit(tmp_path, "aw", "v1", ["v1"], 10), make_unit(tmp_path, "aw", "v2", ["v2"], 6)]
    m = pl.concat([manifest_rows("aw", "train", "v1", "v1", list(range(10))),
                   manifest_rows("aw", "validation", "v2", "v2", list(range(6)))])
    write_table(m, tmp_path / "m.parquet", MANIFEST)
    return tmp_path, [str(tmp_path / "m.parquet")], faces


def _no_space(monkeypatch, what: str, after: int = 0) -> None:
    """Make the ``after``-th shard member (what="member"), or the labels / accounting parquet,
    fail half-written with ENOSPC."""
    if what == "member":
        original = tarfile.TarFile.addfile
        calls = {"n": 0}

        def addfile(self, info, fileobj=None, **kw):
            calls["n"] += 1
            if calls["n"] > after:
                self.fileobj.write(b"\0" * 700)  # a header and part of a member reached the disk
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(self, info, fileobj, **kw)

        monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    else:
        original_parquet = pl.DataFrame.write_parquet

        def write_parquet(self, file, *args, **kw):
            if what in Path(file).name:
                Path(file).write_bytes(b"PAR1 half a parquet")
                raise OSError(errno.ENOSPC, "No space left on device")
            return original_parquet(self, file, *args, **kw)

        monkeypatch.setattr(pl.DataFrame, "write_parquet", write_parquet)


@pytest.mark.parametrize("previous", [False, True], ids=["first-run", "over-a-previous-run"])
@pytest.mark.parametrize("what", ["member", "labels", "accounting"])
def test_a_full_disk_leaves_no_half_written_shard(shard_inputs, monkeypatch, what, previous):
    root, manifests, faces = shard_inputs
    out, acc = root / "results" / "shards", root / "results" / "accounting.parquet"
    before: dict[str, bytes] = {}
    if previous:  # the outputs of an earlier run (other shard size) must survive the failed one
        shards.write_shards(manifests, faces, str(out), str(acc), samples_per_shard=3, seed=0)
        before = {**_tree(out), "accounting": acc.read_bytes()}
    _no_space(monkeypatch, what, after=5)
    with pytest.raises(OSError) as info:
        shards.write_shards(manifests, faces, str(out), str(acc), samples_per_shard=4, seed=0)
    assert info.value.errno == errno.ENOSPC
    if previous:
        assert {**_tree(out), "accounting": acc.read_bytes()} == before
    else:
        assert not out.exists() and not acc.exists()
    # no temporary file or folder is left beside the outputs
    assert sorted(p.name for p in (root / "results").iterdir()) == (["accounting.parquet", "shards"] if previous else [])


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    """kill -9 cannot clean up: the next write of the same target removes what it left."""
    target = tmp_path / "shards"
    left_dir = tmp_path / ".shards.abcd1234.tmp"
    (left_dir / "train").mkdir(parents=True)
    (left_dir / "train" / "shard-00000.tar").write_bytes(b"half")
    (tmp_path / ".shards.old").mkdir()
    left_file = tmp_path / ".labels.parquet.abcd1234.parquet.tmp"
    left_file.write_bytes(b"half")
    other = tmp_path / ".shards-other.abcd1234.tmp"  # not a temporary of these targets: kept
    other.mkdir()
    with atomic.atomic_dir(target) as d:
        (d / "x").write_text("1")
    atomic.write_text(tmp_path / "labels.parquet", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shards-other.abcd1234.tmp", "labels.parquet", "shards"]


# ---- kill -9 of the whole run at each stage ----------------------------------------------------------
SETTINGS = """\
training:
  input_size: 32
  checkpoint_every: 2      # a kill during training lands after a checkpoint: training resumes
"""
STAGES = ("extract", "shards", "train", "evaluate")


def _session_pids(sid: int) -> list[int]:
    """Processes of the session ``sid`` (the killed run's Snakemake and everything it started)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[3]) == sid:  # fields after the name: state ppid pgrp session
                pids.append(int(d.name))
    return pids


def _running(sid: int, module: str) -> bool:
    for pid in _session_pids(sid):
        try:
            cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"ferflow.{module}".encode() in cmd:
            return True
    return False


def _cmd(work: Path, overlay: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
            "--configfile", str(CONFIG), str(TINY), str(overlay), "--cores", "2", *args]


def _kill_during(work: Path, overlay: Path, stage: str, ready, *args: str) -> dict:
    """Start the run, SIGKILL its whole process group once ``ready()`` holds while a
    ``python -m ferflow.<stage>`` job runs; wait until every process of the run is gone."""
    with open(work / f"killed-{stage}.log", "w") as log:
        proc = subprocess.Popen(_cmd(work, overlay, *args), cwd=work, env=env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (_running(proc.pid, stage) and ready()):
            if proc.poll() is not None:
                raise AssertionError(f"the run ended ({proc.returncode}) before {stage} ran:\n"
                                     + (work / f"killed-{stage}.log").read_text()[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {stage}")
            time.sleep(0.02)
    finally:
        kill_session(proc)
    deadline = time.monotonic() + 30
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _session_pids(proc.pid), "processes of the killed run survived"
    return {"returncode": proc.returncode}


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    runs = {}
    for name in ("uninterrupted", "killed"):
        (base / name).mkdir()
        (base / name / "settings.yaml").write_text(SETTINGS)
    overlay = base / "uninterrupted" / "settings.yaml"
    snakemake(base / "uninterrupted", configs=(CONFIG, TINY, overlay))

    work, overlay = base / "killed", base / "killed" / "settings.yaml"
    models = work / "results" / "models"
    checkpoint = {}

    def mid_training() -> bool:  # a checkpoint written, the variant not finished
        for v in ("a", "b"):
            if (models / v / "last.pt").exists() and not (models / v / "model.pt").exists():
                checkpoint["variant"] = v
                return True
        return False

    ready = {"extract": lambda: True, "shards": lambda: True, "train": mid_training, "evaluate": lambda: True}
    for i, stage in enumerate(STAGES):
        args = () if i == 0 else ("--rerun-incomplete",)
        if i:
            snakemake(work, "--unlock", configs=(CONFIG, TINY, overlay))
        runs[stage] = _kill_during(work, overlay, stage, ready[stage], *args)
        if stage == "train":
            ckpt = torch.load(models / checkpoint["variant"] / "last.pt", weights_only=True)
            runs["checkpoint"] = (checkpoint["variant"], ckpt["epoch"], ckpt["step"])
    refused = snakemake(work, configs=(CONFIG, TINY, overlay), check=False)
    snakemake(work, "--unlock", configs=(CONFIG, TINY, overlay))
    resumed = snakemake(work, "--rerun-incomplete", configs=(CONFIG, TINY, overlay))
    return base, runs, refused, resumed


@pytest.mark.slow
def test_a_run_killed_at_every_stage_resumes_to_the_same_metrics(killed_and_resumed):
    base, runs, refused, resumed = killed_and_resumed
    assert all(r["returncode"] == -signal.SIGKILL for s, r in runs.items() if s in STAGES)
    # the stale lock is reported with its remedy
    assert refused.returncode != 0 and "--unlock" in refused.stdout + refused.stderr
    # the training kill landed mid-epoch, after a checkpoint: training resumed from it
    variant, epoch, step = runs["checkpoint"]
    assert epoch == 0 and step > 0, runs["checkpoint"]
    assert "resumed from" in (base / "killed" / "logs" / "train_variant" / f"{variant}.log").read_text()
    # the same metrics, predictions and weights as the uninterrupted run, exactly
    a, b = base / "uninterrupted" / "results", base / "killed" / "results"
    assert json.loads((b / "evaluation" / "metrics.json").read_text()) == \
        json.loads((a / "evaluation" / "metrics.json").read_text())
    for v in ("a", "b"):
        assert read_table(b / "predictions" / v / "validation.parquet", PREDICTIONS).equals(
            read_table(a / "predictions" / v / "validation.parquet", PREDICTIONS))
        wa = torch.load(a / "models" / v / "model.pt", weights_only=True)["model_state_dict"]
        wb = torch.load(b / "models" / v / "model.pt", weights_only=True)["model_state_dict"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), v
    assert (b / "accounting.parquet").read_bytes() == (a / "accounting.parquet").read_bytes()
    # nothing half-written is left: no temporaries anywhere in the results
    assert not [str(p) for p in b.rglob(".*") if p.name != ".snakemake_timestamp"]
    assert "Nothing to be done" in snakemake(base / "killed", "-n", configs=(
        CONFIG, TINY, base / "killed" / "settings.yaml")).stdout
