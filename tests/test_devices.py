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
