"""Shard writing: every manifest row accounted for, shards readable by tar and webdataset."""

import io
import tarfile

import numpy as np
import polars as pl
import pytest

from ferflow import shards
from ferflow.labels import EXPR_HEADER
from ferflow.schemas import ACCOUNTING, FACES, LABELS, MANIFEST, read_table, write_table


def jpeg(value):
    import cv2

    ok, buf = cv2.imencode(".jpg", np.full((8, 8, 3), value, np.uint8))
    return buf.tobytes()


def make_unit(root, source, unit, videos, n_frames, missing=()):
    """A faces table + tar for one unit: every frame detected except ``missing``."""
    rows = {c: [] for c in FACES}
    d = root / "faces" / source
    d.mkdir(parents=True, exist_ok=True)
    with tarfile.open(d / f"{unit}.tar", "w") as tar:
        for video in videos:
            for f in range(n_frames):
                found = f not in missing
                member = f"{video}/{f:06d}.jpg" if found else None
                if found:
                    data = jpeg(f)
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                for c, v in dict(video=video, frame=f, status="detected" if found else "missing",
                                 x0=0.0 if found else None, y0=0.0 if found else None, x1=1.0 if found else None,
                                 y1=1.0 if found else None, score=0.9 if found else None, member=member,
                                 n_frames=n_frames).items():
                    rows[c].append(v)
    write_table(pl.DataFrame(rows, schema=FACES), d / f"{unit}.parquet", FACES)
    return str(d / f"{unit}.parquet")


def manifest_rows(source, split, unit, video, frames, drop=None):
    n = len(frames)
    return pl.DataFrame({
        "source": source, "split": split, "unit": unit, "video": video, "frame": frames, "person": "",
        "path": "x", "expression": [f % 8 for f in frames], "valence": [0.1] * n, "arousal": [0.2] * n,
        "box_x0": None, "box_y0": None, "box_x1": None, "box_y1": None, "drop": drop,
        "expr_status": "unannotated" if drop == "unannotated" else "usable",
        "va_status": "unannotated" if drop == "unannotated" else "usable",
    }, schema=MANIFEST)


@pytest.fixture
def inputs(tmp_path):
    # v1: 10 frames decoded, 12 annotation lines (2 beyond the end), frames 3,4 without a face
    # v2 (validation, a dotted name): 6 frames; one annotation line unannotated at indexing
    # v3: unit whose video could not be read (empty faces table)
    faces = [make_unit(tmp_path, "aw", "v1", ["v1"], 10, missing={3, 4}),
             make_unit(tmp_path, "aw", "v2.x", ["v2.x"], 6)]
    empty = tmp_path / "faces" / "aw" / "v3.parquet"
    write_table(pl.DataFrame(schema=FACES), empty, FACES)
    with tarfile.open(empty.with_suffix(".tar"), "w"):
        pass
    faces.append(str(empty))
    m = pl.concat([
        manifest_rows("aw", "train", "v1", "v1", list(range(12))),
        manifest_rows("aw", "validation", "v2.x", "v2.x", list(range(5)), drop=None),
        manifest_rows("aw", "validation", "v2.x", "v2.x", [5], drop="unannotated"),
        manifest_rows("aw", "train", "v3", "v3", [0, 1]),
        manifest_rows("aw", "train", "v1", "v1", [0]),  # the same frame listed twice
    ])
    write_table(m, tmp_path / "m.parquet", MANIFEST)
    return tmp_path, [str(tmp_path / "m.parquet")], faces


def test_every_row_accounted_with_reasons(inputs):
    root, manifests, faces = inputs
    rows = shards.write_shards(manifests, faces, str(root / "shards"), str(root / "acc.parquet"), samples_per_shard=4, seed=1)
    acc = read_table(root / "acc.parquet", ACCOUNTING)
    assert acc.height == 12 + 6 + 2 + 1
    reasons = dict(acc.group_by(pl.coalesce("reason", "status")).len().iter_rows())
    assert reasons == {"written": 8 + 5, "no_face": 2, "beyond_video_end": 2, "unannotated": 1,
                       "unreadable_video": 2, "duplicate": 1}
    summary = shards.accounting_summary(rows)
    assert summary["total"].sum() == acc.height


