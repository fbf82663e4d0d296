"""Readers of the newer formats (AffectNet npy release, AI-Hub, generic tables), label maps and
splits from config, and test lists; each on small copies written here in the native layout."""

import json
import re
import unicodedata

import cv2
import numpy as np
import polars as pl
import pytest

from ferflow import index, layout
from ferflow.labels import EXPR_HEADER, VA_HEADER
from ferflow.schemas import WHOLE_VIDEO
from test_accounting import BRIGHT, write_video
from test_index import expected_chunk


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def image(path, w=40, h=30):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 128, np.uint8))
    return path


def by_video(df):
    return {r["video"]: r for r in df.iter_rows(named=True)}


# ---- AffectNet, newer release ---------------------------------------------------------------------
@pytest.fixture
def affectnet_npy(tmp_path):
    root = tmp_path / "AffectNet"

    def item(split, image_id, exp, val=None, aro=None, size=(40, 30), with_image=True):
        if with_image:
            image(root / split / "images" / f"{image_id}.jpg", *size)
        ann = root / split / "annotations"
        ann.mkdir(parents=True, exist_ok=True)
        if exp is not None:
            np.save(ann / f"{image_id}_exp.npy", np.array(exp))   # the release stores strings ('3')
        if val is not None:
            np.save(ann / f"{image_id}_val.npy", np.array(val))
            np.save(ann / f"{image_id}_aro.npy", np.array(aro))
        np.save(ann / f"{image_id}_lnd.npy", np.zeros(136, np.float32))

    item("train_set", "1", "1", "0.5", "-0.25", size=(50, 60))   # Happiness, VA
    item("train_set", "2", "7", "0.1", "0.2")                      # Contempt -> Other
    item("train_set", "3", "0", "-2", "-2")                        # VA not annotated: expression only
    item("train_set", "4", 5, 0.3, 0.4)                            # numbers instead of strings
    item("train_set", "5", "2", "0.0", "0.0", with_image=False)    # annotation without image
    item("train_set", "6", "3", "1.5", "0.0")                      # valence out of range: expression only
    item("train_set", "7", "6")                                    # no VA files
    (root / "train_set" / "annotations" / "8_exp.npy").write_bytes(b"not a npy")  # corrupt
    image(root / "train_set" / "images" / "8.jpg")
    image(root / "train_set" / "images" / "9.jpg")                 # an image without annotation: not listed
    item("val_set", "10", "4", "0.2", "0.2")
    return root


def test_affectnet_npy_labels_boxes_and_quirks(affectnet_npy):
    src = {"name": "an8", "kind": "affectnet_npy", "root": str(affectnet_npy), "chunks": 3}
    df = index.index_source(src)
    rows = by_video(df)
    assert sorted(rows) == sorted([f"train_set/images/{i}.jpg" for i in range(1, 9)] + ["val_set/images/10.jpg"])
    r1 = rows["train_set/images/1.jpg"]
    assert (r1["expression"], r1["split"], r1["frame"]) == (4, "train", 0)
    assert r1["valence"] == pytest.approx(0.5) and r1["arousal"] == pytest.approx(-0.25)
    # no face box in this release: the images are face crops, the box is the whole image
    assert (r1["box_x0"], r1["box_y0"], r1["box_x1"], r1["box_y1"]) == (0, 0, 50, 60)
    assert rows["train_set/images/2.jpg"]["expression"] == 7
    assert rows["train_set/images/3.jpg"]["expression"] == 0 and rows["train_set/images/3.jpg"]["valence"] is None
    assert rows["train_set/images/4.jpg"]["expression"] == 2 and rows["train_set/images/4.jpg"]["valence"] == pytest.approx(0.3)
    # the missing image stays usable here; extraction counts it as unreadable_image
    assert rows["train_set/images/5.jpg"]["drop"] is None and rows["train_set/images/5.jpg"]["box_x0"] is None
    assert rows["train_set/images/6.jpg"]["valence"] is None and rows["train_set/images/6.jpg"]["expression"] == 6
    assert rows["train_set/images/7.jpg"]["expression"] == 1
    assert rows["train_set/images/8.jpg"]["drop"] == "invalid_value"
    assert rows["val_set/images/10.jpg"]["split"] == "validation"
    assert df["unit"].to_list() == [expected_chunk(v, 3) for v in df["video"]]


