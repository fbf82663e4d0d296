"""Errors a person can act on: config problems one line each (key path, what is wrong, closest valid
key), stage CLIs that check their inputs first (one line naming the file, exit status 2, nothing
created), and a help text for every option of every stage CLI."""

from __future__ import annotations

import argparse
import copy
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ferflow.config_check import ConfigError, check_config, config_problems, load_schema
from workflow_helpers import CONFIG, REPO, env

SCHEMA_PATH = REPO / "workflow" / "schemas" / "config.schema.yaml"
STAGES = ["demo", "index", "extract", "shards", "train", "predict", "evaluate", "report", "annotate", "export"]


@pytest.fixture(scope="module")
def schema():
    return load_schema(SCHEMA_PATH)


@pytest.fixture()
def config():
    return yaml.safe_load(CONFIG.read_text())


# ---- config: one line per problem ----------------------------------------------------------------
def test_the_shipped_config_has_no_problem(schema, config):
    assert config_problems(config, schema) == []
    check_config(config, SCHEMA_PATH)  # does not raise


def test_a_mistyped_top_level_key_names_the_closest_valid_key(schema, config):
    config["trainig"] = config.pop("training")
    assert config_problems(config, schema) == ["trainig: unknown key (closest valid: 'training')"]


def test_nested_problems_give_their_key_path(schema, config):
    config["variants"][1]["heds"] = 2
    config["variants"][0]["backbone"] = "resnet19"
    config["sources"][2].pop("name")
    config["shards"]["samples_per_shard"] = "many"
    config["variants"][2]["pretrained"] = {"format": "vggface", "path": "w.pkl"}
    problems = config_problems(config, schema)
    assert sorted(problems) == sorted([
        "variants[1].heds: unknown key (closest valid: 'heads')",
        "variants[0].backbone: 'resnet19' is not one of resnet18, resnet50 (closest valid: 'resnet18')",
        "sources[2]: 'name' is required but missing",
        "shards.samples_per_shard: 'many' is not of type integer",
        # the object branch of `pretrained`'s oneOf, not "is not of type null"
        "variants[2].pretrained.format: 'vggface' is not one of vggface2, torchvision, dan (closest valid: 'vggface2')",
    ])


def test_an_unknown_key_without_a_close_match_names_no_key(schema, config):
    config["evaluation"]["xyz"] = 1
    assert config_problems(config, schema) == ["evaluation.xyz: unknown key"]


def test_a_value_failing_every_branch_lists_the_branches(schema, config):
    config["evaluation"]["smoothing"] = 4
    (line,) = config_problems(config, schema)
    assert line.startswith("evaluation.smoothing: 4 is not valid; allowed: 0; or integer, minimum 1, not multipleOf 2")
    assert line.endswith("or 'auto'")


def test_check_config_raises_with_every_problem(config):
    config["trainig"] = {}
    config["extract"]["detector"] = "retina"
    with pytest.raises(ConfigError) as info:
        check_config(copy.deepcopy(config), SCHEMA_PATH)
    assert info.value.problems == ["trainig: unknown key (closest valid: 'training')",
                                   "extract.detector: 'retina' is not one of retinaface, mtcnn, haar (closest valid: 'retinaface')"]
    assert str(info.value).splitlines()[0] == "config: 2 problems:"


# ---- stage CLIs: inputs checked first --------------------------------------------------------------
def _run_cli(stage: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"ferflow.{stage}", *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=300)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_train_with_a_missing_shard_folder(tmp_path):
    proc = _run_cli("train", "--shards", "no_such_shards", "--out", "out/model_a", cwd=tmp_path)
    assert proc.returncode == 2
    assert _one_line(proc) == "ferflow train: error: --shards no_such_shards: no such folder"
    assert list(tmp_path.iterdir()) == []


def test_train_with_a_shard_folder_without_labels(tmp_path):
    (tmp_path / "shards").mkdir()
    proc = _run_cli("train", "--shards", "shards", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2
    assert _one_line(proc) == f"ferflow train: error: --shards {Path('shards') / 'labels.parquet'}: no such file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_predict_with_a_missing_model(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "labels.parquet").write_bytes(b"")
    proc = _run_cli("predict", "--model", "models/a/model.pt", "--shards", "shards",
                    "--out", "predictions/a/validation.parquet", cwd=tmp_path)
    assert proc.returncode == 2
    assert _one_line(proc) == "ferflow predict: error: --model models/a/model.pt: no such file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_extract_with_a_missing_video_downloads_nothing(tmp_path):
    # RetinaFace weights at an unreachable URL: a download attempt would fail with another message
    settings = '{"detector": "retinaface", "retinaface_weights": "http://127.0.0.1:9/none.pth", "device": "cpu"}'
    proc = _run_cli("extract", "video", "--video", "videos/clip.mp4", "--person", "clip=", "--settings", settings,
                    "--out-tar", "faces/clip.tar", "--out-table", "faces/clip.parquet", cwd=tmp_path)
    assert proc.returncode == 2
    assert _one_line(proc) == "ferflow extract video: error: --video videos/clip.mp4: no such file"
    assert list(tmp_path.iterdir()) == []


def test_shards_with_a_missing_manifest(tmp_path):
    proc = _run_cli("shards", "--manifest", "manifest/a.parquet", "--out", "shards", "--accounting", "acc.parquet",
                    cwd=tmp_path)
    assert proc.returncode == 2
    assert _one_line(proc) == "ferflow shards: error: --manifest manifest/a.parquet: no such file"
    assert list(tmp_path.iterdir()) == []


def test_a_folder_given_for_a_file_is_named_as_such(tmp_path):
    (tmp_path / "model.pt").mkdir()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "labels.parquet").write_bytes(b"")
    proc = _run_cli("predict", "--model", "model.pt", "--shards", "shards", "--out", "p.parquet", cwd=tmp_path)
    assert proc.returncode == 2
    assert _one_line(proc) == "ferflow predict: error: --model model.pt: not a file"


# ---- help texts ----------------------------------------------------------------------------------
class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser_of(stage: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a stage's main() builds: parse_args is stopped before anything runs."""
    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = importlib.import_module(f"ferflow.{stage}")
    with pytest.raises(_Captured) as info:
        module.main([])
    return info.value.parser


def _options_without_help(parser: argparse.ArgumentParser, where: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            missing += [f"{where} {a.dest}" for a in action._choices_actions if not (a.help or "").strip()]
            for name, sub in action.choices.items():
                missing += _options_without_help(sub, f"{where} {name}")
            continue
        if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
            missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")
    return missing


@pytest.mark.parametrize("stage", STAGES)
def test_every_option_has_a_help_text(stage, monkeypatch):
    parser = _parser_of(stage, monkeypatch)
    assert len(parser._actions) > 1
    assert _options_without_help(parser, stage) == []
