"""Readers of the native annotation formats, on files written here in those formats."""

import hashlib
import json
import os
import subprocess
import sys

import polars as pl
import pytest

from ferflow import index, layout
from ferflow.labels import EXPR_HEADER, VA_HEADER
from ferflow.schemas import ISSUES, MANIFEST, read_table
from test_accounting import BRIGHT, write_video


def expected_chunk(relative_path: str, chunks: int) -> str:
    """The chunk layout.chunk_of documents, computed here: the first 8 bytes of the BLAKE2b digest
    of the UTF-8 path, as a big-endian integer, modulo the number of chunks."""
    digest = hashlib.blake2b(relative_path.encode("utf-8"), digest_size=8).digest()
    return "chunk%03d" % (int(digest.hex(), 16) % chunks)


def test_chunk_of_is_stable_across_hash_seeds_and_spreads_images():
    names = [f"{d}/{i}.jpg" for d in range(3) for i in range(40)]
    assert [layout.chunk_of(n, 7) for n in names] == [expected_chunk(n, 7) for n in names]
    code = "from ferflow import layout; print(layout.chunk_of('1/a.jpg', 5))"
    seen = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout.strip() for seed in ("0", "1", "2")}
    assert seen == {expected_chunk("1/a.jpg", 5)}
    assert len({layout.chunk_of(n, 7) for n in names}) == 7     # every chunk gets images


def write(path, text, mode="w", encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, encoding=encoding, newline="") as fh:
        fh.write(text)
    return path


@pytest.fixture
def affwild2(tmp_path):
    root = tmp_path / "aw"
    (root / "videos").mkdir(parents=True)
    for v in ("vidA.avi", "pair.avi"):  # indexing opens each video (probe_video) and decodes at most one frame
        write_video(root / "videos" / v, [BRIGHT] * 2)
    e = root / "EXPR_Classification_Challenge"
    va = root / "VA_Estimation_Challenge"
    write(e / "Train_Set" / "vidA.txt", EXPR_HEADER + "\n0\n4\n-1\n9\nx\n7\n")
    write(va / "Train_Set" / "vidA.txt", VA_HEADER + "\n0.5,0.1\n-5,-5\n-5,-5\n0.2,0.3\nnan,0.1\n1.5,0\n0.1,0.1\n")
    # Windows line endings and a byte-order mark, two-person files
    write(e / "Validation_Set" / "pair_left.txt", "\ufeff" + EXPR_HEADER + "\r\n1\r\n2\r\n", encoding="utf-8")
    write(e / "Validation_Set" / "pair_right.txt", EXPR_HEADER + "\n3\n")
    return root


def test_affwild2_rows_labels_and_reasons(affwild2):
    src = {"name": "aw", "kind": "affwild2", "root": str(affwild2)}
    df = index.index_source(src)
    a = df.filter(pl.col("video") == "vidA").sort("frame")
    # EXPR has 6 frames, VA has 7: the longer file defines the frames; merge is per frame
    assert a["frame"].to_list() == list(range(7))
    assert a["expression"].to_list() == [0, 4, None, None, None, 7, None]
    assert a["valence"].to_list()[0] == pytest.approx(0.5)
    assert a["valence"].to_list()[1:3] == [None, None]
    assert a["valence"].to_list()[3] == pytest.approx(0.2)
    # frame 2: EXPR -1 and VA -5 -> unannotated; frame 4: 'x' and nan -> invalid_value
    assert a["drop"].to_list() == [None, None, "unannotated", None, "invalid_value", None, None]
    # each task's label has its own fate: frame 3's EXPR 9 and frame 5's VA 1.5 are invalid though
    # the frame is kept for the other task; frame 6 has no EXPR line at all
    assert a["expr_status"].to_list() == ["usable", "usable", "unannotated", "invalid_value", "invalid_value",
                                          "usable", None]
    assert a["va_status"].to_list() == ["usable", "unannotated", "unannotated", "usable", "invalid_value",
                                        "invalid_value", "usable"]
    pair = df.filter(pl.col("unit") == "pair").sort("video", "frame")
    assert pair["video"].to_list() == ["pair_left", "pair_left", "pair_right"]
    assert pair["person"].to_list() == ["left", "left", "right"]
    assert pair["expression"].to_list() == [1, 2, 3]
    assert set(pair["split"]) == {"validation"}
    assert pair["path"][0].endswith("pair.avi")


def test_affwild2_wrong_header_and_empty_file_name_the_file(affwild2):
    bad = write(affwild2 / "EXPR_Classification_Challenge" / "Train_Set" / "vidA.txt", "Neutral,Angry\n0\n")
    with pytest.raises(index.AnnotationError, match=r"vidA\.txt: wrong header"):
        index.index_source({"name": "aw", "kind": "affwild2", "root": str(affwild2)})
    bad.write_text("")
    with pytest.raises(index.AnnotationError, match=r"vidA\.txt: empty annotation file"):
        index.index_source({"name": "aw", "kind": "affwild2", "root": str(affwild2)})