def test_affectnet_validation_split_can_be_dropped_or_used_alone(affectnet_npy, tmp_path):
    base = {"name": "an8", "kind": "affectnet_npy", "root": str(affectnet_npy)}
    train_only = index.index_source({**base, "splits": {"train_set": "train", "val_set": None}})
    assert set(train_only["split"]) == {"train"}
    val_only = index.index_source({**base, "splits": {"val_set": "validation"}})
    assert val_only["video"].to_list() == ["val_set/images/10.jpg"]
    with pytest.raises(ValueError, match="unknown pipeline splits"):
        index.index_source({**base, "splits": {"val_set": "valid"}})
    # the csv release too
    root = tmp_path / "an"
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"
    write(root / "Manually_Annotated_file_lists" / "training.csv", header + "1/a.jpg,0,0,9,9,,1,0.1,0.1\n")
    write(root / "Manually_Annotated_file_lists" / "validation.csv", header + "1/b.jpg,0,0,9,9,,2,0.1,0.1\n")
    csv_src = {"name": "an", "kind": "affectnet", "root": str(root)}
    assert index.index_source({**csv_src, "splits": {"training": "train", "validation": None}})["video"].to_list() == ["1/a.jpg"]
    both = index.index_source(csv_src)
    assert dict(zip(both["video"], both["split"])) == {"1/a.jpg": "train", "1/b.jpg": "validation"}


def test_label_map_from_config_and_unmapped(affectnet_npy):
    src = {"name": "an8", "kind": "affectnet_npy", "root": str(affectnet_npy), "splits": {"train_set": "train"},
           "tasks": ["expr"], "label_map": {"0": "Neutral", "1": "Happiness"}}
    rows = by_video(index.index_source(src))
    assert rows["train_set/images/1.jpg"]["expression"] == 4
    assert rows["train_set/images/3.jpg"]["expression"] == 0
    assert rows["train_set/images/2.jpg"]["drop"] == "unmapped_label"
    assert rows["train_set/images/1.jpg"]["valence"] is None          # tasks: [expr]
    with pytest.raises(ValueError, match="unknown expression class 'Happy'"):
        index.index_source({**src, "label_map": {"1": "Happy"}})


def test_same_image_in_two_splits_is_an_error_naming_both_files(tmp_path):
    root = tmp_path / "an"
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"
    training = write(root / "Manually_Annotated_file_lists" / "training.csv",
                     header + "1/a.jpg,0,0,9,9,,1,0.1,0.1\n1/a.jpg,0,0,9,9,,1,0.1,0.1\n1/c.jpg,,,,,,1,0.1,0.1\n")
    validation = write(root / "Manually_Annotated_file_lists" / "validation.csv", header + "1/b.jpg,0,0,9,9,,2,0.1,0.1\n")
    # within one split the same face again is a duplicate: kept once
    df = index.index_source({"name": "an", "kind": "affectnet", "root": str(root)})
    assert df.filter(pl.col("video") == "1/a.jpg")["drop"].to_list() == [None, "duplicate"]
    assert df.filter(pl.col("video") == "1/c.jpg")["drop"].to_list() == ["bad_box"]   # no box in the csv
    # in two splits: a split leak, an error naming both lists and lines (line 1 is the header)
    write(validation, header + "1/b.jpg,0,0,9,9,,2,0.1,0.1\n1/a.jpg,0,0,9,9,,2,0.1,0.1\n")
    with pytest.raises(layout.SplitLeakError,
                       match=rf"(?s)1 image\(s\) listed in two splits.*'1/a\.jpg' in train \({re.escape(str(training))}:2\)"
                             rf" and validation \({re.escape(str(validation))}:3\)"):
        index.index_source({"name": "an", "kind": "affectnet", "root": str(root)})
    # a generic table: the same path with two values of its split column
    image(tmp_path / "g" / "x.jpg")
    table = write(tmp_path / "g" / "t.csv", "path,expression,split\nx.jpg,Anger,train\nx.jpg,Anger,validation\n")
    with pytest.raises(layout.SplitLeakError, match=rf"'x\.jpg' in train \({re.escape(str(table))}:2\) and validation \({re.escape(str(table))}:3\)"):
        index.index_source({"name": "g", "kind": "generic", "root": str(table)})


