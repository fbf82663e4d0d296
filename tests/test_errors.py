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


# ---- stage CLIs in process: bad arguments are one line each, exit status 2, nothing written ---------
def _main(stage: str, *args: str, cwd: Path, monkeypatch, capsys) -> tuple[int, list[str]]:
    """Run ``ferflow STAGE ARGS`` in this process from ``cwd``: its exit status and stderr lines
    (a traceback would fail the test: the exception is not caught here)."""
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        rc = importlib.import_module(f"ferflow.{stage}").main(list(args))
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err.strip().splitlines()


def _aff_root(root: Path) -> Path:
    (root / "aw" / "videos").mkdir(parents=True)
    return root / "aw"


@pytest.mark.parametrize("source, expected", [
    ("{bad", ["--source: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"]),
    ('["affwild2"]', ["--source: a JSON object (the source's config entry) is expected, not list"]),
    ('{"kind": "affwild2", "root": "aw"}', ["--source: 'name' is required but missing"]),
    ('{"name": "a", "kind": "affwild3", "root": "aw"}',
     ["source 'a': unknown kind 'affwild3'; known: affectnet, affectnet_npy, affwild2, aihub, expw, generic"]),
    ('{"name": "a", "kind": "affwild2", "root": "data/aw"}', ["source 'a' root data/aw: no such folder"]),
    ('{"name": "a", "kind": "affwild2", "root": "aw", "videos": "vids"}', ["source 'a' videos vids: no such folder"]),
    ('{"name": "a", "kind": "generic", "root": "table.csv"}', ["source 'a' root table.csv: no such file"]),
    ('{"name": "a", "kind": "affwild2", "root": "aw", "test_list": "t.txt"}', ["source 'a' test_list t.txt: no such file"]),
])
def test_index_source_entry_problems(tmp_path, monkeypatch, capsys, source, expected):
    _aff_root(tmp_path)
    rc, lines = _main("index", "--source", source, "--out", "m/a.parquet", cwd=tmp_path, monkeypatch=monkeypatch,
                      capsys=capsys)
    assert rc == 2 and lines == [f"ferflow index: error: {e}" for e in expected]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aw"]


