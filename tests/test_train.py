"""ferflow.train: settings, outputs, exact kill/resume, and a learning test on a synthetic task."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from ferflow import data, metrics, predict, schemas, train
from test_data import write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


@pytest.fixture
def one_thread():
    """The test machines are small and shared: one intra-op thread is much faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def train_cmd(shards: Path, out: Path, settings: dict, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ferflow.train", "--shards", str(shards), "--out", str(out),
            "--device", "cpu", "--settings", json.dumps(settings), "--no-progress", *extra]


TINY = {"name": "tiny", "seed": 3, "input_size": 32, "heads": 2, "epochs": 2, "batch_size": 8,
        "lr": 1e-3, "augment": ["flip", "erase"], "bootstrap": True, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_synthetic_shards(root, {"train": 48, "validation": 16}, per_shard=12, size=40)
    return root


# --------------------------------------------------------------------------------------------
# settings


def test_settings_defaults_and_overrides():
    s = train.resolve_settings({"name": "v", "seed": 4, "loss_weights": {"va": 2}, "weight": 1.5})
    assert s["backbone"] == "resnet18" and s["heads"] == 4 and s["input_size"] == 112
    assert s["loss_weights"] == {"expr": 1.0, "va": 2.0, "affinity": 1.0, "partition": 1.0}
    assert s["seed"] == 4 and "weight" not in s
    assert train.DEFAULTS["loss_weights"]["va"] == 1.0  # defaults untouched
    with pytest.raises(ValueError, match="epoch"):
        train.resolve_settings({"epoch": 3})
    with pytest.raises(ValueError, match="centre"):
        train.resolve_settings({"loss_weights": {"centre": 1}})


def test_settings_from_file(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"name": "f", "epochs": 2}))
    assert train.read_settings(str(path)) == {"name": "f", "epochs": 2}
    assert train.read_settings('{"name": "s"}') == {"name": "s"}


def test_settings_keys_match_the_config_schema():
    import yaml

    schema = yaml.safe_load((SRC.parent / "workflow/schemas/config.schema.yaml").read_text())
    keys = set(schema["definitions"]["train_settings"]["properties"])
    assert keys | {"name"} == set(train.DEFAULTS)


# --------------------------------------------------------------------------------------------
# a short run in process: outputs and checkpoint contents