# ---- AI-Hub ---------------------------------------------------------------------------------------
def annot(exp, box=(10, 10, 50, 60)):
    a = {"faceExp": exp}
    if box is not None:
        a["boxes"] = dict(zip(("minX", "minY", "maxX", "maxY"), box))
    return a


@pytest.fixture
def aihub(tmp_path):
    root = tmp_path / "aihub"
    items = {
        "분노": [
            {"filename": "u.jpg", "faceExp_uploader": "분노",
             "annot_A": annot("분노", (10, 10, 50, 60)), "annot_B": annot("분노", (12, 8, 52, 64)),
             "annot_C": annot("분노", (40, 40, 90, 90))},
            {"filename": "m.jpg", "faceExp_uploader": "분노",
             "annot_A": annot("분노"), "annot_B": annot("분노"), "annot_C": annot("중립")},
            {"filename": "d.jpg", "faceExp_uploader": "분노",
             "annot_A": annot("분노"), "annot_B": annot("중립"), "annot_C": annot("당황")},
            {"filename": "nobox.jpg", "faceExp_uploader": "분노",
             "annot_A": annot("분노", None), "annot_B": annot("분노", (5, 5, 1, 1)), "annot_C": annot("분노", None)},
            {"filename": "elsewhere.jpg", "faceExp_uploader": "분노",
             "annot_A": annot("분노"), "annot_B": annot("분노"), "annot_C": annot("분노")},
        ],
        "기쁨": [
            {"filename": "joy.jpg", "faceExp_uploader": "기쁨",
             "annot_A": annot("기쁨"), "annot_B": annot("기쁨"), "annot_C": annot("기쁨")},
            # decomposed Hangul (as macOS writes names) still maps
            {"filename": "nfd.jpg", "faceExp_uploader": "불안",
             "annot_A": annot(unicodedata.normalize("NFD", "불안")), "annot_B": annot("불안"), "annot_C": annot("슬픔")},
            {"filename": "none.jpg", "faceExp_uploader": "기쁨",
             "annot_A": {"faceExp": ""}, "annot_B": {}, "annot_C": {"faceExp": None}},
        ],
    }
    for emotion, its in items.items():
        folder = root / "Training" / emotion
        for it in its:
            if it["filename"] != "elsewhere.jpg":
                image(folder / it["filename"], 100, 100)
        (folder / f"{emotion}.json").write_bytes(json.dumps(its, ensure_ascii=False).encode("utf-8"))
    image(root / "Training" / "images_moved" / "elsewhere.jpg", 100, 100)
    return root


def test_aihub_majority_vote_median_box_and_reasons(aihub):
    src = {"name": "ai", "kind": "aihub", "root": str(aihub), "splits": {"Training": "train"}}
    rows = {v.split("/")[-1]: r for v, r in by_video(index.index_source(src)).items()}
    u = rows["u.jpg"]
    assert u["expression"] == 1 and u["drop"] is None and u["split"] == "train"
    assert (u["box_x0"], u["box_y0"], u["box_x1"], u["box_y1"]) == (12, 10, 52, 64)   # per-coordinate median
    assert rows["m.jpg"]["expression"] == 1                      # 2 of 3
    assert rows["d.jpg"]["drop"] == "no_consensus"
    assert rows["nobox.jpg"]["drop"] == "bad_box"               # no annotator gave a valid box
    assert rows["joy.jpg"]["drop"] == "unmapped_label"          # 기쁨 is not in the paper's subset
    assert rows["nfd.jpg"]["expression"] == 3                    # 불안 -> Fear, 2 of 3
    assert rows["none.jpg"]["drop"] == "unannotated"
    # found by its name under the split folder, not beside the JSON
    assert rows["elsewhere.jpg"]["path"].endswith("images_moved/elsewhere.jpg")
    assert rows["elsewhere.jpg"]["video"] == "Training/images_moved/elsewhere.jpg"


