"""Code versions (ferflow.codeversion): comments and docstrings do not count, code does; and the
real workflow reruns nothing after a comment-only edit, names only the changed settings keys."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ferflow import codeversion
from workflow_helpers import REPO, TINY, env

PACKAGE = {
    "stage.py": '"""The stage."""\nfrom . import helper\n\n\ndef main():\n    return helper.twice(2)\n',
    "helper.py": 'def twice(x):\n    """Twice x."""\n    return 2 * x  # doubled\n',
    "other.py": "VALUE = 1\n",
}


def _package(root: Path, **changes: str) -> Path:
    root.mkdir()
    for name, text in {**PACKAGE, **changes}.items():
        (root / name).write_text(text)
    return root


def test_stage_modules_follow_imports(tmp_path):
    src = _package(tmp_path / "p", **{"other.py": "import ferflow.helper\n"})
    assert codeversion.stage_modules(src, "stage") == ["helper", "stage"]
    assert codeversion.stage_modules(src, "other") == ["helper", "other"]


@pytest.mark.parametrize("edit", [
    'def twice(x):\n    """Twice x, reworded."""\n    return 2 * x  # a new comment\n',
    '# header comment\n\ndef twice(x):\n\n    return (2\n            * x)\n',   # no docstring, reformatted
])
def test_comments_docstrings_and_layout_do_not_change_the_version(tmp_path, edit):
    base = codeversion.code_version(_package(tmp_path / "a"), "stage")
    assert codeversion.code_version(_package(tmp_path / "b", **{"helper.py": edit}), "stage") == base


@pytest.mark.parametrize("edit", [
    'def twice(x):\n    """Twice x."""\n    return 3 * x\n',
    'def twice(x):\n    """Twice x."""\n    return 2 * x\nEDITED = True\n',
    'def twice(y):\n    """Twice x."""\n    return 2 * y\n',
])
def test_a_code_change_in_an_imported_module_changes_the_version(tmp_path, edit):
    base = codeversion.code_version(_package(tmp_path / "a"), "stage")
    assert codeversion.code_version(_package(tmp_path / "b", **{"helper.py": edit}), "stage") != base


def test_a_module_not_imported_does_not_count(tmp_path):
    base = codeversion.code_version(_package(tmp_path / "a"), "stage")
    assert codeversion.code_version(_package(tmp_path / "b", **{"other.py": "VALUE = 2\n"}), "stage") == base


def test_a_string_that_is_not_a_docstring_counts(tmp_path):
    base = codeversion.code_version(_package(tmp_path / "a"), "stage")
    edit = 'def twice(x):\n    """Twice x."""\n    y = 2 * x\n    "kept: not the first statement"\n    return y\n'
    plain = 'def twice(x):\n    """Twice x."""\n    y = 2 * x\n    return y\n'
    assert codeversion.code_version(_package(tmp_path / "b", **{"helper.py": edit}), "stage") != \
        codeversion.code_version(_package(tmp_path / "c", **{"helper.py": plain}), "stage") != base


# ---- the real workflow: make_demo and index only (seconds), in a copy whose code the test edits ----
def _job_counts(out: str) -> dict[str, int]:
    if "Nothing to be done" in out:
        return {}
    lines = out.splitlines()
    counts = {}
    for line in lines[lines.index("Job stats:") + 3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    work = tmp_path_factory.mktemp("reruns")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO / name, work / name)
    for name in ("workflow", "src", "envs"):
        shutil.copytree(REPO / name, work / name, ignore=ignore)
    e = env()
    e.pop("PYTHONPATH", None)  # common.smk puts the copy's src/ first for the jobs

    def run(*args: str, configs: tuple[Path, ...] = ()) -> str:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(work / "Snakefile"), "--directory", str(work),
               "--configfile", str(work / "config.yaml"), str(TINY), *map(str, configs), "--cores", "1",
               *args, "results/manifest/affwild2.parquet"]
        proc = subprocess.run(cmd, cwd=work, env=e, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    run()
    return work, run


@pytest.mark.slow
def test_a_comment_only_edit_reruns_nothing_and_a_code_edit_does(indexed):
    work, run = indexed
    labels = work / "src" / "ferflow" / "labels.py"   # imported by the demo and index stages
    original = labels.read_text()
    assert _job_counts(run("-n")) == {}
    try:
        labels.write_text('"""Reworded docstring."""\n# a new comment\n'
                          + original.split('"""', 2)[2].replace("\n", "\n\n", 3) + "\n# trailing comment\n")
        assert _job_counts(run("-n")) == {}
        labels.write_text(original + "\nEDITED_BY_A_TEST = True\n")
        out = run("-n")
        assert _job_counts(out) == {"make_demo": 1, "index_source": 1}
        # the reason names the stage whose code changed (index reruns as its inputs are remade)
        assert "before: 'demo code " in out
    finally:
        labels.write_text(original)


@pytest.mark.slow
def test_the_rerun_reason_names_only_the_changed_settings_key(indexed, tmp_path):
    work, run = indexed
    change = tmp_path / "label_map.yaml"
    import yaml

    sources = yaml.safe_load((work / "config.yaml").read_text())["sources"]
    sources[0]["label_map"] = {str(i): name for i, name in enumerate(
        ["Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other"])}
    change.write_text(yaml.safe_dump({"sources": sources}))
    out = run("-n", configs=(change,))
    assert _job_counts(out) == {"index_source": 1}
    (reason,) = [line for line in out.splitlines() if "Params have changed" in line]
    assert "'source.label_map=null'" in reason and "'source.label_map={\"0\": \"Neutral\"" in reason
    assert "source.root" not in reason and "source.kind" not in reason