def test_annotation_without_video_stops_the_index_or_is_counted_when_skipped(affwild2):
    ghost_file = write(affwild2 / "EXPR_Classification_Challenge" / "Train_Set" / "ghost_left.txt",
                       EXPR_HEADER + "\n1\n1\n")
    src = {"name": "aw", "kind": "affwild2", "root": str(affwild2)}
    with pytest.raises(index.UnusableInputError, match=rf"no video file 'ghost_left' or 'ghost' under .*videos "
                                                      rf"\(annotated by {ghost_file}\)"):
        index.index_source(src)
    issues = []
    df = index.index_source(src, "skip", issues)
    ghost = df.filter(pl.col("video") == "ghost_left")
    assert ghost.height == 2 and set(ghost["drop"]) == {"no_video"}
    (missing,) = [i for i in issues if i["reason"] == "no_video"]
    assert missing["split"] == "train" and str(ghost_file) in missing["text"]
    # the invalid lines of vidA, each with its file, 1-based line number (the header is line 1) and text
    vid_a = affwild2 / "EXPR_Classification_Challenge" / "Train_Set" / "vidA.txt"
    va_a = affwild2 / "VA_Estimation_Challenge" / "Train_Set" / "vidA.txt"
    assert sorted((i["file"], i["line"], i["text"]) for i in issues if i["reason"] == "invalid_value") == sorted([
        (str(vid_a), 5, "9"), (str(vid_a), 6, "x"), (str(va_a), 6, "nan,0.1"), (str(va_a), 7, "1.5,0")])


def test_layout_listing_matches_disk(affwild2):
    from_disk = layout.affwild2_units(affwild2)
    listing = [str(p) for p in affwild2.rglob("*") if p.is_file()]
    from_listing = layout.affwild2_units(affwild2, listing=listing)
    assert [(u.unit, u.video_path, [(a.name, a.person, a.split) for a in u.annotations]) for u in from_disk] == \
           [(u.unit, u.video_path, [(a.name, a.person, a.split) for a in u.annotations]) for u in from_listing]
    assert [u.unit for u in from_disk] == ["pair", "vidA"]
    assert from_disk[0].persons == ["left", "right"]


def test_affectnet_csv_label_map_and_invalid(tmp_path):
    root = tmp_path / "an"
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"
    rows = [
        "1/a.jpg,10,20,30,40,,1,0.5,0.2",   # Happiness
        "1/b.jpg,0,0,10,10,,7,0.1,0.1",     # Contempt -> Other
        "2/c.jpg,0,0,10,10,,8,0.3,0.3",     # None: unmapped expression but valid VA -> usable for VA
        "2/d.jpg,0,0,10,10,,9,-2,-2",       # Uncertain and VA invalid -> unmapped_label
        "2/e.jpg,0,0,10,10,,6,-2,-2",       # Anger, VA invalid -> expression only
    ]
    write(root / "Manually_Annotated_file_lists" / "training.csv", header + "\n".join(rows) + "\n")
    src = {"name": "an", "kind": "affectnet", "root": str(root), "splits": {"training": "train"}, "chunks": 2,
           "label_map": index.DEFAULT_LABEL_MAPS["affectnet"]}
    df = index.index_source(src).sort("path")
    assert df["expression"].to_list() == [4, 7, None, None, 1]
    assert df["drop"].to_list() == [None, None, None, "unmapped_label", None]
    assert df["valence"].to_list()[2] == pytest.approx(0.3)
    assert df["valence"].to_list()[4] is None
    assert (df["box_x0"][0], df["box_y0"][0], df["box_x1"][0], df["box_y1"][0]) == (10, 20, 40, 60)
    assert set(df["unit"]) <= {"chunk000", "chunk001"}
    # an image's identity is its path (video) and face number (frame): keys never shift
    assert df["video"].to_list() == ["1/a.jpg", "1/b.jpg", "2/c.jpg", "2/d.jpg", "2/e.jpg"]
    assert set(df["frame"]) == {0}
    assert df["unit"].to_list() == [expected_chunk(v, 2) for v in df["video"]]


def test_expw_and_cli_writes_checked_manifest(tmp_path):
    root = tmp_path / "expw"
    write(root / "label" / "label.lst", "x.jpg 0 5 6 50 60 0.9 3\nx.jpg 1 1 2 20 30 0.8 6\ny.jpg 0 0 0 9 9 0.5 11\n")
    out = tmp_path / "m.parquet"
    src = {"name": "expw", "kind": "expw", "root": str(root), "split": "train", "chunks": 1}
    assert index.main(["--source", json.dumps(src), "--out", str(out)]) == 0
    df = read_table(out, MANIFEST).sort("video", "frame")
    assert df["expression"].to_list() == [4, 0, None]   # happy -> Happiness(4), neutral -> Neutral(0)
    assert df["drop"].to_list() == [None, None, "unmapped_label"]
    assert list(zip(df["video"], df["frame"])) == [("x.jpg", 0), ("x.jpg", 1), ("y.jpg", 0)]
    assert df["unit"].n_unique() == 1   # both faces of x.jpg in one chunk: the image is read once
    assert (df["box_x0"][0], df["box_y0"][0], df["box_x1"][0], df["box_y1"][0]) == (6, 5, 50, 60)
    write(root / "label" / "label.lst", "x.jpg 0 5 6 50\n")
    with pytest.raises(index.AnnotationError, match=r"label\.lst:1: expected 8 fields"):
        index.index_source(src)