def test_aihub_unanimous_vote_and_label_map(aihub):
    src = {"name": "ai", "kind": "aihub", "root": str(aihub), "split": "validation", "vote": "unanimous",
           "label_map": {"분노": "Anger", "기쁨": "Happiness", "불안": "Fear", "중립": "Neutral"}}
    rows = {v.split("/")[-1]: r for v, r in by_video(index.index_source(src)).items()}
    assert rows["u.jpg"]["expression"] == 1 and rows["u.jpg"]["split"] == "validation"
    assert rows["m.jpg"]["drop"] == "no_consensus"
    assert rows["nfd.jpg"]["drop"] == "no_consensus"
    assert rows["joy.jpg"]["expression"] == 4
    with pytest.raises(ValueError, match="unknown vote"):
        index.index_source({**src, "vote": "plurality"})


def test_aihub_bad_json_names_the_file(tmp_path):
    write(tmp_path / "ai" / "분노" / "x.json", json.dumps({"filename": "a.jpg"}))
    with pytest.raises(index.AnnotationError, match=r"x\.json: the root must be a list"):
        index.index_source({"name": "ai", "kind": "aihub", "root": str(tmp_path / "ai")})
    write(tmp_path / "ai" / "분노" / "x.json", json.dumps([{"file": "a.jpg"}]))
    with pytest.raises(index.AnnotationError, match=r"x\.json: item 0 has no 'filename'"):
        index.index_source({"name": "ai", "kind": "aihub", "root": str(tmp_path / "ai")})
    with pytest.raises(FileNotFoundError, match="no AI-Hub JSON"):
        index.index_source({"name": "ai", "kind": "aihub", "root": str(tmp_path / "empty")})


def test_vote_rules():
    assert index.vote(["a", "a", "b"], 3, "majority") == ("a", None)
    assert index.vote(["a", None, "b"], 3, "majority") == (None, "no_consensus")
    assert index.vote(["a", "a", None], 3, "unanimous") == (None, "no_consensus")
    assert index.vote(["a", "a", "a"], 3, "unanimous") == ("a", None)
    assert index.vote([None, ""], 2, "majority") == (None, "unannotated")


# ---- generic tables -------------------------------------------------------------------------------
def test_generic_csv_names_indices_whole_image_faces_and_duplicates(tmp_path):
    image(tmp_path / "imgs" / "a.jpg", 64, 48)
    image(tmp_path / "imgs" / "b.jpg")
    write(tmp_path / "t.csv", "path,x0,y0,x1,y1,expression,valence,arousal,split\n"
          "imgs/a.jpg,,,,,happiness,0.1,0.2,\n"        # no box: the whole image; names case-insensitive
          "imgs/b.jpg,1,2,30,25,3,,,validation\n"      # index 3 = Fear
          "imgs/b.jpg,5,5,20,20,Other,,,validation\n"  # a second face of b.jpg
          "imgs/b.jpg,1,2,30,25,3,,,validation\n"      # the first face again
          "imgs/c.jpg,1,1,5,5,Contempt,,,\n"           # not an ABAW class
          "imgs/d.jpg,1,1,5,5,,-3,0.5,\n"              # no expression, valence < -1: unannotated
          "imgs/e.jpg,1,1,5,5,,nan,0.5,\n")            # invalid value
    df = index.index_source({"name": "g", "kind": "generic", "root": str(tmp_path / "t.csv"), "split": "train"})
    rows = {(r["video"], r["frame"], r["drop"]): r for r in df.iter_rows(named=True)}
    a = rows[("imgs/a.jpg", 0, None)]
    assert (a["expression"], a["split"], a["box_x1"], a["box_y1"]) == (4, "train", 64, 48)
    assert a["path"] == str(tmp_path / "imgs" / "a.jpg")
    assert rows[("imgs/b.jpg", 0, None)]["expression"] == 3 and rows[("imgs/b.jpg", 0, None)]["split"] == "validation"
    assert rows[("imgs/b.jpg", 1, None)]["expression"] == 7
    assert ("imgs/b.jpg", 0, "duplicate") in rows
    assert ("imgs/c.jpg", 0, "unmapped_label") in rows
    assert ("imgs/d.jpg", 0, "unannotated") in rows
    assert ("imgs/e.jpg", 0, "invalid_value") in rows


