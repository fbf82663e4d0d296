"""ferflow export: one ONNX graph of every variant and the soft vote; onnxruntime == PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ferflow import annotate, export, schemas, train
from ferflow.inference import InferenceError, OnnxRunner, TorchRunner, load_ensemble, read_onnx_metadata
from ferflow.labels import EXPRESSIONS
from test_annotate import HAAR, write_models, write_two_faces
from test_data import write_synthetic_shards

pytest.importorskip("onnxruntime")  # in the test extra; `pip install -e .[onnx]` for users


def _crops(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def _check_onnx_equals_torch(models: Path, tmp_path: Path, weights: dict) -> None:
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"smoothed": {"window": {"expr": 5, "va": 3}}}))
    out = tmp_path / "ensemble.onnx"
    assert export.main(["--models", str(models), "--out", str(out), "--metrics", str(metrics),
                        "--config", str(_config(tmp_path, weights)), "--extract-settings", HAAR]) == 0
    meta = read_onnx_metadata(out)
    assert meta["classes"] == list(EXPRESSIONS) and meta["input"]["size"] == 32
    assert meta["smoothing"]["expr"] == 5 and meta["smoothing"]["va"] == 3
    assert meta["crop"]["detector"] == "haar" and meta["crop"]["margin"] == 0.25
    assert {v["name"]: v["weight"] for v in meta["variants"] if v["task"] != "va"} == {
        n: weights.get(n, 1.0) for n in sorted(p.name for p in models.iterdir()) if n != "vaonly"}
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    net = load_ensemble(models, weights)
    runner = OnnxRunner(out)
    for n in (1, 5):  # dynamic batch
        x = _crops(n, seed=n)
        got = session.run(None, {"images": x})
        with torch.no_grad():
            want = [t.numpy() for t in net(torch.from_numpy(x))]
        for name, g, w in zip(("probs", "va", "variant_probs", "variant_va"), got, want):
            assert g.shape == w.shape, name
            assert np.abs(g - w).max() <= 1e-4, (name, np.abs(g - w).max())
        # the graph's vote is the weighted mean of its variants (the members' weights)
        vp, vva = want[2], want[3]
        w_expr = np.array([m.weight for m in net.members])
        w_va = np.array([m.va_weight for m in net.members])
        assert np.allclose(want[0], np.einsum("nvc,v->nc", vp, w_expr / w_expr.sum()), atol=1e-6)
        assert np.allclose(want[1], np.einsum("nvc,v->nc", vva, w_va / w_va.sum()), atol=1e-6)
        # the runners agree and annotate's vote (ferflow.ensemble.soft_vote) gives the graph's
        p_onnx, va_onnx = runner(x)
        p_torch, va_torch = TorchRunner(net)(x)
        assert np.abs(p_onnx - p_torch).max() <= 1e-4 and np.abs(va_onnx - va_torch).max() <= 1e-4
        voted, voted_va = annotate.vote(runner.ensemble, p_onnx, va_onnx)
        assert np.abs(voted - got[0]).max() <= 1e-5 and np.abs(voted_va - got[1]).max() <= 1e-5


def _config(root: Path, weights: dict) -> Path:
    path = root / "run.yaml"
    variants = ", ".join(f"{{name: {n}, weight: {w}}}" for n, w in weights.items())
    path.write_text(f"variants: [{variants}]\n")
    return path


def test_onnx_equals_pytorch_untrained(tmp_path):
    models = write_models(tmp_path / "models")
    _check_onnx_equals_torch(models, tmp_path, {"a": 3.0})


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory) -> Path:
    """A small trained ensemble: two variants of one epoch on synthetic shards, one of them VA only."""
    root = tmp_path_factory.mktemp("trained")
    shards = root / "shards"
    write_synthetic_shards(shards, {"train": 32, "validation": 8}, per_shard=16, size=40)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, extra in (("a", {"heads": 2}), ("vaonly", {"heads": 1, "task": "va", "seed": 5})):
            settings = {"name": name, "seed": 3, "input_size": 32, "epochs": 1, "batch_size": 8, "lr": 1e-3,
                        "augment": [], "checkpoint_every": 0, **extra}
            assert train.main(["--shards", str(shards), "--out", str(root / "models" / name), "--device", "cpu",
                               "--settings", json.dumps(settings), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(before)
    return root / "models"


@pytest.mark.slow
def test_onnx_equals_pytorch_on_a_trained_ensemble(trained_models, tmp_path):
    net = load_ensemble(trained_models, {"a": 2.0})
    # trained: the batch-norm statistics moved away from their initial values (eval differs from init)
    bn = net.variants[0].bn
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert [(m.name, m.weight, m.va_weight) for m in net.members] == [("a", 2.0, 1.0), ("vaonly", 0.0, 1.0)]
    _check_onnx_equals_torch(trained_models, tmp_path, {"a": 2.0})


@pytest.mark.slow
def test_annotate_with_onnx_gives_the_pytorch_table(trained_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./config.yaml: with --onnx, the crop settings come from the file
    write_two_faces(tmp_path / "two.mp4", 10)
    onnx = tmp_path / "ensemble.onnx"
    config = _config(tmp_path, {"a": 1.0})
    assert export.main(["--models", str(trained_models), "--out", str(onnx), "--config", str(config),
                        "--extract-settings", HAAR, "--no-smoothing"]) == 0
    tables = {}
    for backend, args in (("torch", ["--models", str(trained_models), "--config", str(config),
                                     "--extract-settings", HAAR]), ("onnx", ["--onnx", str(onnx)])):
        out = tmp_path / backend
        assert annotate.main([str(tmp_path / "two.mp4"), "--out", str(out), "--device", "cpu", "--no-progress",
                              "--no-smoothing", *args]) == 0
        tables[backend] = schemas.read_table(out / "two.parquet", schemas.ANNOTATIONS)
    t, o = tables["torch"], tables["onnx"]
    assert t.select("frame", "track", "x1", "y1", "x2", "y2", "expression").equals(
        o.select("frame", "track", "x1", "y1", "x2", "y2", "expression"))
    values = list(EXPRESSIONS) + ["valence", "arousal"]
    assert np.abs(t.select(values).to_numpy() - o.select(values).to_numpy()).max() <= 1e-4
    assert t.height == 20 and t["track"].null_count() == 0


def test_models_that_cannot_be_exported_are_clear_errors(tmp_path):
    with pytest.raises(InferenceError, match="no such models folder"):
        load_ensemble(tmp_path / "missing")
    models = write_models(tmp_path / "models")
    from test_predict import make_model_file

    make_model_file(models / "big", input_size=48)
    with pytest.raises(InferenceError, match="different input sizes"):
        load_ensemble(models)
    with pytest.raises(InferenceError, match="weights given for variants it does not hold"):
        load_ensemble(tmp_path / "models", {"zzz": 2.0})
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    with pytest.raises(InferenceError, match="x.onnx"):
        read_onnx_metadata(tmp_path / "x.onnx")


def test_the_export_rule_environment_is_the_pipeline_one_plus_the_onnx_extra():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    import yaml

    repo = Path(__file__).resolve().parents[1]

    def pip(name):
        env = yaml.safe_load((repo / "envs" / name).read_text())
        return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))

    extra = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["optional-dependencies"]["onnx"]
    assert sorted(pip("ferflow-onnx.yaml")) == sorted(pip("ferflow.yaml") + extra)