# ---- split leaks ----------------------------------------------------------------------------------
def test_same_video_in_two_splits_is_an_error_naming_both_files(affwild2):
    e = affwild2 / "EXPR_Classification_Challenge"
    train = write(e / "Train_Set" / "V.txt", EXPR_HEADER + "\n1\n")
    val = write(e / "Validation_Set" / "V.txt", EXPR_HEADER + "\n2\n")
    write_video(affwild2 / "videos" / "V.avi", [BRIGHT] * 2)
    src = {"name": "aw", "kind": "affwild2", "root": str(affwild2)}
    with pytest.raises(layout.SplitLeakError, match=rf"'V' is annotated in splits train and validation: "
                                                    rf"{train} and {val}"):
        index.index_source(src)
    # the same leak through another task: EXPR in train, VA in validation
    val.unlink()
    va_val = write(affwild2 / "VA_Estimation_Challenge" / "Validation_Set" / "V.txt", VA_HEADER + "\n0.1,0.2\n")
    with pytest.raises(layout.SplitLeakError, match=rf"'V' is annotated in splits train and validation: "
                                                    rf"{train} and {va_val}"):
        index.index_source(src)
    # two native folders mapped to one split: two EXPR files for one video
    va_val.unlink()
    write(e / "Validation_Set" / "V.txt", EXPR_HEADER + "\n2\n")
    with pytest.raises(layout.DuplicateAnnotationError, match=rf"'V' has two EXPR files in split train: {train} and {val}"):
        index.index_source({**src, "splits": {"Train_Set": "train", "Validation_Set": "train"}})


def test_people_of_one_video_in_two_splits_are_allowed_and_warned_about_once(affwild2, capsys):
    from ferflow import shards

    e = affwild2 / "EXPR_Classification_Challenge"
    write(e / "Train_Set" / "X_left.txt", EXPR_HEADER + "\n1\n1\n")
    write(e / "Validation_Set" / "X_right.txt", EXPR_HEADER + "\n2\n2\n")
    write_video(affwild2 / "videos" / "X.avi", [BRIGHT] * 2)
    src = {"name": "aw", "kind": "affwild2", "root": str(affwild2)}
    issues = []
    df = index.index_source(src, issues=issues)
    x = df.filter(pl.col("unit") == "X").sort("video")
    assert x.select("video", "person", "split").unique(maintain_order=True).rows() == [
        ("X_left", "left", "train"), ("X_right", "right", "validation")]
    shared = [i for i in issues if i["reason"] == "shared_video"]
    assert [(i["file"], i["text"]) for i in shared] == [
        ("X", "video 'X' has people in more than one split (train: X_left; validation: X_right)")]
    # the CLI writes them to its issues table; the summary warns once, by name
    out = affwild2.parent
    assert index.main(["--source", json.dumps(src), "--out", str(out / "m.parquet"), "--issues", str(out / "i.parquet")]) == 0
    table = read_table(out / "i.parquet", ISSUES)
    assert table.filter(pl.col("reason") == "shared_video")["file"].to_list() == ["X"]
    rows = pl.DataFrame({"source": ["aw"], "split": ["train"], "video": ["X_left"], "frame": [0], "status": ["written"],
                         "reason": [None], "expr_fate": ["written"], "va_fate": [None]})
    text = shards.summary_text(rows, table)
    assert text.count("video 'X' has people in more than one split") == 1
    assert "warning: aw: video 'X' has people in more than one split (train: X_left; validation: X_right)\n" in text


def test_a_misspelt_split_folder_and_an_affwild2_label_map_are_errors(tmp_path):
    """A split folder named in ``splits`` that exists under no task folder, and a ``label_map`` on
    an Aff-Wild2 source (which would be ignored), stop the index with a message naming them."""
    import pytest

    from ferflow import index

    root = tmp_path / "aw"
    (root / "EXPR_Classification_Challenge" / "Train_Set").mkdir(parents=True)
    (root / "EXPR_Classification_Challenge" / "Validation_Set").mkdir(parents=True)
    (root / "videos").mkdir()
    source = {"name": "aw", "kind": "affwild2", "root": str(root),
              "splits": {"Train_Set": "train", "Valid_Set": "validation"}}
    with pytest.raises(index.AnnotationError, match="split folder 'Valid_Set' .mapped to 'validation'. exists under none of"):
        index.index_source(source, "stop", [])
    source = {"name": "aw", "kind": "affwild2", "root": str(root), "label_map": {"0": "Anger"}}
    with pytest.raises(index.AnnotationError, match="label_map is not used for kind affwild2"):
        index.index_source(source, "stop", [])