def test_generic_parquet_float_labels(tmp_path):
    pl.DataFrame({"path": ["/abs/x.jpg", "../y.jpg"], "expression": [1.0, None], "valence": [0.5, 0.1],
                  "arousal": [0.1, 0.2], "x0": [0.0, 0.0], "y0": [0.0, 0.0], "x1": [9.0, 9.0], "y1": [9.0, 9.0]}
                 ).write_parquet(tmp_path / "t.parquet")
    df = index.index_source({"name": "g", "kind": "generic", "root": str(tmp_path / "t.parquet")}).sort("path")
    assert df["expression"].to_list() == [1, None]
    assert df["valence"].to_list() == pytest.approx([0.5, 0.1])
    assert df["video"].to_list() == ["abs/x.jpg", "%2E%2E/y.jpg"]   # keys stay safe tar paths
    assert df["path"].to_list() == ["/abs/x.jpg", str(tmp_path / "../y.jpg")]


@pytest.mark.parametrize("text, message", [
    ("file,expression\na.jpg,1\n", "a 'path' column is required"),
    ("path,x0,y0\na.jpg,1,2\n", "a box needs all of x0, y0, x1, y1"),
    ("path,valence\na.jpg,0.1\n", "valence and arousal come together"),
    ("path,label\na.jpg,1\n", "at least one label column"),
    ("path,valence,arousal\na.jpg,high,0.1\n", "row 2: column 'valence' is not a number: 'high'"),
    ("path,expression,split\na.jpg,1,dev\n", "row 2: unknown split 'dev'"),
    ("path,expression\n,1\n", "row 2: empty path"),
    ("path,expression,x0,y0,x1,y1\na.jpg,1,1,2,,\n", "row 2: box .* is incomplete"),
])
def test_generic_errors_name_the_table_and_row(tmp_path, text, message):
    write(tmp_path / "t.csv", text)
    with pytest.raises(index.AnnotationError, match=message) as err:
        index.index_source({"name": "g", "kind": "generic", "root": str(tmp_path / "t.csv")})
    assert "t.csv" in str(err.value)


def test_generic_needs_a_table(tmp_path):
    with pytest.raises(index.AnnotationError, match=r"\.csv or \.parquet"):
        index.index_source({"name": "g", "kind": "generic", "root": str(tmp_path / "t.txt")})
    with pytest.raises(FileNotFoundError, match="t.csv"):
        index.index_source({"name": "g", "kind": "generic", "root": str(tmp_path / "t.csv")})


# ---- Aff-Wild2 test lists -------------------------------------------------------------------------
@pytest.fixture
def affwild2_with_tests(tmp_path):
    root = tmp_path / "aw"
    for v in ("train1.avi", "test1.avi", "pair.avi"):
        write_video(root / "videos" / v, [BRIGHT] * 2)
    write(root / "EXPR_Classification_Challenge" / "Train_Set" / "train1.txt", EXPR_HEADER + "\n0\n1\n")
    write(root / "VA_Estimation_Challenge" / "Validation_Set" / "pair_left.txt", VA_HEADER + "\n0.1,0.1\n")
    tests = write(tmp_path / "test_set.txt", "\ufefftest1\r\npair_right.mp4\n\n# a comment\nghost\ntest1\n")
    return root, tests