def test_shards_hold_exactly_the_written_samples(inputs):
    import webdataset as wds

    root, manifests, faces = inputs
    shards.write_shards(manifests, faces, str(root / "shards"), str(root / "acc.parquet"), samples_per_shard=4, seed=1)
    labels = read_table(root / "shards" / "labels.parquet", LABELS)
    assert labels["key"].is_unique().all() and labels.height == 13
    train = sorted((root / "shards" / "train").glob("shard-*.tar"))
    assert [t.name for t in train] == ["shard-00000.tar", "shard-00001.tar"]   # 8 samples, 4 per shard
    # plain tar reads them; members are <key>.jpg
    with tarfile.open(train[0]) as tar:
        names = tar.getnames()
    assert len(names) == 4 and all(n.startswith("train/aw/v1/") and n.endswith(".jpg") for n in names)
    # the standard webdataset reader gives the same keys (the dotted video name stays in the key)
    keys = [s["__key__"] for s in wds.WebDataset([str(p) for p in sorted((root / "shards" / "validation").glob("*.tar"))], shardshuffle=False)]
    assert sorted(keys) == sorted(labels.filter(pl.col("split") == "validation")["key"])
    assert "validation/aw/v2.x/000003" in keys
    # the crop bytes are those of the right frame
    with tarfile.open(train[0]) as tar:
        m = tar.getmembers()[0]
        frame = int(m.name.split("/")[-1].split(".")[0])
        img = tar.extractfile(m).read()
    assert img == jpeg(frame)


def test_shuffle_is_seeded_and_mixes_videos(inputs):
    root, manifests, faces = inputs
    order = []
    for run in range(2):
        out = root / f"s{run}"
        shards.write_shards(manifests, faces, str(out), str(root / "acc.parquet"), samples_per_shard=100, seed=7)
        order.append(read_table(out / "labels.parquet", LABELS)["key"].to_list())
    assert order[0] == order[1]
    train = [k for k in order[0] if k.startswith("train/")]
    assert train != sorted(train)


def test_unsafe_member_names_are_refused():
    for bad in ("/etc/passwd", "../x.jpg", "a/../../b.jpg", "a//b.jpg"):
        with pytest.raises(ValueError, match="unsafe tar member name"):
            shards.safe_member_name(bad, "t.tar")
    assert shards.safe_member_name("v/000001.jpg", "t.tar") == "v/000001.jpg"