def test_index_source_file_with_bad_json_names_the_file_and_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "source.json").write_text('{"name": "a",\n "kind": affwild2}\n')
    rc, lines = _main("index", "--source", "source.json", "--out", "m.parquet", cwd=tmp_path,
                      monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 2 and lines == ["ferflow index: error: --source source.json: not valid JSON (Expecting value at line 2 column 10)"]


def test_index_two_videos_with_one_name(tmp_path, monkeypatch, capsys):
    root = _aff_root(tmp_path)
    for rel in ("batch1/clip.mp4", "batch2/clip.avi"):
        (root / "videos" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "videos" / rel).write_bytes(b"")
    rc, lines = _main("index", "--source", '{"name": "a", "kind": "affwild2", "root": "aw"}', "--out", "m.parquet",
                      cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    a, b = Path("aw/videos/batch1/clip.mp4"), Path("aw/videos/batch2/clip.avi")
    assert rc == 1 and lines == [f"ferflow index: error: source 'a': two videos named 'clip': {a} and {b} "
                                 "(an annotation name could not tell them apart)"]
    assert not (tmp_path / "m.parquet").exists()


def test_a_video_annotated_whole_in_one_split_and_per_person_in_another_is_a_leak(tmp_path, monkeypatch, capsys):
    from ferflow.labels import EXPR_HEADER

    root = _aff_root(tmp_path)
    (root / "videos" / "X.mp4").write_bytes(b"")
    whole = root / "EXPR_Classification_Challenge" / "Train_Set" / "X.txt"
    left = root / "EXPR_Classification_Challenge" / "Validation_Set" / "X_left.txt"
    for f in (whole, left):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(EXPR_HEADER + "\n1\n")
    rc, lines = _main("index", "--source", '{"name": "a", "kind": "affwild2", "root": "aw"}', "--out", "m.parquet",
                      cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    w, lf = whole.relative_to(tmp_path), left.relative_to(tmp_path)
    assert rc == 1 and lines == [
        "ferflow index: error: source 'a': split leak: the same annotated video in two places (its frames would "
        "be trained and evaluated on):",
        f"  video 'X' is annotated whole in split train and per person in another: {w} (train) and {lf} (validation)"]
    assert not (tmp_path / "m.parquet").exists()
    # two native split folders mapped to one split: named for what it is, not a leak
    left.rename(left.with_name("X.txt"))
    source = '{"name": "a", "kind": "affwild2", "root": "aw", "splits": {"Train_Set": "train", "Validation_Set": "train"}}'
    rc, lines = _main("index", "--source", source, "--out", "m.parquet", cwd=tmp_path, monkeypatch=monkeypatch,
                      capsys=capsys)
    assert rc == 1 and lines[0] == ("ferflow index: error: source 'a': two annotation files for one task of one video "
                                    "in one split (are two native split folders mapped to the same split?):")
    assert "split leak" not in " ".join(lines) and str(w) in lines[1] and str(left.with_name("X.txt").relative_to(tmp_path)) in lines[1]


@pytest.mark.parametrize("args, expected", [
    (["--issues", "i/a.parquet"], ["--issues i/a.parquet: no such file"]),
    (["--faces", "f/a/u1.parquet"], ["--faces f/a/u1.parquet: no such file"]),
    (["--samples-per-shard", "0"], ["--samples-per-shard 0: must be at least 1"]),
    (["--samples-per-shard", "-5"], ["--samples-per-shard -5: must be at least 1"]),
])
def test_shards_input_and_argument_problems(tmp_path, monkeypatch, capsys, args, expected):
    (tmp_path / "m.parquet").write_bytes(b"")
    (tmp_path / "f" / "a").mkdir(parents=True)
    (tmp_path / "f" / "a" / "u0.parquet").write_bytes(b"")
    rc, lines = _main("shards", "--manifest", "m.parquet", *args, "--out", "shards", "--accounting", "acc.parquet",
                      cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 2 and lines == [f"ferflow shards: error: {e}" for e in expected]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "m.parquet"]


def test_shards_with_a_manifest_that_is_not_a_table(tmp_path, monkeypatch, capsys):
    (tmp_path / "m.parquet").write_text("video,frame\n")
    rc, lines = _main("shards", "--manifest", "m.parquet", "--out", "shards", "--accounting", "acc.parquet",
                      cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 1 and len(lines) == 1
    assert lines[0].startswith("ferflow shards: error: m.parquet: not a readable parquet table (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet"]


def test_extract_images_with_a_missing_manifest(tmp_path, monkeypatch, capsys):
    rc, lines = _main("extract", "images", "--manifest", "manifest/a.parquet", "--unit", "chunk000",
                      "--out-tar", "faces/a/chunk000.tar", "--out-table", "faces/a/chunk000.parquet",
                      cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 2 and lines == ["ferflow extract images: error: --manifest manifest/a.parquet: no such file"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, expected", [
    (["--person", "ok=middle"], ["--person ok=middle: side 'middle' is not one of left, right or empty (the main face)"]),
    (["--person", "=left", "--person", "v", "--person", "v", "--person", "v=right"],  # v twice alike: fine
     ["--person =left: the annotation name is empty", "--person v=right: annotation 'v' was given side '' before"]),
    (["--person", "v", "--settings", '{"detector": haar}'],
     ["--settings: not valid JSON (Expecting value at line 1 column 14)"]),
    (["--person", "v", "--settings", '{"detecter": "haar"}'],
     ["--settings: unknown extraction settings ['detecter']; known: ['align', 'crop_size', 'detect_batch', "
      "'detect_every', 'detect_size', 'detector', 'device', 'jpeg_quality', 'margin', 'max_jump_iou', 'min_score', "
      "'min_track_frames', 'min_track_seconds', 'retinaface_weights']"]),
])
def test_extract_video_argument_problems(tmp_path, monkeypatch, capsys, args, expected):
    (tmp_path / "v.mp4").write_bytes(b"")  # never opened: the arguments are checked first
    rc, lines = _main("extract", "video", "--video", "v.mp4", *args, "--out-tar", "faces/v.tar",
                      "--out-table", "faces/v.parquet", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 2 and lines == [f"ferflow extract video: error: {e}" for e in expected]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


@pytest.mark.parametrize("settings, expected", [
    ('{"epochs": 2,}', "--settings: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 14)"),
    ("s.yaml", "--settings: s.yaml: not valid YAML ("),
    ("s.json", "--settings: s.json: a mapping of settings is expected, not list"),
    ('{"epoch": 2}', "--settings: unknown training settings ['epoch']; known: "),
])
def test_train_with_bad_settings(tmp_path, monkeypatch, capsys, settings, expected):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "labels.parquet").write_bytes(b"")
    (tmp_path / "s.yaml").write_text("epochs: [2\n")
    (tmp_path / "s.json").write_text("[2]\n")
    rc, lines = _main("train", "--shards", "shards", "--settings", settings, "--out", "models/a", cwd=tmp_path,
                      monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"ferflow train: error: {expected}"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.yaml", "shards"]


@pytest.mark.parametrize("stage", ["annotate", "export"])
def test_a_model_file_that_is_not_a_checkpoint(tmp_path, monkeypatch, capsys, stage):
    (tmp_path / "models" / "a").mkdir(parents=True)
    (tmp_path / "models" / "a" / "model.pt").write_text("not a checkpoint\n")
    (tmp_path / "config.yaml").write_text("variants: [{name: a}]\n")
    args = ["--models", "models", "--config", "config.yaml"]
    if stage == "annotate":
        from test_annotate import write_no_face

        write_no_face(tmp_path / "v.avi", 3)
        args = ["v.avi", *args, "--out", "out", "--device", "cpu", "--extract-settings", '{"detector": "haar"}']
    else:
        args = [*args, "--out", "out/e.onnx"]
    rc, lines = _main(stage, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    errors = [line for line in lines if ": error: " in line]
    assert rc == 2 and errors == [f"ferflow {stage}: error: {Path('models/a/model.pt')}: not a ferflow model file "
                                  "(torch.load cannot read it: not a file of tensors and plain values written by "
                                  "torch.save)"], lines
    assert not (tmp_path / "out").exists()


def test_annotate_names_every_bad_input_before_annotating_any(tmp_path, monkeypatch, capsys):
    from test_annotate import write_models, write_no_face

    write_models(tmp_path / "models")
    (tmp_path / "config.yaml").write_text("variants: [{name: a}, {name: b}]\n")
    write_no_face(tmp_path / "good.avi", 4)
    (tmp_path / "broken.mp4").write_bytes(b"not a video\n" * 10)
    run = ["--models", "models", "--config", "config.yaml", "--out", "out", "--device", "cpu",
           "--extract-settings", '{"detector": "haar"}', "--no-progress"]
    rc, lines = _main("annotate", "good.avi", "gone.mp4", "broken.mp4", *run, cwd=tmp_path, monkeypatch=monkeypatch,
                      capsys=capsys)
    errors = [line for line in lines if line.startswith("ferflow annotate: error:")]
    assert rc == 2 and errors == ["ferflow annotate: error: gone.mp4: no such file or folder",
                                  "ferflow annotate: error: broken.mp4: cannot be opened as a video"], lines
    assert not (tmp_path / "out").exists()  # the good video was not annotated either
    # asked to skip them: the good video is annotated, the summary names the two skipped
    rc, lines = _main("annotate", "good.avi", "gone.mp4", "broken.mp4", *run, "--skip-bad-inputs", cwd=tmp_path,
                      monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 0, lines
    assert lines[-3:] == ["ferflow annotate: skipped 2 bad input(s):", "  gone.mp4: no such file or folder",
                          "  broken.mp4: cannot be opened as a video"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.csv", "good.parquet", "good.png"]


# ---- one command name in every message; python -m ferflow; --version ------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_names_itself_as_the_ferflow_command(stage, monkeypatch):
    assert _parser_of(stage, monkeypatch).prog == f"ferflow {stage}"


def test_python_m_ferflow_is_the_ferflow_command_and_has_a_version(tmp_path):
    import ferflow

    proc = subprocess.run([sys.executable, "-m", "ferflow", "--version"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ferflow {ferflow.__version__}"
    proc = subprocess.run([sys.executable, "-m", "ferflow", "shards", "--manifest", "m.parquet", "--out", "s",
                           "--accounting", "a.parquet"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and _one_line(proc) == "ferflow shards: error: --manifest m.parquet: no such file"
    assert list(tmp_path.iterdir()) == []


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