def test_outputs_and_checkpoint_contents(tiny_shards, tmp_path, one_thread, caplog):
    out = tmp_path / "run"
    settings = {**TINY, "epochs": 1, "task": "expr", "checkpoint_every": 0}
    argv = ["--shards", str(tiny_shards), "--out", str(out), "--device", "cpu", "--settings", json.dumps(settings),
            "--no-progress"]
    caplog.set_level(logging.INFO, logger="ferflow.train")
    assert train.main([*argv, "--log-every", "2"]) == 0
    # without a terminal: a line every 2 steps with the loss, img/s and the epoch's ETA
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1 step")]
    n_batches = math.ceil(int(next(csv.DictReader((out / "history.csv").open()))["train_samples"]) / 8)
    assert len(steps) == n_batches // 2, steps
    assert all(re.fullmatch(r"epoch 1/1 step \d/\d: loss \d+\.\d{4}, \d+ img/s, epoch ETA \d+:\d\d:\d\d", m)
               for m in steps), steps
    last_loss = float(re.search(r"loss (\S+),", steps[-1]).group(1))
    assert last_loss > 0.5  # the running mean of the total loss (focal + affinity + partition)
    plan = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan")]
    assert plan and "micro-batch(es) of 8" in plan[0]
    assert any(r.getMessage().startswith("first optimiser step done: measured peak memory") for r in caplog.records)
    final = torch.load(out / "model.pt", weights_only=True)
    assert set(final) == {"model_state_dict", "settings", "model_config", "epoch"}
    assert final["settings"] == train.resolve_settings(settings) and final["epoch"] == 1
    assert not (out / "last.pt").exists()  # a complete run keeps no checkpoint
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert len(rows) == 1
    for col in ("epoch", "lr", "loss_total", "loss_expr", "loss_affinity", "train_img_per_s",
                "val_expr_f1", "val_va_ccc_mean", "micro_batch", "peak_mem_gib"):
        assert col in rows[0], col
    assert float(rows[0]["train_img_per_s"]) > 0 and int(rows[0]["micro_batch"]) == 8
    assert 0 <= float(rows[0]["val_expr_f1"]) <= 1 and rows[0]["val_va_ccc_mean"] == ""  # task expr
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # steps.csv: one row per optimiser step (--loss-every 1, the default); the sample-weighted mean
    # of the rows' losses is the epoch's mean in history.csv
    steps = list(csv.DictReader((out / "steps.csv").open()))
    assert list(steps[0]) == list(train.STEP_COLUMNS)
    assert [int(r["global_step"]) for r in steps] == list(range(1, n_batches + 1))
    assert {r["epoch"] for r in steps} == {"1"} and {r["steps"] for r in steps} == {"1"}
    assert sum(int(r["samples"]) for r in steps) == int(rows[0]["train_samples"])
    for part in train.LOSS_PARTS:
        mean = sum(float(r[f"loss_{part}"]) * int(r["samples"]) for r in steps) / int(rows[0]["train_samples"])
        assert mean == pytest.approx(float(rows[0][f"loss_{part}"]), rel=1e-9), part
    assert all(float(r["lr"]) == float(rows[0]["lr"]) and float(r["img_per_s"]) > 0 for r in steps)
    # a second start finds the run complete and rewrites nothing
    mtimes = {f: (out / f).stat().st_mtime_ns for f in ("model.pt", "history.csv", "steps.csv", "curves.png")}
    assert train.main(argv) == 0
    assert {f: (out / f).stat().st_mtime_ns for f in mtimes} == mtimes
    assert not (out / "last.pt").exists()
    # other settings: refuse to take the finished run for them
    with pytest.raises(ValueError, match="other settings.*lr"):
        train.main([*argv[:-2], json.dumps({**settings, "lr": 0.5}), "--no-progress"])

    # the checkpoint of a run in progress
    args = train.get_args_parser().parse_args(["--shards", str(tiny_shards), "--out", str(tmp_path / "part")])
    trainer = train.Trainer(args, train.resolve_settings(settings), torch.device("cpu"))
    trainer.plan_memory()
    trainer.train_one_epoch()
    trainer.save()
    ckpt = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    for key in ("model", "criterion", "optimizer", "scheduler", "scaler", "rng", "epoch", "step",
                "global_step", "data", "settings", "history", "sums"):
        assert key in ckpt, key
    assert [r["global_step"] for r in ckpt["steps"]] == list(range(1, trainer.step + 1))
    assert "affinity.centers" in ckpt["criterion"]
    assert set(ckpt["rng"]) == {"python", "numpy", "torch"}  # no CUDA state on the CPU
    assert ckpt["epoch"] == 0 and ckpt["step"] == trainer.step > 0
    assert ckpt["sums"]["samples"] > 0 and math.isfinite(ckpt["sums"]["total"])


def test_curves_plot_the_step_rows_under_the_epoch_curves(tmp_path, monkeypatch):
    import matplotlib.figure

    figures = []
    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), original(fig, *a, **k))[1])
    history = [{"epoch": e, "lr": 1e-3, **{f"loss_{p}": 1.0 / e for p in train.LOSS_PARTS}} for e in (1, 2)]
    # 5 steps in epoch 1 (rows of 2, 2, 1), 4 in epoch 2 (2, 2)
    ends = [(2, 1, 2), (4, 1, 2), (5, 1, 1), (7, 2, 2), (9, 2, 2)]
    steps = [{"global_step": g, "epoch": e, "steps": n, "samples": 8 * n,
              **{f"loss_{p}": 10.0 / g + i for i, p in enumerate(train.LOSS_PARTS)}, "lr": 1e-3, "img_per_s": 5.0}
             for g, e, n in ends]
    train.plot_curves(tmp_path / "curves.png", history, "a", steps)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    top_loss, top_val, per_step = figures[0].axes
    for ax in (top_loss, top_val):  # the epoch panels keep their integer epoch ticks
        assert [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]] == [1, 2]
    lines = {line.get_label(): line for line in per_step.get_lines() if not line.get_label().startswith("_")}
    assert list(lines) == list(train.LOSS_PARTS)
    assert list(lines["total"].get_xdata()) == [2, 4, 5, 7, 9]
    assert list(lines["va"].get_ydata()) == [10.0 / g + 2 for g in (2, 4, 5, 7, 9)]
    epoch_ends = [line.get_xdata()[0] for line in per_step.get_lines() if line.get_label().startswith("_")]
    assert epoch_ends == [5.5]  # between the last step of epoch 1 and the first of epoch 2
    assert per_step.get_title() == "loss every 2 steps"


