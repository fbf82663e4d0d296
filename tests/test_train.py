"""ferflow.train: settings, outputs, exact kill/resume, and a learning test on a synthetic task."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from ferflow import metrics, predict, schemas, train
from test_data import write_synthetic_shards

SRC = Path(__file__).resolve().parents[1] / "src"


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


def test_outputs_and_checkpoint_contents(tiny_shards, tmp_path, one_thread):
    out = tmp_path / "run"
    settings = {**TINY, "epochs": 1, "task": "expr", "checkpoint_every": 0}
    assert train.main(["--shards", str(tiny_shards), "--out", str(out), "--device", "cpu",
                       "--settings", json.dumps(settings), "--no-progress"]) == 0
    final = torch.load(out / "model.pt", weights_only=True)
    assert set(final) == {"model_state_dict", "settings", "model_config", "epoch"}
    assert final["settings"] == train.resolve_settings(settings) and final["epoch"] == 1
    ckpt = torch.load(out / "last.pt", weights_only=True)
    for key in ("model", "criterion", "optimizer", "scheduler", "scaler", "rng", "epoch", "step",
                "global_step", "data", "settings", "history"):
        assert key in ckpt, key
    assert "affinity.centers" in ckpt["criterion"]
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}
    assert ckpt["epoch"] == 1 and ckpt["step"] == 0
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert len(rows) == 1
    for col in ("epoch", "lr", "loss_total", "loss_expr", "loss_affinity", "train_img_per_s",
                "val_expr_f1", "val_va_ccc_mean"):
        assert col in rows[0], col
    assert 0 <= float(rows[0]["val_expr_f1"]) <= 1 and rows[0]["val_va_ccc_mean"] == ""  # task expr
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # a second start finds the run complete and only rewrites the outputs
    mtime = (out / "last.pt").stat().st_mtime_ns
    assert train.main(["--shards", str(tiny_shards), "--out", str(out), "--device", "cpu",
                       "--settings", json.dumps(settings), "--no-progress"]) == 0
    assert (out / "last.pt").stat().st_mtime_ns == mtime
    # other settings: refuse to resume
    with pytest.raises(ValueError, match="other settings.*lr"):
        train.main(["--shards", str(tiny_shards), "--out", str(out), "--device", "cpu",
                    "--settings", json.dumps({**settings, "lr": 0.5}), "--no-progress"])


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


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_kill_and_resume_gives_identical_weights(tiny_shards, tmp_path, workers):
    settings = {**TINY, "workers": workers}
    ref_out, cut_out = tmp_path / "uninterrupted", tmp_path / "killed"
    # start the reference run and the run to be killed side by side
    ref = subprocess.Popen(train_cmd(tiny_shards, ref_out, settings), env=child_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cut = subprocess.Popen(train_cmd(tiny_shards, cut_out, settings), env=child_env(),
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
    _run(train_cmd(tiny_shards, cut_out, settings))  # --resume is the default

    a = torch.load(ref_out / "model.pt", weights_only=True)
    b = torch.load(cut_out / "model.pt", weights_only=True)
    assert a["model_state_dict"].keys() == b["model_state_dict"].keys()
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key
    la = torch.load(ref_out / "last.pt", weights_only=True)
    lb = torch.load(cut_out / "last.pt", weights_only=True)
    assert torch.equal(la["criterion"]["affinity.centers"], lb["criterion"]["affinity.centers"])
    for pid, state in la["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, lb["optimizer"]["state"][pid][name]), (pid, name)
    assert la["global_step"] == lb["global_step"]
    hist_a = [{k: v for k, v in r.items() if k not in ("train_img_per_s",)} for r in la["history"]]
    hist_b = [{k: v for k, v in r.items() if k not in ("train_img_per_s",)} for r in lb["history"]]
    assert hist_a == hist_b


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
