"""The accounting invariant, end to end: small datasets in their native layouts, each built to hit
drop reasons, go through the real index -> extract (a fake detector) -> shards functions; every
annotated frame or face ends written or dropped with the expected reason, and a broken accounting
fails the stage.

``run_pipeline`` is also used by test_shards.py (stable keys when data is added).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest

from ferflow import extract, index, layout, shards
from ferflow.extract import ExtractSettings
from ferflow.labels import EXPR_HEADER, VA_HEADER
from ferflow.schemas import ACCOUNTING, DROP_REASONS, LABELS, MANIFEST, WHOLE_VIDEO, read_table, write_table

BRIGHT, DARK = 200, 20


class BrightnessDetector:
    """A face in each half of a frame (left, right) that is brighter than 100; none in dark ones.
    (Tracks shorter than 3 frames are not followed: faces must last at least 3 frames.)"""

    name = "brightness"

    def settings(self) -> dict:
        return {"name": self.name}

    def __call__(self, frames):
        out = []
        for f in frames:
            h, w = f.shape[:2]
            rows = []
            for x0 in (0, w // 2):
                if f[:, x0:x0 + w // 2].mean() > 100:
                    row = np.full(15, np.nan, np.float32)
                    row[:5] = (x0 + w * 0.1, h * 0.2, x0 + w * 0.4, h * 0.8, 0.99)
                    rows.append(row)
            out.append(np.array(rows, np.float32).reshape(-1, 15))
        return out


def write_video(path: Path, levels: list[int], size=(64, 48), noise=None) -> Path:
    """An MJPG AVI of flat frames of the given grey levels (plus ``noise()`` when given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, size)
    for v in levels:
        frame = np.full((size[1], size[0], 3), v, np.int64) + (0 if noise is None else noise())
        writer.write(np.clip(frame, 0, 255).astype(np.uint8))
    writer.release()
    return path


