"""ferflow.devices: one GPU per job through kernel-released locks; SLURM's choice respected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ferflow import devices

SRC = Path(__file__).resolve().parents[1] / "src"

HOLDER = """
import json, sys, time, os
from ferflow.devices import claim_device
lock_dir, log, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
with claim_device(lock_dir, timeout=120, poll=0.02) as dev:
    claimed = time.time()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == dev
    if hold < 0:
        print(dev, flush=True)
        time.sleep(3600)
    time.sleep(hold)
    released = time.time()
with open(log, "a") as fh:
    fh.write(json.dumps({"pid": os.getpid(), "device": dev, "claimed": claimed, "released": released}) + "\\n")
"""


def env_with(num_gpus: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["FERFLOW_NUM_GPUS"] = str(num_gpus)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture
def no_cuda_env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("FERFLOW_NUM_GPUS", raising=False)


def test_six_jobs_on_three_devices_never_share_one(tmp_path):
    log = tmp_path / "claims.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "locks"), str(log), "1.0"],
                              env=env_with(3)) for _ in range(6)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    claims = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(claims) == 6
    assert {c["device"] for c in claims} <= {"0", "1", "2"}
    by_device: dict[str, list] = {}
    for c in claims:
        by_device.setdefault(c["device"], []).append((c["claimed"], c["released"]))
    for dev, spans in by_device.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end, f"device {dev} shared: {spans}"
    # never more than three jobs at once, and the jobs did run concurrently
    events = sorted([(c["claimed"], 1) for c in claims] + [(c["released"], -1) for c in claims],
                    key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert 2 <= peak <= 3


def test_a_killed_holder_releases_its_device(tmp_path, no_cuda_env):
    lock_dir = tmp_path / "locks"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), str(tmp_path / "log"), "-1"],
                              env=env_with(1), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        with pytest.raises(devices.NoFreeDevice, match="all 1 GPUs are claimed"):
            with devices.claim_device(lock_dir, n_devices=1, timeout=0.3, poll=0.05):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # once the killed holder is reaped its lock is free at the first try (timeout=0: no waiting)
    with devices.claim_device(lock_dir, n_devices=1, timeout=0, poll=0.05) as dev:
        assert dev == "0" and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_waits_for_a_device_to_free(tmp_path, no_cuda_env):
    lock_dir = tmp_path / "locks"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), str(tmp_path / "log"), "1.0"],
                              env=env_with(1))
    deadline = time.monotonic() + 60
    while not (lock_dir / "gpu0.lock").exists() or not (lock_dir / "gpu0.lock").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with devices.claim_device(lock_dir, n_devices=1, timeout=60, poll=0.05) as dev:
        claimed = time.time()
        assert dev == "0"
    assert holder.wait() == 0
    released = json.loads((tmp_path / "log").read_text())["released"]
    assert claimed >= released  # only after the holder let go


def test_preset_cuda_visible_devices_is_used_as_is(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    monkeypatch.setenv("FERFLOW_NUM_GPUS", "2")
    with devices.claim_device(tmp_path) as dev:
        assert dev == "5"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert not list(tmp_path.iterdir())  # no lock taken


def test_no_gpu_means_cpu(tmp_path, no_cuda_env, monkeypatch):
    monkeypatch.setenv("FERFLOW_NUM_GPUS", "0")
    with devices.claim_device(tmp_path) as dev:
        assert dev is None
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with devices.select_device("auto", tmp_path) as device:
        assert device.type == "cpu"


def test_count_gpus(monkeypatch):
    monkeypatch.setenv("FERFLOW_NUM_GPUS", "4")
    assert devices.count_gpus() == 4
    monkeypatch.setenv("FERFLOW_NUM_GPUS", "x")
    with pytest.raises(ValueError, match="FERFLOW_NUM_GPUS"):
        devices.count_gpus()
    monkeypatch.delenv("FERFLOW_NUM_GPUS")
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi
    assert devices.count_gpus() == 0


def _holder(lock_dir: Path, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), str(log), "-1"], env=env,
                            stdout=subprocess.PIPE, text=True)


def test_preset_multi_id_cuda_visible_devices_is_claimed_among(tmp_path, monkeypatch):
    """A shell exporting CUDA_VISIBLE_DEVICES=0,1: each job claims one of them (was: every job
    took "0,1" as it was and trained on GPU 0)."""
    env = env_with(0)
    env["CUDA_VISIBLE_DEVICES"] = "3,1"
    lock_dir = tmp_path / "locks"
    holders = [_holder(lock_dir, tmp_path / "log", env) for _ in range(2)]
    try:
        got = sorted(h.stdout.readline().strip() for h in holders)
        assert got == ["1", "3"]  # one id each, narrowed to it, among the listed ids only
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
        with pytest.raises(devices.NoFreeDevice):  # both listed devices are taken
            with devices.claim_device(lock_dir, timeout=0.2, poll=0.05):
                pass
    finally:
        for h in holders:
            os.kill(h.pid, signal.SIGKILL)
            h.wait()
    with devices.claim_device(lock_dir, timeout=10, poll=0.05) as dev:
        assert dev == "3" and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,1"  # restored


def test_claim_several_devices_all_or_none(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("FERFLOW_NUM_GPUS", "3")
    with devices.claim_device(tmp_path, count=2) as pair:
        assert pair == "0,1" and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # as a second job's fresh environment
        with pytest.raises(devices.NoFreeDevice):
            with devices.claim_device(tmp_path, count=2, timeout=0.2, poll=0.05):
                pass
        with devices.claim_device(tmp_path, count=1, timeout=1) as one:
            assert one == "2"  # the failed pair claim did not keep GPU 2
    with pytest.raises(ValueError, match="4 GPUs asked for, 3"):
        with devices.claim_device(tmp_path, count=4):
            pass
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # SLURM gave one GPU, the job needs two
    with pytest.raises(ValueError, match="lists 1 device.*needs 2"):
        with devices.claim_device(tmp_path, count=2):
            pass


def test_claim_command_runs_with_narrowed_devices(tmp_path):
    show = "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"
    cmd = [sys.executable, "-m", "ferflow.devices", "--gpus", "2", "--lock-dir", str(tmp_path), "--",
           sys.executable, "-c", show]
    res = subprocess.run(cmd, env=env_with(3), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "'0,1'"
    res = subprocess.run(cmd, env=env_with(0), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "''"  # no GPU: the ranks see none


def test_cuda_seen_without_a_gpu_count_is_an_error(tmp_path, no_cuda_env, monkeypatch):
    """nvidia-smi missing while torch sees CUDA: say so (was: silently trained on the CPU)."""
    import torch

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="torch sees 2 CUDA device.*nvidia-smi.*FERFLOW_NUM_GPUS"):
        with devices.select_device("auto", tmp_path):
            pass