def test_read_test_list(affwild2_with_tests, tmp_path):
    _, tests = affwild2_with_tests
    assert layout.read_test_list(tests) == ["test1", "pair_right", "ghost"]
    with pytest.raises(ValueError, match="not paths"):
        layout.read_test_list(write(tmp_path / "bad.txt", "videos/x.mp4\n"))


def test_test_list_becomes_test_split_placeholders(affwild2_with_tests):
    root, tests = affwild2_with_tests
    units = {u.unit: u for u in layout.affwild2_units(root, test_names=layout.read_test_list(tests))}
    assert [(a.name, a.person, a.split) for a in units["pair"].annotations] == [
        ("pair_right", "right", "test"), ("pair_left", "left", "validation")]
    assert [(a.name, a.split, a.files) for a in units["test1"].annotations] == [("test1", "test", {})]
    assert units["ghost"].video_path is None
    src = {"name": "aw", "kind": "affwild2", "root": str(root), "test_list": str(tests)}
    with pytest.raises(index.UnusableInputError, match=rf"no video file 'ghost' under .* \(annotated by the test list {tests}\)"):
        index.index_source(src)
    df = index.index_source(src, "skip")
    test = df.filter(pl.col("split") == "test").sort("video")
    assert test.select("video", "frame", "person", "drop").rows() == [
        ("ghost", WHOLE_VIDEO, "", "no_video"), ("pair_right", WHOLE_VIDEO, "right", None),
        ("test1", WHOLE_VIDEO, "", None)]
    assert test["expression"].null_count() == test["valence"].null_count() == 3
    assert df.filter(pl.col("split") != "test").height == 3
    with pytest.raises(ValueError, match="test_list is for affwild2"):
        index.index_source({"name": "e", "kind": "expw", "root": str(root), "test_list": str(tests)})


# ---- the workflow wiring of the new kinds and of test lists ---------------------------------------
def test_workflow_dry_run_wires_new_kinds_and_extracts_test_videos(affwild2_with_tests, affectnet_npy, aihub, tmp_path):
    """config schema + common.smk: the new kinds validate, their index inputs exist, and a video
    named only in the test list gets its own extraction job."""
    import yaml

    from workflow_helpers import CONFIG, TINY, snakemake

    root, tests = affwild2_with_tests
    image(tmp_path / "g" / "a.jpg")
    write(tmp_path / "g" / "t.csv", "path,expression\na.jpg,Anger\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({
        "demo": {"enabled": False},
        "extract": {"detector": "haar"},
        "sources": [
            {"name": "aw", "kind": "affwild2", "root": str(root), "test_list": str(tests)},
            {"name": "an8", "kind": "affectnet_npy", "root": str(affectnet_npy),
             "splits": {"train_set": "train", "val_set": None}, "chunks": 2},
            {"name": "ai", "kind": "aihub", "root": str(aihub), "splits": {"Training": "train"}, "vote": "unanimous",
             "label_map": {"분노": "Anger", "기쁨": "Happiness"}},
            {"name": "gen", "kind": "generic", "root": str(tmp_path / "g" / "t.csv"), "split": "validation"},
        ]}, allow_unicode=True))
    work = tmp_path / "work"
    work.mkdir()
    proc = snakemake(work, "-n", "--printshellcmds", configs=(CONFIG, TINY, extra))
    out = proc.stdout + proc.stderr
    videos = root / "videos"
    assert f"--video {videos / 'test1.avi'}" in out        # only in the test list: extracted too
    assert "--person pair_right=right" in out and "--person pair_left=left" in out
    assert "--person ghost" not in out                    # no video file: no job (counted as no_video)
    for source in ("an8", "ai", "gen"):
        assert f"results/manifest/{source}.parquet" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"sources": [{"name": "ai", "kind": "aihub", "root": str(aihub), "vote": "most"}]}))
    proc = snakemake(work, "-n", configs=(CONFIG, TINY, extra, bad), check=False)
    assert proc.returncode != 0 and "most" in proc.stdout + proc.stderr
    # a video annotated in two splits stops the run when the workflow is read, naming both files
    leak = write(root / "EXPR_Classification_Challenge" / "Validation_Set" / "train1.txt", EXPR_HEADER + "\n1\n")
    proc = snakemake(work, "-n", configs=(CONFIG, TINY, extra), check=False)
    train1 = root / "EXPR_Classification_Challenge" / "Train_Set" / "train1.txt"
    assert proc.returncode != 0
    assert f"'train1' is annotated in splits train and validation: {train1} and {leak}" in proc.stdout + proc.stderr