# --------------------------------------------------------------------------------------------
# micro-batches and the memory plan


def _trainer(shards: Path, settings: dict) -> train.Trainer:
    args = train.get_args_parser().parse_args(["--shards", str(shards), "--out", "unused"])
    return train.Trainer(args, train.resolve_settings(settings), torch.device("cpu"))


def test_micro_batch_slices():
    assert train.micro_slices(32, 8) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert train.micro_slices(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert train.micro_slices(9, 4) == [(0, 4), (4, 9)]  # no micro-batch of one sample
    assert train.micro_slices(5, 8) == [(0, 5)]
    # ranks: contiguous, no gap, no overlap
    parts = [data.rank_slice(11, r, 3) for r in range(3)]
    assert parts == [(0, 3), (3, 7), (7, 11)]


def test_four_micro_batches_of_8_equal_one_batch_of_32(tmp_path, one_thread):
    """Accumulating 4 x 8 gives the weights of 1 x 32 after 3 optimiser steps (BatchNorm in eval
    mode: its batch statistics are per micro-batch by design; class-balance weights on, so the
    per-sample weighting is checked too)."""
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, {"train": 96}, per_shard=32, size=40)
    settings = {**TINY, "batch_size": 32, "task": "expr", "class_balance": True, "bootstrap": False,
                "loss_weights": {"partition": 0.0}}
    whole = _trainer(shards, {**settings, "micro_batch": 32})
    micro = _trainer(shards, {**settings, "micro_batch": 8})
    for t in (whole, micro):
        t.plan_memory()
        t.model.eval()
    assert (whole.micro, micro.micro) == (32, 8)
    loader, _ = train.train_loader(shards, "train", whole.settings, whole.train_index, 0, None, False)
    steps = 0
    for batch in loader:
        assert batch["image"].shape[0] == 32
        p_whole, p_micro = whole.train_step(batch), micro.train_step(batch)
        steps += 1
        torch.testing.assert_close(p_micro, p_whole, rtol=1e-5, atol=1e-6)  # logged parts: the batch's
        if steps > 1:
            continue
        # from the same weights, the accumulated gradient is the whole batch's, to float32 rounding
        # of each tensor's scale
        for (name, pa), pb in zip(whole.step_module.named_parameters(), micro.step_module.parameters()):
            assert (pa.grad is None) == (pb.grad is None), name
            if pa.grad is not None:
                scale = pa.grad.abs().max().item()
                torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=1e-5 * scale + 1e-12, msg=name)
    assert steps == 3
    # Weights: Adam divides each gradient by its running RMS, so a parameter whose gradient is at
    # float32 noise level moves by up to ~lr per step either way: tolerance 5% of lr.
    lr = settings["lr"]
    init = _trainer(shards, {**settings, "micro_batch": 32}).model.state_dict()
    moved = 0
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(micro.model.state_dict()[key], value, rtol=0, atol=0.05 * lr, msg=key)
        moved += int((value.float() - init[key].float()).abs().max().item() > lr / 2)
    assert moved > 20  # the comparison is of trained weights
    torch.testing.assert_close(micro.criterion.affinity.centers, whole.criterion.affinity.centers,
                               rtol=0, atol=0.05 * lr)


