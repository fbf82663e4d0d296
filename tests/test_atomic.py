"""Atomic outputs: a failed write leaves the old file (or none), never a partial one."""

import os
import stat

import pytest

from ferflow.atomic import atomic_dir, atomic_path, write_text


def test_success_replaces_target_with_usual_mode(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_text(target, "one")
    write_text(target, "two")
    assert target.read_text() == "two"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]   # no temp file left


def test_failure_keeps_old_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".tmp" and tmp.name.endswith(".parquet.tmp")
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_directory_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "shards"
    with atomic_dir(target) as d:
        (d / "a.tar").write_text("1")
    with pytest.raises(OSError):
        with atomic_dir(target) as d:
            (d / "b.tar").write_text("2")
            raise OSError("no space left on device")
    assert sorted(p.name for p in target.iterdir()) == ["a.tar"]
    with atomic_dir(target) as d:
        (d / "c.tar").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]