# ---- label maps, pinned code by code to each dataset's own documentation ---------------------------
# Written here from the datasets' documentation, independent of ferflow's tables (a swapped code in
# src/ or config.yaml turns these red). ABAW / Aff-Wild2 EXPR order, as the EXPR files' header lists it:
AFFWILD2_EXPR_HEADER = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
ABAW = {name: i for i, name in enumerate(AFFWILD2_EXPR_HEADER.split(","))}
# ExpW (label.lst): 0 angry, 1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise, 6 neutral
EXPW_TO_ABAW = {0: ABAW["Anger"], 1: ABAW["Disgust"], 2: ABAW["Fear"], 3: ABAW["Happiness"], 4: ABAW["Sadness"],
                5: ABAW["Surprise"], 6: ABAW["Neutral"]}
# AffectNet: 0 Neutral, 1 Happiness, 2 Sadness, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger, 7 Contempt
# (-> Other), 8 None, 9 Uncertain, 10 No-Face (not expressions: dropped)
AFFECTNET_TO_ABAW = {0: ABAW["Neutral"], 1: ABAW["Happiness"], 2: ABAW["Sadness"], 3: ABAW["Surprise"],
                     4: ABAW["Fear"], 5: ABAW["Disgust"], 6: ABAW["Anger"], 7: ABAW["Other"],
                     8: None, 9: None, 10: None}
# AI-Hub: the paper's subset, 중립 neutral, 분노 anger, 불안 anxiety -> Fear, 당황 embarrassment ->
# Surprise; 기쁨 joy, 슬픔 sadness, 상처 hurt left out
AIHUB_TO_ABAW = {"중립": ABAW["Neutral"], "분노": ABAW["Anger"], "불안": ABAW["Fear"], "당황": ABAW["Surprise"],
                 "기쁨": None, "슬픔": None, "상처": None}


def config_label_map(kind):
    """The label_map config.yaml gives its source of ``kind`` (None: the kind's default is used)."""
    import yaml

    from workflow_helpers import CONFIG

    return next((s.get("label_map") for s in yaml.safe_load(CONFIG.read_text())["sources"] if s["kind"] == kind), None)


def test_abaw_order_is_the_affwild2_header():
    from ferflow.labels import EXPRESSIONS

    assert EXPR_HEADER == AFFWILD2_EXPR_HEADER
    assert {name: i for i, name in enumerate(EXPRESSIONS)} == ABAW


def test_affwild2_expr_codes_and_va_columns_read_through_the_native_files(tmp_path):
    root = tmp_path / "aw"
    write_video(root / "videos" / "v.avi", [BRIGHT] * 2)
    write(root / "EXPR_Classification_Challenge" / "Train_Set" / "v.txt", EXPR_HEADER + "\n" + "\n".join(map(str, range(8))) + "\n")
    # valence and arousal differ on every line (arousal read from the valence column would show)
    va = [(round(-0.7 + 0.2 * i, 2), round(0.9 - 0.25 * i, 2)) for i in range(8)]
    write(root / "VA_Estimation_Challenge" / "Train_Set" / "v.txt", VA_HEADER + "\n" + "\n".join(f"{v},{a}" for v, a in va) + "\n")
    df = index.index_source({"name": "aw", "kind": "affwild2", "root": str(root)}).sort("frame")
    assert df["expression"].to_list() == [ABAW[name] for name in AFFWILD2_EXPR_HEADER.split(",")]
    assert df["valence"].to_list() == pytest.approx([v for v, _ in va])
    assert df["arousal"].to_list() == pytest.approx([a for _, a in va])