def test_memory_plan_chooses_what_fits_and_refuses_what_cannot(tiny_shards, monkeypatch, one_thread):
    trainer = _trainer(tiny_shards, {**TINY, "batch_size": 64})
    fixed, per_sample = train.estimate_step_bytes(trainer.model, trainer.criterion, 32, torch.device("cpu"))
    assert fixed > 4 * 4 * 11e6 and per_sample > 3 * 32 * 32  # ResNet-18 + heads: > 11 M parameters
    # room for 5.5 samples beyond the fixed part (the plan keeps 10% spare): auto chooses 5
    monkeypatch.setenv(train.ENV_MEMORY, str((fixed + 5.5 * per_sample) / 0.9 / 2**30))
    trainer.plan_memory()
    assert trainer.micro == 5
    assert trainer.plan["available_gib"] == pytest.approx((fixed + 5.5 * per_sample) / 0.9 / 2**30)
    # a number is taken as given (capped at the batch)
    trainer.settings["micro_batch"] = 1000
    trainer.plan_memory()
    assert trainer.micro == 64
    # not even two samples fit: a clear error before any step
    monkeypatch.setenv(train.ENV_MEMORY, str((fixed + 1.5 * per_sample) / 0.9 / 2**30))
    with pytest.raises(train.MemoryPlanError, match=r"micro-batch of 2 of resnet18 with 2 heads at 32 px needs "
                       r"about [0-9.]+ GiB, cpu has [0-9.]+ GiB \(FERFLOW_DEVICE_MEMORY_GIB\): nothing fits"):
        trainer.plan_memory()