def write_image(path: Path, w=64, h=64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    cv2.imwrite(str(path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def run_pipeline(sources: list[dict], out: Path, samples_per_shard: int = 4, seed: int = 0,
                 on_unusable: str = "stop", issues: list | None = None) -> pl.DataFrame:
    """index -> extract -> shards as the workflow wires them; returns the accounting rows (the
    index's findings are appended to ``issues``)."""
    settings = ExtractSettings(detector="haar", detect_every=1, crop_size=32)
    detector = BrightnessDetector()
    manifests, faces = [], []
    for src in sources:
        df = index.index_source(src, on_unusable, issues)
        m = out / "manifest" / f"{src['name']}.parquet"
        write_table(df, m, MANIFEST)
        manifests.append(str(m))
        d = out / "faces" / src["name"]
        if src["kind"] == "affwild2":
            tests = layout.read_test_list(src["test_list"]) if src.get("test_list") else None
            for u in layout.affwild2_units(src["root"], src.get("videos"), src.get("splits"),
                                           src.get("tasks", ["expr", "va"]), test_names=tests):
                if u.video_path is None:   # as common.smk: no extraction job without a video
                    continue
                persons = {a.name: a.person for a in u.annotations}
                extract.extract_video(u.video_path, persons, settings, detector,
                                      str(d / f"{u.unit}.tar"), str(d / f"{u.unit}.parquet"))
                faces.append(str(d / f"{u.unit}.parquet"))
        else:
            for unit in layout.image_units(int(src.get("chunks") or 1)):
                extract.extract_images(df, unit, settings, str(d / f"{unit}.tar"), str(d / f"{unit}.parquet"))
                faces.append(str(d / f"{unit}.parquet"))
    return shards.write_shards(manifests, faces, str(out / "shards"), str(out / "accounting.parquet"),
                               samples_per_shard=samples_per_shard, seed=seed)


# ---- one small dataset per drop reason ------------------------------------------------------------
def affwild2_source(root: Path) -> dict:
    """Aff-Wild2: unannotated, invalid_value, beyond_video_end, no_face, no_video, unreadable_video,
    unreadable_frame; and a test list (frames written without labels, a frame without face, a missing test video)."""
    aw = root / "affwild2"
    e, va = aw / "EXPR_Classification_Challenge", aw / "VA_Estimation_Challenge"
    write_video(aw / "videos" / "vidA.avi", [BRIGHT] * 6)
    # vidA: 8 lines for 6 frames: frame 1 unannotated, frame 2 invalid, frames 6 and 7 beyond the end
    write_text(e / "Train_Set" / "vidA.txt", EXPR_HEADER + "\n0\n-1\nx\n3\n4\n5\n6\n7\n")
    # vidB (two people, validation): frames 0 and 1 without a face
    write_video(aw / "videos" / "vidB.avi", [DARK, DARK, BRIGHT, BRIGHT, BRIGHT])
    write_text(va / "Validation_Set" / "vidB_left.txt", VA_HEADER + "\n0.1,0.2\n0.1,0.2\n0.3,0.4\n-5,-5\n")
    write_text(e / "Validation_Set" / "vidB_right.txt", EXPR_HEADER + "\n1\n1\n2\n2\n2\n")
    write_text(e / "Train_Set" / "ghost.txt", EXPR_HEADER + "\n1\n2\n")                  # no video file
    (aw / "videos" / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    write_text(e / "Train_Set" / "broken.txt", EXPR_HEADER + "\n1\n2\n3\n")              # unreadable video
    # vidC: 6 textured bright frames, frame 3 does not decode (400 bytes zeroed in it)
    rng = np.random.default_rng(3)
    write_video(aw / "videos" / "vidC.avi", [BRIGHT] * 6, noise=lambda: rng.integers(-40, 41, (48, 64, 3)))
    from bad_inputs import break_avi_frame

    break_avi_frame(aw / "videos" / "vidC.avi", 3)
    write_text(e / "Train_Set" / "vidC.txt", EXPR_HEADER + "\n0\n1\n2\n3\n4\n5\n")
    write_video(aw / "videos" / "test1.avi", [BRIGHT, BRIGHT, DARK, BRIGHT, BRIGHT, BRIGHT])
    tests = write_text(root / "test_list.txt", "test1\nvidB_right\nmissing_test\n")
    return {"name": "aw", "kind": "affwild2", "root": str(aw), "videos": str(aw / "videos"),
            "test_list": str(tests)}


def expw_source(root: Path) -> dict:
    """ExpW: unmapped_label, bad_box, unreadable_image (missing and corrupt), duplicate."""
    ex = root / "expw"
    write_image(ex / "image" / "origin" / "good.jpg")
    (ex / "image" / "origin" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    write_text(ex / "label" / "label.lst", "\n".join([
        "good.jpg 0 8 8 40 40 0.9 3",        # written
        "good.jpg 0 8 8 40 40 0.9 3",        # the same face again: duplicate
        "good.jpg 1 10 10 30 30 0.9 9",      # label 9 is not ExpW's: unmapped_label
        "good.jpg 2 200 200 300 300 0.9 6",  # box outside the image: bad_box
        "missing.jpg 0 1 1 20 20 0.9 1",     # no such file: unreadable_image
        "corrupt.jpg 0 1 1 20 20 0.9 1",     # not an image: unreadable_image
    ]) + "\n")
    return {"name": "expw", "kind": "expw", "root": str(ex), "split": "train", "chunks": 2}


def aihub_source(root: Path) -> dict:
    """AI-Hub: no_consensus, and a unanimous face written."""
    ai = root / "aihub" / "분노"
    write_image(ai / "a.jpg", 80, 80)
    write_image(ai / "b.jpg", 80, 80)
    box = {"minX": 10, "minY": 10, "maxX": 60, "maxY": 70}
    items = [{"filename": "a.jpg", "faceExp_uploader": "분노", **{f"annot_{k}": {"faceExp": "분노", "boxes": box} for k in "ABC"}},
             {"filename": "b.jpg", "faceExp_uploader": "분노", "annot_A": {"faceExp": "분노", "boxes": box},
              "annot_B": {"faceExp": "중립", "boxes": box}, "annot_C": {"faceExp": "당황", "boxes": box}}]
    (ai / "labels.json").write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    return {"name": "aihub", "kind": "aihub", "root": str(root / "aihub"), "split": "train", "vote": "majority"}


def affectnet_npy_source(root: Path) -> dict:
    """AffectNet (npy release): the whole image is the face; a validation image written."""
    an = root / "affectnet8" / "val_set"
    write_image(an / "images" / "7.jpg", 48, 48)
    (an / "annotations").mkdir(parents=True)
    for suffix, value in (("exp", "6"), ("val", "0.5"), ("aro", "0.25")):
        np.save(an / "annotations" / f"7_{suffix}.npy", np.array(value))
    return {"name": "an8", "kind": "affectnet_npy", "root": str(root / "affectnet8"), "splits": {"val_set": "validation"}}


def generic_source(root: Path) -> dict:
    write_image(root / "generic" / "x.png", 40, 50)
    write_text(root / "generic" / "t.csv", "path,expression,valence,arousal\nx.png,Sadness,-0.5,0.5\n")
    return {"name": "gen", "kind": "generic", "root": str(root / "generic" / "t.csv"), "split": "train"}


def all_sources(root: Path) -> list[dict]:
    return [affwild2_source(root), expw_source(root), aihub_source(root), affectnet_npy_source(root),
            generic_source(root)]


def fates(rows: pl.DataFrame) -> dict:
    counted = rows.group_by("source", "split", fate=pl.coalesce("reason", "status")).len()
    return {(s, sp, f): n for s, sp, f, n in counted.iter_rows()}


def test_every_drop_reason_is_counted_end_to_end(tmp_path):
    rows = run_pipeline(all_sources(tmp_path / "data"), tmp_path / "out", on_unusable="skip")
    assert fates(rows) == {
        # vidA: frames 0, 3, 4, 5 written; 1 unannotated; 2 invalid; 6, 7 beyond the 6 decoded frames;
        # vidC: 6 frames, frame 3 unreadable
        ("aw", "train", "written"): 4 + 5, ("aw", "train", "unannotated"): 1, ("aw", "train", "invalid_value"): 1,
        ("aw", "train", "beyond_video_end"): 2, ("aw", "train", "unreadable_frame"): 1,
        ("aw", "train", "no_video"): 2, ("aw", "train", "unreadable_video"): 3,
        # vidB_left: 4 lines (one -5), 2 without a face; vidB_right: 5 lines, 2 without a face
        ("aw", "validation", "written"): 1 + 3, ("aw", "validation", "no_face"): 2 + 2,
        ("aw", "validation", "unannotated"): 1,
        # test videos: test1 6 frames (1 dark), vidB_right 5 frames (2 dark), missing_test has no video
        ("aw", "test", "written"): 5 + 3, ("aw", "test", "no_face"): 1 + 2, ("aw", "test", "no_video"): 1,
        ("expw", "train", "written"): 1, ("expw", "train", "duplicate"): 1, ("expw", "train", "unmapped_label"): 1,
        ("expw", "train", "bad_box"): 1, ("expw", "train", "unreadable_image"): 2,
        ("aihub", "train", "written"): 1, ("aihub", "train", "no_consensus"): 1,
        ("an8", "validation", "written"): 1,
        ("gen", "train", "written"): 1,
    }
    reasons = set(rows["reason"].drop_nulls())
    assert reasons == set(DROP_REASONS), f"reasons not hit: {set(DROP_REASONS) - reasons}"
    # the written rows are exactly labels.parquet and the shards' members
    acc = read_table(tmp_path / "out" / "accounting.parquet", ACCOUNTING)
    labels = read_table(tmp_path / "out" / "shards" / "labels.parquet", LABELS)
    assert sorted(acc.filter(pl.col("status") == "written")["key"]) == sorted(labels["key"])
    import webdataset as wds

    tars = sorted(str(p) for p in (tmp_path / "out" / "shards").glob("*/shard-*.tar"))
    assert sorted(s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)) == sorted(labels["key"])
    # test frames: every decoded frame accounted for, written ones without labels
    test = acc.filter(pl.col("split") == "test").sort("video", "frame")
    assert test.select("video", "frame", "status").rows() == [
        ("missing_test", WHOLE_VIDEO, "dropped"),
        *[("test1", i, "dropped" if i == 2 else "written") for i in range(6)],
        *[("vidB_right", i, "dropped" if i < 2 else "written") for i in range(5)]]
    assert test["expression"].null_count() == test.height and test["valence"].null_count() == test.height
    still = dict(zip(labels["key"], labels["still"]))
    assert still["train/expw/good.jpg/000000"] and still["validation/an8/val_set/images/7.jpg/000000"]
    assert not still["train/aw/vidA/000000"] and not still["test/aw/test1/000000"]
    assert "test/aw/test1/000003" in labels["key"].to_list() and "test/aw/test1/000002" not in labels["key"].to_list()
    # the summary adds up per source and split
    summary = shards.accounting_summary(rows)
    assert summary["total"].sum() == rows.height


def test_accounting_that_does_not_add_up_fails(tmp_path):
    run_pipeline([generic_source(tmp_path / "data"), expw_source(tmp_path / "data")], tmp_path / "out")
    manifests = sorted(str(p) for p in (tmp_path / "out" / "manifest").glob("*.parquet"))
    tables = sorted(str(p) for p in (tmp_path / "out" / "faces").glob("*/*.parquet"))
    manifest = pl.concat([read_table(p, MANIFEST) for p in manifests])
    faces = shards.load_faces(tables)
    rows = shards.account(manifest, faces)
    shards.check_accounting(manifest, faces, rows)          # consistent: passes
    with pytest.raises(shards.AccountingError, match=r"expw/train: 6 manifest rows, 5 accounting rows"):
        shards.check_accounting(manifest, faces, rows.filter(pl.col("reason").ne_missing("bad_box")))
    two_fates = rows.with_columns(reason=pl.when(pl.col("status") == "written").then(pl.lit("no_face")).otherwise("reason"))
    with pytest.raises(shards.AccountingError, match="without exactly one fate"):
        shards.check_accounting(manifest, faces, two_fates)
    unknown = rows.with_columns(reason=pl.col("reason").replace("bad_box", "lost"))
    with pytest.raises(shards.AccountingError, match="without exactly one fate"):
        shards.check_accounting(manifest, faces, unknown)
    # a faces table listing a frame twice is refused before anything is joined
    dup = tmp_path / "out" / "faces" / "expw" / "chunk999.parquet"
    write_table(read_table(tables[0], shards.FACES), dup, shards.FACES)
    with pytest.raises(shards.AccountingError, match="repeat a"):
        shards.load_faces(tables + [str(dup)])
    # the CLI fails (exit status 1) and writes nothing
    out = tmp_path / "out2"
    rc = shards.main(["--manifest", *manifests, "--faces", *tables, str(dup), "--out", str(out / "shards"),
                      "--accounting", str(out / "acc.parquet")])
    assert rc == 1 and not out.exists()


# ---- labels accounted per task (issue: a task's label silently nulled on a frame kept for the other)
def mixed_labels_source(root: Path) -> dict:
    """Aff-Wild2, native layout: frames whose EXPR or VA value is invalid while the other task's is
    usable, a -inf, a line beyond the video's end, and a VA file with only its header."""
    aw = root / "aw"
    e, va = aw / "EXPR_Classification_Challenge" / "Train_Set", aw / "VA_Estimation_Challenge" / "Train_Set"
    write_video(aw / "videos" / "V.avi", [BRIGHT] * 6)
    # line numbers: the header is line 1, frame i is line i + 2
    write_text(e / "V.txt", EXPR_HEADER + "\n0\nHappiness\n9\n-2\n4\n5\n6\n")
    write_text(va / "V.txt", VA_HEADER + "\n0.1,0.2\n0.3,-0.4\n0.5,0.6\n0.7,0.8\n1.7,0.25\nnan,0.12\n0.1,0.1\n")
    write_video(aw / "videos" / "W.avi", [BRIGHT] * 4)
    write_text(e / "W.txt", EXPR_HEADER + "\n1\n2\n3\n-1\n")
    write_text(va / "W.txt", VA_HEADER + "\n0.1,0.2,0.3\n-inf,0.1\n0.2,-0.3\n0.3,0.3\n")
    write_video(aw / "videos" / "X.avi", [BRIGHT] * 4)
    write_text(e / "X.txt", EXPR_HEADER + "\n1\n1\n1\n1\n")
    write_text(va / "X.txt", VA_HEADER + "\n")
    return {"name": "aw", "kind": "affwild2", "root": str(aw), "videos": str(aw / "videos")}


def test_labels_are_accounted_per_task(tmp_path):
    issues: list = []
    rows = run_pipeline([mixed_labels_source(tmp_path / "data")], tmp_path / "out", issues=issues)
    # frames: V 6 decoded of 7 lines, W 4, X 4; every frame has a usable label of one task
    assert fates(rows) == {("aw", "train", "written"): 14, ("aw", "train", "beyond_video_end"): 1}
    table = shards.label_accounting(rows)
    got = {(r["task"], k): v for r in table.iter_rows(named=True) for k, v in r.items()
           if k not in ("source", "split", "task") and v}
    assert got == {
        # EXPR: V 7 lines (0, 4, 5 written; Happiness, 9, -2 invalid; line 8 beyond the end), W 4 (-1
        # unannotated), X 4
        ("expr", "lines"): 15, ("expr", "written"): 10, ("expr", "invalid_value"): 3,
        ("expr", "unannotated"): 1, ("expr", "beyond_video_end"): 1,
        # VA: V 7 lines (4 written; 1.7 and nan invalid; 1 beyond), W 4 (3 fields and -inf invalid),
        # X none (its VA file has only the header)
        ("va", "lines"): 11, ("va", "written"): 6, ("va", "invalid_value"): 4, ("va", "beyond_video_end"): 1,
    }
    v = rows.filter(pl.col("video") == "V").sort("frame")
    assert v["expr_fate"].to_list() == ["written", "invalid_value", "invalid_value", "invalid_value", "written",
                                        "written", "beyond_video_end"]
    assert v["va_fate"].to_list() == ["written"] * 4 + ["invalid_value", "invalid_value", "beyond_video_end"]
    assert rows.filter(pl.col("video") == "W").sort("frame")["va_fate"].to_list() == [
        "invalid_value", "invalid_value", "written", "written"]          # -inf is invalid, not 'not annotated'
    assert set(rows.filter(pl.col("video") == "X")["va_fate"].to_list()) == {None}
    # labels.parquet holds exactly the written labels of each task
    labels = read_table(tmp_path / "out" / "shards" / "labels.parquet", LABELS)
    assert labels.height == 14
    assert labels["expression"].is_not_null().sum() == 10 and labels["valence"].is_not_null().sum() == 6
    # valence and arousal from their own columns: V frame 1 is (0.3, -0.4)
    v1 = labels.filter(pl.col("key") == "train/aw/V/000001").row(0, named=True)
    assert (v1["expression"], v1["valence"], v1["arousal"]) == (None, pytest.approx(0.3), pytest.approx(-0.4))
    # the summary names each file with invalid lines (first lines with their numbers) and the
    # header-only file
    aw = tmp_path / "data" / "aw"
    text = shards.summary_text(rows, index.issues_table(issues))
    ev, vv, wv = (aw / "EXPR_Classification_Challenge/Train_Set/V.txt", aw / "VA_Estimation_Challenge/Train_Set/V.txt",
                  aw / "VA_Estimation_Challenge/Train_Set/W.txt")
    assert f"aw: {ev}: 3 invalid: line 3: 'Happiness'; line 4: '9'; line 5: '-2'\n" in text
    assert f"aw: {vv}: 2 invalid: line 6: '1.7,0.25'; line 7: 'nan,0.12'\n" in text
    assert f"aw: {wv}: 2 invalid: line 2: '0.1,0.2,0.3'; line 3: '-inf,0.1'\n" in text
    assert f"aw/train va: {aw / 'VA_Estimation_Challenge/Train_Set/X.txt'}\n" in text
    assert "annotation files with a header and no line (1;" in text


def test_labels_that_do_not_add_up_fail_the_stage(tmp_path):
    run_pipeline([mixed_labels_source(tmp_path / "data")], tmp_path / "out")
    manifest = read_table(tmp_path / "out" / "manifest" / "aw.parquet", MANIFEST)
    faces = shards.load_faces(sorted(str(p) for p in (tmp_path / "out" / "faces").glob("*/*.parquet")))
    rows = shards.account(manifest, faces)
    shards.check_accounting(manifest, faces, rows)          # consistent: passes
    # a label silently nulled on a written frame (its fate still says written)
    nulled = rows.with_columns(arousal=pl.when(pl.col("key") == "train/aw/V/000000").then(None).otherwise("arousal"))
    with pytest.raises(shards.AccountingError, match=r"va: 1 labels whose fate and written value disagree, "
                                                      r"e\.g\. aw/V frame 0"):
        shards.check_accounting(manifest, faces, nulled)
    # an annotated line without a fate
    lost = rows.with_columns(expr_fate=pl.when(pl.col("expr_fate") == "invalid_value").then(None).otherwise("expr_fate"))
    with pytest.raises(shards.AccountingError, match=r"aw/train expr: 15 annotated lines, 12 labels written or dropped"):
        shards.check_accounting(manifest, faces, lost)
    # a manifest whose label was nulled at indexing without a reason
    bad = manifest.with_columns(expression=pl.when((pl.col("video") == "X") & (pl.col("frame") == 0))
                                .then(None).otherwise("expression"))
    with pytest.raises(shards.AccountingError, match=r"expr: 1 labels whose fate and written value disagree, "
                                                      r"e\.g\. aw/X frame 0"):
        shards.check_accounting(bad, faces, shards.account(bad, faces))