@pytest.mark.parametrize("label_map", ["default", "config.yaml"])
def test_expw_codes_map_as_documented(tmp_path, label_map):
    root = tmp_path / "expw"
    write(root / "label" / "label.lst", "".join(f"x.jpg {c} 0 0 9 9 0.9 {c}\n" for c in EXPW_TO_ABAW))
    src = {"name": "expw", "kind": "expw", "root": str(root), "split": "train"}
    if label_map == "config.yaml":
        src["label_map"] = config_label_map("expw")
    df = index.index_source(src).sort("frame")
    assert dict(zip(df["frame"].to_list(), df["expression"].to_list())) == EXPW_TO_ABAW


@pytest.mark.parametrize("label_map", ["default", "config.yaml"])
def test_affectnet_codes_and_va_map_as_documented(tmp_path, label_map):
    root = tmp_path / "an"
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"
    va = {c: (round(-0.8 + 0.15 * c, 3), round(0.7 - 0.12 * c, 3)) for c in AFFECTNET_TO_ABAW}
    write(root / "Manually_Annotated_file_lists" / "training.csv",
          header + "".join(f"{c}/i.jpg,0,0,9,9,,{c},{va[c][0]},{va[c][1]}\n" for c in AFFECTNET_TO_ABAW))
    src = {"name": "an", "kind": "affectnet", "root": str(root), "splits": {"training": "train"}}
    if label_map == "config.yaml":
        src["label_map"] = config_label_map("affectnet")
    rows = {int(r["video"].split("/")[0]): r for r in index.index_source(src).iter_rows(named=True)}
    assert {c: r["expression"] for c, r in rows.items()} == AFFECTNET_TO_ABAW
    assert {c: r["expr_status"] for c, r in rows.items()} == {
        c: "usable" if abaw is not None else "unmapped_label" for c, abaw in AFFECTNET_TO_ABAW.items()}
    assert {c: r["valence"] for c, r in rows.items()} == pytest.approx({c: v for c, (v, _) in va.items()})
    assert {c: r["arousal"] for c, r in rows.items()} == pytest.approx({c: a for c, (_, a) in va.items()})


def test_affectnet_npy_codes_map_as_documented(tmp_path):
    root = tmp_path / "an8"
    for c in range(8):
        image(root / "train_set" / "images" / f"{c}.jpg")
        (root / "train_set" / "annotations").mkdir(parents=True, exist_ok=True)
        np.save(root / "train_set" / "annotations" / f"{c}_exp.npy", np.array(str(c)))
    df = index.index_source({"name": "an8", "kind": "affectnet_npy", "root": str(root), "tasks": ["expr"],
                             "splits": {"train_set": "train"}})
    got = {int(v.split("/")[-1].split(".")[0]): e for v, e in zip(df["video"], df["expression"])}
    assert got == {c: AFFECTNET_TO_ABAW[c] for c in range(8)}


def test_aihub_default_map_is_the_papers_subset(tmp_path):
    root = tmp_path / "ai"
    items = [{"filename": f"{i}.jpg", **{f"annot_{k}": annot(emotion) for k in "ABC"}}
             for i, emotion in enumerate(AIHUB_TO_ABAW)]
    for it in items:
        image(root / it["filename"], 100, 100)
    (root / "labels.json").write_bytes(json.dumps(items, ensure_ascii=False).encode("utf-8"))
    rows = by_video(index.index_source({"name": "ai", "kind": "aihub", "root": str(root)}))
    assert {emotion: rows[f"{i}.jpg"]["expression"] for i, emotion in enumerate(AIHUB_TO_ABAW)} == AIHUB_TO_ABAW