def test_keys_are_stable_when_data_is_added(tmp_path):
    """Re-running index -> extract -> shards with more data keeps every existing key, its labels
    and its crop; only new keys appear (image keys are the image's path + face number, not a row
    number within a chunk)."""
    from test_accounting import (affwild2_source, expw_source, generic_source, run_pipeline, write_image,
                                 write_text, write_video, BRIGHT)

    data = tmp_path / "data"
    sources = [affwild2_source(data), expw_source(data), generic_source(data)]

    def crops(out):
        got = {}
        for p in sorted((out / "shards").glob("*/shard-*.tar")):
            with tarfile.open(p) as tar:
                for m in tar.getmembers():
                    got[m.name[: -len(".jpg")]] = tar.extractfile(m).read()
        return got

    before = run_pipeline(sources, tmp_path / "a", samples_per_shard=3, seed=5, on_unusable="skip")
    old_labels = read_table(tmp_path / "a" / "shards" / "labels.parquet", LABELS)
    old_crops = crops(tmp_path / "a")
    # more data: ExpW images sorting before and after the old ones (same chunks), a new face of an
    # old image, generic rows in front, a new Aff-Wild2 video
    lst = data / "expw" / "label" / "label.lst"
    write_image(data / "expw" / "image" / "origin" / "aaa.jpg")
    write_image(data / "expw" / "image" / "origin" / "zzz.jpg")
    lst.write_text("aaa.jpg 0 8 8 40 40 0.9 1\n" + lst.read_text() + "good.jpg 3 20 20 50 50 0.9 4\nzzz.jpg 0 8 8 40 40 0.9 5\n")
    write_image(data / "generic" / "a0.png")
    table = data / "generic" / "t.csv"
    header, *rest = table.read_text().splitlines()
    write_text(table, "\n".join([header, "a0.png,Anger,0.1,0.1", *rest]) + "\n")
    aw = data / "affwild2"
    write_video(aw / "videos" / "vid0.avi", [BRIGHT] * 4)
    write_text(aw / "EXPR_Classification_Challenge" / "Train_Set" / "vid0.txt", EXPR_HEADER + "\n1\n2\n3\n4\n")
    after = run_pipeline(sources, tmp_path / "b", samples_per_shard=3, seed=5, on_unusable="skip")
    new_labels = read_table(tmp_path / "b" / "shards" / "labels.parquet", LABELS)
    assert new_labels.height > old_labels.height and after.height > before.height
    cols = ["key", "split", "source", "video", "frame", "expression", "valence", "arousal"]
    kept = old_labels.select(cols).join(new_labels.select(cols), on=cols, how="anti", nulls_equal=True)
    assert kept.height == 0, f"keys or labels changed: {kept['key'].to_list()[:5]}"
    new_crops = crops(tmp_path / "b")
    assert all(new_crops[k] == v for k, v in old_crops.items())
    # the accounting of the old rows is unchanged too (fates and keys)
    acc_cols = ["source", "split", "video", "frame", "status", "reason", "key"]
    assert before.select(acc_cols).join(after.select(acc_cols), on=acc_cols, how="anti", nulls_equal=True).height == 0


def test_a_unit_with_usable_frames_and_no_faces_table_is_an_error_naming_the_table(tmp_path):
    """A faces table in a folder not named after its source (or none at all) must not turn every
    frame of its unit into ``unreadable_video``: the stage stops, naming the table it expected."""
    import polars as pl
    import pytest

    from ferflow.shards import AccountingError, check_faces_units

    manifest = pl.DataFrame({"source": ["aw", "aw", "aw"], "unit": ["X", "X", "H"],
                             "drop": [None, None, "no_video"]}, schema={"source": pl.String, "unit": pl.String,
                                                                        "drop": pl.String})
    with pytest.raises(AccountingError, match=r"no faces table for 1 unit\(s\) with usable frames, e\.g\. aw/X: "
                                              r"expected <faces>/aw/X\.parquet"):
        check_faces_units(manifest, [str(tmp_path / "elsewhere" / "X.parquet")])
    check_faces_units(manifest, [str(tmp_path / "aw" / "X.parquet")])  # H has no usable row: no table needed


def test_crops_are_read_by_offset_with_few_files_open(tmp_path):
    """crop_index + CropReader give each member's own bytes (as tarfile extracts them), with at most
    max_open tars open however many are read, in any order; a repeated name is its last member."""
    tars = []
    for t in range(5):
        path = tmp_path / f"u{t}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as out:
            for i in range(3):
                data = f"tar {t} crop {i} ".encode() * (i + 1)
                info = tarfile.TarInfo(f"v/{i:06d}.jpg")
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
            again = b"the last one"
            info = tarfile.TarInfo("v/000001.jpg")
            info.size = len(again)
            out.addfile(info, io.BytesIO(again))
        tars.append(str(path))
    index = shards.crop_index(tars)
    assert index.height == 5 * 3
    with shards.CropReader(max_open=2) as reader:
        for tar_path, member, offset, size in index.sample(fraction=1.0, shuffle=True, seed=3).select(
                pl.col("tar").cast(pl.String), "member", "_offset", "_size").iter_rows():
            with tarfile.open(tar_path) as t:
                want = t.extractfile(t.getmember(member)).read()  # getmember: the last of a repeated name
            assert reader.read(tar_path, offset, size) == want
            assert len(reader.fds) <= 2
        assert len(reader.fds) == 2
    assert reader.fds == {}