def test_impossible_plan_fails_at_once_from_the_command_line(tiny_shards, tmp_path):
    env = {**child_env(), train.ENV_MEMORY: "0.01"}
    res = subprocess.run(train_cmd(tiny_shards, tmp_path / "out", TINY), env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode != 0
    assert "MemoryPlanError: memory plan: a micro-batch of 2" in res.stderr
    assert not (tmp_path / "out" / "last.pt").exists() and not (tmp_path / "out" / "model.pt").exists()


# --------------------------------------------------------------------------------------------
# one variant on two ranks (torchrun, DistributedDataParallel over gloo on the CPU)


def ranks_cmd(shards: Path, out: Path, settings: dict, ranks: int = 2) -> list[str]:
    """The workflow's launch: claim the GPUs (none here: CPU ranks), then torchrun."""
    return [sys.executable, "-m", "ferflow.devices", "--gpus", str(ranks), "--lock-dir", str(out.parent / "locks"),
            "--", sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "-m", "ferflow.train", "--shards", str(shards), "--out", str(out), "--settings", json.dumps(settings),
            "--no-progress"]


def _params(path: Path) -> dict:
    state = torch.load(path, weights_only=True)["model_state_dict"]
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume_after_kill(tiny_shards, tmp_path):
    """Two gloo ranks of batch 16 (8 each) train the weights of one process of batch 16 in
    micro-batches of 8 (the same micro-batches, so even training-mode BatchNorm agrees); a 2-rank
    run killed with SIGKILL mid-epoch resumes to the same weights. BatchNorm running statistics
    are rank 0's in a k-rank run (DistributedDataParallel broadcasts its buffers): not compared."""
    from workflow_helpers import kill_session

    # 48 samples without bootstrap: three full batches per epoch (a short last batch would be
    # split 4 + 4 over the ranks, but kept whole as one micro-batch by one process)
    settings = {**TINY, "batch_size": 16, "gpus_per_variant": 2, "checkpoint_every": 1, "bootstrap": False}
    env = {**child_env(), "FERFLOW_NUM_GPUS": "0"}
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"
    _run(train_cmd(tiny_shards, one, {**settings, "micro_batch": 8}))
    res = subprocess.run(ranks_cmd(tiny_shards, two, settings), env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "rank 1 of 2" in res.stderr and "memory plan: batch 16 = 2 ranks x 8" in res.stderr
    a, b = _params(one / "model.pt"), _params(two / "model.pt")
    lr = settings["lr"]
    for key, value in a.items():  # Adam: float32 noise on a near-zero gradient moves a weight by ~lr
        torch.testing.assert_close(b[key], value, rtol=0, atol=0.05 * lr, msg=key)
    rows_one = list(csv.DictReader((one / "history.csv").open()))
    rows_two = list(csv.DictReader((two / "history.csv").open()))
    assert [r["train_samples"] for r in rows_two] == [r["train_samples"] for r in rows_one] == ["48", "48"]
    assert [r["ranks"] for r in rows_two] == ["2", "2"]
    for r1, r2 in zip(rows_one, rows_two):
        assert float(r2["loss_total"]) == pytest.approx(float(r1["loss_total"]), rel=1e-4)

    proc = subprocess.Popen(ranks_cmd(tiny_shards, cut, settings), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for(cut / "last.pt", proc, timeout=600)
    finally:
        kill_session(proc)
    ckpt = torch.load(cut / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step"] > 0 and not (cut / "model.pt").exists()
    res = subprocess.run(ranks_cmd(tiny_shards, cut, settings), env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resumed from" in res.stderr
    c = _params(cut / "model.pt")
    b_all = torch.load(two / "model.pt", weights_only=True)["model_state_dict"]
    c_all = torch.load(cut / "model.pt", weights_only=True)["model_state_dict"]
    for key, value in b_all.items():  # the same 2-rank computation: exactly equal, buffers included
        assert torch.equal(c_all[key], value), key
    assert c.keys() == a.keys()


# --------------------------------------------------------------------------------------------
# faults a GPU shows, reproduced on the CPU


def test_resume_restores_only_the_training_devices_cuda_state(monkeypatch):
    """A checkpoint saved with 3 visible GPUs, resumed with 1: the state was restored by index
    into every saved GPU (IndexError); now only the training device's state is kept and set."""
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(3)]
    calls = []

    def fake_set(state, device="cuda"):
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if index >= 1:
            raise IndexError(f"no CUDA device {index}: 1 visible")
        calls.append((state.clone(), index))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake_set)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", fake_set)
    state = train.rng_state(torch.device("cpu"))
    assert "cuda" not in state
    state["cuda"] = saved
    train.set_rng_state(state, torch.device("cuda", 0))
    assert len(calls) == 1 and torch.equal(calls[0][0], saved[0]) and calls[0][1] == 0
    mine = torch.full((16,), 9, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": mine)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("one state per visible GPU saved"))
    state = train.rng_state(torch.device("cuda", 0))
    assert torch.equal(state["cuda"], mine)
    calls.clear()
    train.set_rng_state(state, torch.device("cuda", 0))
    assert len(calls) == 1 and torch.equal(calls[0][0], mine)


def test_training_step_reads_nothing_back_from_the_device(tiny_shards, monkeypatch, one_thread):
    """The loss logged its parts with .tolist() before backward(): a GPU sync every step. Now
    the step reads no tensor on the host (tolist, item and float conversion are forbidden here)."""
    settings = train.resolve_settings({**TINY, "class_balance": True})
    args = train.get_args_parser().parse_args(["--shards", str(tiny_shards), "--out", "unused"])
    trainer = train.Trainer(args, settings, torch.device("cpu"))
    trainer.micro = 3  # three micro-batches (3, 3, 2) of the batch of 8
    loader, _ = train.train_loader(tiny_shards, "train", settings, trainer.train_index, 0, None, False)
    batch = next(iter(loader))

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a tensor read on the host during the training step")

    for name in ("tolist", "item", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    parts = trainer.train_step(batch)
    monkeypatch.undo()
    assert parts.shape == (len(train.LOSS_PARTS),) and torch.isfinite(parts).all() and parts[0] > 0


# --------------------------------------------------------------------------------------------
# kill -9 mid-epoch, restart: same weights as an uninterrupted run


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {path} appeared:\n"
                                 f"{proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.005)


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.parametrize("workers, micro", [(0, 3), pytest.param(2, "auto", marks=pytest.mark.slow)])
def test_kill_and_resume_gives_identical_weights(tiny_shards, tmp_path, workers, micro):
    """micro 3: batches of 8 in micro-batches of 3, 3, 2; checkpoints fall on optimiser steps.
    A steps.csv row every 3 steps, a checkpoint every 2: the kill lands inside a row."""
    settings = {**TINY, "workers": workers, "micro_batch": micro}
    ref_out, cut_out = tmp_path / "uninterrupted", tmp_path / "killed"
    every = ("--loss-every", "3")
    # start the reference run and the run to be killed side by side
    ref = subprocess.Popen(train_cmd(tiny_shards, ref_out, settings, *every), env=child_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cut = subprocess.Popen(train_cmd(tiny_shards, cut_out, settings, *every), env=child_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(cut_out / "last.pt", cut)
    os.kill(cut.pid, signal.SIGKILL)
    cut.wait()
    assert cut.returncode == -signal.SIGKILL
    assert not (cut_out / "model.pt").exists()
    ckpt = torch.load(cut_out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step"] > 0, "the kill should land mid-epoch"
    _, ref_err = ref.communicate(timeout=600)
    assert ref.returncode == 0, ref_err.decode()[-4000:]
    _run(train_cmd(tiny_shards, cut_out, settings, *every))  # --resume is the default

    a = torch.load(ref_out / "model.pt", weights_only=True)
    b = torch.load(cut_out / "model.pt", weights_only=True)
    assert a["model_state_dict"].keys() == b["model_state_dict"].keys()
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key
    assert not (ref_out / "last.pt").exists() and not (cut_out / "last.pt").exists()
    timing = ("train_img_per_s", "peak_mem_gib")
    hist_a = [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader((ref_out / "history.csv").open())]
    hist_b = [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader((cut_out / "history.csv").open())]
    assert hist_a == hist_b and len(hist_a) == settings["epochs"]
    steps_a = [{k: v for k, v in r.items() if k != "img_per_s"} for r in csv.DictReader((ref_out / "steps.csv").open())]
    steps_b = [{k: v for k, v in r.items() if k != "img_per_s"} for r in csv.DictReader((cut_out / "steps.csv").open())]
    assert steps_a == steps_b
    # rows of 3 steps, an epoch's last row holds the rest; global_step counts every step once
    done = 0
    for i, r in enumerate(steps_a):
        last_of_epoch = i + 1 == len(steps_a) or steps_a[i + 1]["epoch"] != r["epoch"]
        assert r["steps"] == "3" or (last_of_epoch and r["steps"] in ("1", "2")), r
        done += int(r["steps"])
        assert int(r["global_step"]) == done
    assert {r["epoch"] for r in steps_a} == {"1", "2"}


# --------------------------------------------------------------------------------------------
# learning: a small DAN learns the synthetic task


@pytest.mark.slow
def test_small_dan_learns_synthetic_task(tmp_path, one_thread):
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, {"train": 384, "validation": 128}, per_shard=64, videos=8, size=48, seed=1)
    out = tmp_path / "model"
    settings = {"name": "learn", "seed": 1, "input_size": 32, "heads": 2, "epochs": 5, "batch_size": 32,
                "lr": 2e-3, "schedule": "cosine", "augment": ["flip"], "bootstrap": True}
    start = time.monotonic()
    assert train.main(["--shards", str(shards), "--out", str(out), "--device", "cpu",
                       "--settings", json.dumps(settings), "--no-progress"]) == 0
    elapsed = time.monotonic() - start
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert len(rows) == 5
    assert float(rows[-1]["loss_total"]) < float(rows[0]["loss_total"])
    # the held-out split, through the prediction CLI
    pred_path = tmp_path / "pred.parquet"
    assert predict.main(["--model", str(out / "model.pt"), "--shards", str(shards), "--split", "validation",
                         "--out", str(pred_path), "--device", "cpu"]) == 0
    pred = schemas.read_table(pred_path, schemas.PREDICTIONS)
    labels = schemas.read_table(shards / "labels.parquet", schemas.LABELS).filter(pl.col("split") == "validation")
    joined = pred.join(labels, on=["source", "video", "frame"], suffix="_true")
    assert joined.height == labels.height == 128
    probs = joined.select([f"p{i}" for i in range(8)]).to_numpy()
    has_expr = joined["expression"].is_not_null().to_numpy()
    f1 = metrics.macro_f1(joined["expression"].to_numpy()[has_expr], probs[has_expr].argmax(1))
    has_va = joined["valence_true"].is_not_null().to_numpy()
    ccc = [metrics.ccc(joined[c].to_numpy()[has_va], joined[f"{c}_true"].to_numpy()[has_va])
           for c in ("valence", "arousal")]
    print(f"learning test: {elapsed:.0f} s training, macro F1 {f1:.3f}, CCC {ccc}")
    assert f1 >= 0.9
    assert min(ccc) >= 0.8
    assert float(rows[-1]["val_expr_f1"]) == pytest.approx(f1, abs=1e-6)


# --------------------------------------------------------------------------------------------
# the paper's settings


PAPER = REPO / "config.paper.yaml"


def test_paper_settings_plan_as_jobs_on_a_workstation_and_on_slurm(tmp_path):
    """config.yaml + config.paper.yaml (the paper's settings verbatim) pass the schema; a dry run
    plans six training jobs of one GPU each; with gpus_per_variant 2 each asks for two GPUs and
    runs under torchrun, on SLURM as one task on one node."""
    import yaml
    from workflow_helpers import CONFIG, snakemake

    paper = yaml.safe_load(PAPER.read_text())["training"]
    assert {k: paper[k] for k in ("backbone", "input_size", "batch_size", "epochs", "lr", "weight_decay", "heads")} \
        == {"backbone": "resnet50", "input_size": 224, "batch_size": 1024, "epochs": 8, "lr": 1e-4,
            "weight_decay": 1e-4, "heads": 4}
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "resnet50_ft_weight.pkl").write_bytes(b"")  # the dry run checks it exists
    out = snakemake(tmp_path, "-n", "-p", "--resources", "gpu=6", configs=(CONFIG, PAPER)).stdout
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", out, re.M))
    assert jobs["train_variant"] == "6" and jobs["predict_variant"] == "6"
    train_jobs = re.findall(r"rule train_variant:.*?Shell command: ([^\n]*)", out, re.S)
    assert len(train_jobs) == 6
    assert all(c.startswith("OMP_NUM_THREADS=") and " python -m ferflow.train " in c for c in train_jobs)
    two = tmp_path / "two.yaml"
    two.write_text("training:\n  gpus_per_variant: 2\n")
    for profile in ((), ("--workflow-profile", str(REPO / "profiles" / "slurm"))):
        out = snakemake(tmp_path, "-n", "-p", "--resources", "gpu=6", *profile, configs=(CONFIG, PAPER, two)).stdout
        blocks = re.findall(r"rule train_variant:.*?Shell command: [^\n]*", out, re.S)
        assert len(blocks) == 6
        for block in blocks:
            assert re.search(r"resources: .*gpu=2", block), block
            assert "python -m ferflow.devices --gpus 2 -- python -m torch.distributed.run --standalone " \
                   "--nproc-per-node 2 -m ferflow.train" in block
            if profile:
                assert "slurm_partition=gpu" in block and "nodes=1" in block


@pytest.mark.slow
def test_paper_settings_reach_the_first_optimiser_step_on_the_cpu(tmp_path):
    """The paper's settings (batch 1024 of ResNet-50 at 224 px) at a toy dataset size, with
    micro_batch auto under a memory cap that holds 4 samples: the plan is logged before the first
    step, which is then taken in micro-batches of 4 (pretrained weights left out: none here)."""
    import yaml

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, {"train": 12}, per_shard=12, size=64)
    settings = {**yaml.safe_load(PAPER.read_text())["training"], "name": "paper", "seed": 1,
                "pretrained": None, "workers": 0}
    resolved = train.resolve_settings(settings)
    from ferflow.model import build_model
    from ferflow.losses import DANLoss

    model = build_model(resolved).train()
    fixed, per_sample = train.estimate_step_bytes(model, DANLoss(), 224, torch.device("cpu"))
    del model
    env = {**child_env(), train.ENV_MEMORY: str((fixed + 4.5 * per_sample) / 0.9 / 2**30)}
    proc = subprocess.Popen(train_cmd(shards, tmp_path / "out", settings), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "first optimiser step done" in line:
                break
    finally:
        proc.kill()
        proc.wait()
    text = "".join(lines)
    assert "first optimiser step done" in text, text[-4000:]
    plan = re.search(r"memory plan: batch 1024 in (\d+) micro-batch\(es\) of (\d+)", text)
    assert plan and plan.group(2) == "4", text[-4000:]
    assert "BatchNorm statistics, the CCC and the partition loss are computed per micro-batch of 4" in text
    assert re.search(r"first optimiser step done: measured peak memory [0-9.]+ GiB on cpu \(estimated [0-9.]+ GiB\), "
                     r"micro-batch 4", text)
