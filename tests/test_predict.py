"""ferflow.predict: PREDICTIONS for every sample of a split, from a model.pt of ferflow.train."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from ferflow import predict, schemas, train
from ferflow.model import build_model
from test_data import write_synthetic_shards

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pshards")
    write_synthetic_shards(root, {"train": 8, "validation": 30}, per_shard=8, size=40)
    return root


def make_model(out: Path, **overrides) -> tuple[Path, torch.nn.Module]:
    """A model.pt as ferflow.train writes it, from an untrained model (no training needed here), and
    the model it holds, in memory."""
    settings = train.resolve_settings({"name": "p", "input_size": 32, "heads": 2, "epochs": 1, **overrides})
    torch.manual_seed(0)
    model = build_model(settings)
    model.eval()
    train.write_outputs(out, model, settings, [{"epoch": 1, "lr": 1e-3, "loss_total": 1.0}])
    return out / "model.pt", model


def make_model_file(out: Path, **overrides) -> Path:
    return make_model(out, **overrides)[0]


def test_predict_cli_writes_predictions_for_every_sample(shards, tmp_path):
    model_path = make_model_file(tmp_path / "m")
    out = tmp_path / "pred" / "validation.parquet"
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", FERFLOW_NUM_GPUS="0")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    res = subprocess.run([sys.executable, "-m", "ferflow.predict", "--model", str(model_path), "--shards",
                          str(shards), "--split", "validation", "--out", str(out), "--batch-size", "7"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "device: cpu" in res.stderr
    pred = schemas.read_table(out, schemas.PREDICTIONS)
    labels = schemas.read_table(shards / "labels.parquet", schemas.LABELS).filter(pl.col("split") == "validation")
    assert pred.height == labels.height == 30
    assert sorted(zip(pred["video"], pred["frame"])) == sorted(zip(labels["video"], labels["frame"]))
    assert pred.select(["source", "video", "frame"]).equals(pred.select(["source", "video", "frame"]).sort(
        "source", "video", "frame"))
    assert set(pred["split"]) == {"validation"}
    probs = pred.select([f"p{i}" for i in range(8)]).to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5) and (probs >= 0).all()
    va = pred.select(["valence", "arousal"]).to_numpy()
    assert np.isfinite(va).all() and (np.abs(va) <= 1).all()


def test_predictions_match_the_model_in_process(shards, tmp_path):
    """Batching and ordering do not change the numbers: compare with a direct forward pass."""
    # the expected numbers come from the model that was saved, never from predict.load_model
    model_path, model = make_model(tmp_path / "m")
    out = tmp_path / "v.parquet"
    assert predict.main(["--model", str(model_path), "--shards", str(shards), "--split", "validation",
                         "--out", str(out), "--device", "cpu", "--batch-size", "4"]) == 0
    pred = schemas.read_table(out, schemas.PREDICTIONS)
    from ferflow import data

    loader, _ = data.make_loader(shards, "validation", batch_size=64, input_size=32, train=False)
    batch = next(iter(loader))
    with torch.no_grad():
        o = model(batch["image"])
    probs = torch.softmax(o.expr, 1).numpy()
    by_key = {f"validation/{r['source']}/{r['video']}/{r['frame']:06d}": r for r in pred.iter_rows(named=True)}
    for i, key in enumerate(batch["key"]):
        row = by_key[key]
        assert np.allclose([row[f"p{j}"] for j in range(8)], probs[i], atol=1e-5)
        assert np.allclose([row["valence"], row["arousal"]], o.va[i].numpy(), atol=1e-5)


@pytest.mark.parametrize("task,null_cols", [("expr", ["valence", "arousal"]), ("va", [f"p{i}" for i in range(8)])])
def test_single_task_models_leave_the_other_task_null(shards, tmp_path, task, null_cols):
    model_path = make_model_file(tmp_path / task, task=task)
    out = tmp_path / f"{task}.parquet"
    assert predict.main(["--model", str(model_path), "--shards", str(shards), "--split", "validation",
                         "--out", str(out), "--device", "cpu"]) == 0
    pred = schemas.read_table(out, schemas.PREDICTIONS)
    for col in null_cols:
        assert pred[col].null_count() == pred.height
    kept = [c for c in ["valence", "arousal", *[f"p{i}" for i in range(8)]] if c not in null_cols]
    assert all(pred[c].null_count() == 0 for c in kept)


def test_model_file_is_weights_only_loadable(tmp_path):
    model_path = make_model_file(tmp_path / "m")
    ckpt = torch.load(model_path, weights_only=True)
    assert ckpt["settings"]["input_size"] == 32 and "model_state_dict" in ckpt


def test_not_a_model_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": {}}, bad)
    with pytest.raises(KeyError, match="not a ferflow model file"):
        predict.load_model(bad, torch.device("cpu"))
