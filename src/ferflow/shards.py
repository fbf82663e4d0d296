"""Stage ``write_shards``: manifests + face crops -> WebDataset shards, labels and accounting.

Every manifest row ends in exactly one place: written to a shard, or dropped with a reason. A
test video's WHOLE_VIDEO row (see ``schemas.WHOLE_VIDEO``) becomes one row per decoded frame of
the video, written without labels or dropped as ``no_face`` (one row, ``unreadable_video`` or
``no_video``, when the video gave no frame). The totals are checked (:func:`check_accounting`)
before anything is written and the shards are counted after: the stage fails when they do not add
up. A summary table is printed.

The invariant, per source and split: accounting rows == annotated manifest rows (one per annotated
frame or face) + the decoded frames of each test video (1 for a test video without frames);
written + dropped == accounting rows; written == labels.parquet rows == shard members. Test frames
are not annotated frames: the summary counts them in their own ``test`` split.

Shards: ``<out>/<split>/shard-{i:05d}.tar``, samples shuffled across videos and sources with a
seed, ``samples_per_shard`` per shard (the last one smaller), members ``<key>.jpg`` only.
Labels: ``<out>/labels.parquet`` (schema LABELS), the single source of truth for labels. Keys
``{split}/{source}/{video}/{frame:06d}`` depend only on the sample itself, never on what else is in
the sources: adding data keeps every existing key.

    python -m ferflow.shards --manifest results/manifest/*.parquet --faces results/faces/*/*.parquet \
        --out results/shards --accounting results/accounting.parquet --samples-per-shard 1000 --seed 0
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

import polars as pl

from .atomic import atomic_dir, atomic_path, write_text
from .schemas import ACCOUNTING, DROP_REASONS, FACES, LABELS, MANIFEST, WHOLE_VIDEO, read_table, write_table


class AccountingError(AssertionError):
    """The accounting does not add up (a bug or inconsistent inputs); nothing is written."""


FACE_STATUS_REASON = {"missing": "no_face", "unreadable": "unreadable_image", "bad_box": "bad_box",
                      "undecodable": "unreadable_frame"}


def sample_key(split: str, source: str, video: str, frame: int) -> str:
    return f"{split}/{source}/{video}/{frame:06d}"


def safe_member_name(name: str, where: str) -> str:
    """Tar member names are checked when read: no absolute paths, no '..', no empty parts."""
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{where}: unsafe tar member name {name!r}")
    return name


def load_faces(paths: list[str]) -> pl.DataFrame:
    """All FACES tables with their source and unit (from ``<faces>/<source>/<unit>.parquet``)."""
    frames = []
    for p in paths:
        p = Path(p)
        t = read_table(p, FACES).with_columns(
            source=pl.lit(p.parent.name), unit=pl.lit(p.stem), tar=pl.lit(str(p.with_suffix(".tar"))))
        frames.append(t)
    if not frames:
        return pl.DataFrame(schema={**FACES, "source": pl.String, "unit": pl.String, "tar": pl.String})
    faces = pl.concat(frames)
    dup = faces.filter(pl.struct("source", "video", "frame").is_duplicated())
    if dup.height:
        r = dup.row(0, named=True)
        raise AccountingError(f"faces tables: {dup.height} rows repeat a (source, video, frame), e.g. "
                              f"{r['source']}/{r['video']} frame {r['frame']} in {r['unit']}.parquet")
    return faces


def expand_whole_videos(manifest: pl.DataFrame, faces: pl.DataFrame) -> pl.DataFrame:
    """Replace each usable WHOLE_VIDEO row by one row per frame its video's faces table lists
    (every decoded frame); a WHOLE_VIDEO row without any such frame stays as it is."""
    whole = (pl.col("frame") == WHOLE_VIDEO) & pl.col("drop").is_null()
    placeholders = manifest.filter(whole)
    if not placeholders.height:
        return manifest
    frames = faces.select("source", "video", pl.col("frame").alias("_frame"))
    expanded = (placeholders.join(frames, on=["source", "video"], how="inner")
                .with_columns(frame=pl.col("_frame")).select(list(MANIFEST)).sort("source", "video", "frame"))
    kept = placeholders.join(frames.select("source", "video").unique(), on=["source", "video"], how="anti")
    return pl.concat([manifest.filter(~whole), expanded, kept])


def account(manifest: pl.DataFrame, faces: pl.DataFrame) -> pl.DataFrame:
    """Join manifest rows to their crops and give each row its fate (status, reason, key)."""
    manifest = expand_whole_videos(manifest, faces)
    # decoded frame count per (source, unit); a unit with an empty table was not readable
    frames_per_unit = faces.group_by("source", "unit").agg(pl.col("n_frames").max())
    joined = (
        manifest.join(faces.select("source", "video", "frame", "status", "member", "tar"),
                      on=["source", "video", "frame"], how="left")
        .join(frames_per_unit, on=["source", "unit"], how="left")
    )
    stale = joined.filter((pl.col("frame") == WHOLE_VIDEO) & pl.col("drop").is_null() & (pl.col("n_frames") > 0))
    if stale.height:
        r = stale.row(0, named=True)
        raise AccountingError(f"faces of {r['source']}/{r['unit']}: {r['n_frames']} frames decoded but none for "
                              f"test video {r['video']!r}: the faces table is older than the test list")
    reason = (
        pl.when(pl.col("drop").is_not_null()).then(pl.col("drop"))
        .when(pl.col("n_frames").is_null() | (pl.col("n_frames") == 0)).then(pl.lit("unreadable_video"))
        .when(pl.col("status").is_null() & (pl.col("frame") >= pl.col("n_frames"))).then(pl.lit("beyond_video_end"))
        .when(pl.col("status").is_null()).then(pl.lit("no_face"))
        .otherwise(pl.col("status").replace_strict(FACE_STATUS_REASON, default=None))
    )
    out = joined.with_columns(reason=reason).with_columns(
        # image sources give a box for every face they write; video frames never have one
        still=pl.col("box_x0").is_not_null(),
        status=pl.when(pl.col("reason").is_null()).then(pl.lit("written")).otherwise(pl.lit("dropped")),
        key=pl.when(pl.col("reason").is_null()).then(
            pl.concat_str([pl.col("split"), pl.col("source"), pl.col("video"),
                           pl.col("frame").cast(pl.String).str.zfill(6)], separator="/")),
    )
    if out.height != manifest.height:
        raise AccountingError(f"accounting: {manifest.height} manifest rows became {out.height}")
    return out


def expected_rows(manifest: pl.DataFrame, faces: pl.DataFrame) -> pl.DataFrame:
    """Accounting rows each (source, split) must have, counted from the inputs alone: one per
    annotated manifest row, and per usable test video its frames in the faces tables (at least 1)."""
    frames = faces.group_by("source", "video").agg(pl.len().alias("_n"))
    per_row = (manifest.join(frames, on=["source", "video"], how="left")
               .select("source", "split", n=pl.when((pl.col("frame") == WHOLE_VIDEO) & pl.col("drop").is_null())
                       .then(pl.max_horizontal(pl.col("_n").fill_null(1), 1)).otherwise(1)))
    return per_row.group_by("source", "split").agg(pl.col("n").sum().cast(pl.Int64))


def check_accounting(manifest: pl.DataFrame, faces: pl.DataFrame, rows: pl.DataFrame) -> None:
    """Raise :class:`AccountingError` unless every row has exactly one fate and, per (source,
    split), the accounting has as many rows as the manifest (with test videos expanded)."""
    problems = []
    want = expected_rows(manifest, faces)
    got = rows.group_by("source", "split").agg(pl.len().cast(pl.Int64).alias("got"))
    cmp = want.join(got, on=["source", "split"], how="full", coalesce=True).fill_null(0)
    for r in cmp.filter(pl.col("n") != pl.col("got")).sort("source", "split").iter_rows(named=True):
        problems.append(f"{r['source']}/{r['split']}: {r['n']} manifest rows, {r['got']} accounting rows")
    written = pl.col("status") == "written"
    bad = rows.filter(~((written & pl.col("reason").is_null() & pl.col("key").is_not_null())
                        | ((pl.col("status") == "dropped") & pl.col("reason").is_in(list(DROP_REASONS))
                           & pl.col("key").is_null())))
    if bad.height:
        r = bad.row(0, named=True)
        problems.append(f"{bad.height} rows without exactly one fate, e.g. {r['source']}/{r['video']} frame "
                        f"{r['frame']}: status {r['status']!r}, reason {r['reason']!r}")
    keys = rows.filter(written)["key"]
    if not keys.is_unique().all():
        problems.append(f"{keys.len() - keys.n_unique()} repeated sample keys")
    if problems:
        raise AccountingError("accounting does not add up: " + "; ".join(problems))


def duplicates(manifest: pl.DataFrame) -> pl.DataFrame:
    """Mark repeated (split, source, video, frame) rows: the first is kept, others dropped."""
    dup = manifest.select(pl.struct("split", "source", "video", "frame").is_first_distinct().not_())
    return manifest.with_columns(
        drop=pl.when(dup.to_series() & pl.col("drop").is_null()).then(pl.lit("duplicate")).otherwise(pl.col("drop")))


def write_shards(manifests: list[str], faces_tables: list[str], out_dir: str, accounting_path: str,
                 samples_per_shard: int = 1000, seed: int = 0) -> pl.DataFrame:
    manifest = pl.concat([read_table(p, MANIFEST) for p in manifests]) if manifests else pl.DataFrame(schema=MANIFEST)
    manifest = duplicates(manifest)
    faces = load_faces(faces_tables)
    rows = account(manifest, faces)
    check_accounting(manifest, faces, rows)
    written = rows.filter(pl.col("status") == "written")
    n_members = 0
    # shuffle across videos and sources, deterministically, per split
    labels = []
    # the accounting is written before the shard directory is committed, and renamed into place
    # after it: a failed write (a full disk) leaves the shards, labels and accounting of the last
    # run, or no output at all, never a half-written one
    with atomic_path(accounting_path) as accounting_tmp, atomic_dir(out_dir) as tmp:
        tars: dict[str, tarfile.TarFile] = {}
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            for split in sorted(written["split"].unique().to_list()):
                part = written.filter(pl.col("split") == split).sort("key").sample(
                    fraction=1.0, shuffle=True, seed=seed)
                part = part.with_columns(
                    shard=pl.format("{}/shard-{}.tar", pl.lit(split),
                                    (pl.int_range(pl.len()) // samples_per_shard).cast(pl.String).str.zfill(5)))
                (Path(tmp) / split).mkdir(parents=True, exist_ok=True)
                for shard_name, group in part.group_by("shard", maintain_order=True):
                    with tarfile.open(Path(tmp) / shard_name[0], "w", format=tarfile.PAX_FORMAT) as out:
                        for key, member, tar_path in group.select("key", "member", "tar").iter_rows():
                            if tar_path not in tars:
                                tars[tar_path] = tarfile.open(tar_path, "r")
                                members[tar_path] = {safe_member_name(m.name, tar_path): m
                                                     for m in tars[tar_path].getmembers()}
                            info = members[tar_path].get(safe_member_name(member, tar_path))
                            if info is None:
                                raise FileNotFoundError(f"{tar_path}: crop {member!r} listed in its table is missing")
                            if not info.isfile():  # a link would be resolved inside the archive
                                raise ValueError(f"{tar_path}: crop {member!r} is not a regular file")
                            data = tars[tar_path].extractfile(info).read()
                            new = tarfile.TarInfo(f"{key}.jpg")
                            new.size, new.mtime, new.mode = len(data), 0, 0o644
                            out.addfile(new, io.BytesIO(data))
                            n_members += 1
                labels.append(part)
        finally:
            for t in tars.values():
                t.close()
        label_table = pl.concat(labels) if labels else pl.DataFrame(schema=LABELS)
        if not (n_members == label_table.height == written.height):
            raise AccountingError(f"{written.height} samples to write, {n_members} written to shards, "
                                  f"{label_table.height} in labels.parquet")
        write_table(label_table, Path(tmp) / "labels.parquet", LABELS)
        write_table(rows, accounting_tmp, ACCOUNTING)
    return rows


def accounting_summary(rows: pl.DataFrame) -> pl.DataFrame:
    """Counts per source, split and fate; the fates of a (source, split) add up to its rows."""
    return (
        rows.with_columns(fate=pl.coalesce(pl.col("reason"), pl.col("status")))
        .pivot(on="fate", index=["source", "split"], values="frame", aggregate_function="len")
        .fill_null(0)
        .with_columns(total=pl.sum_horizontal(pl.exclude("source", "split")))
        .sort("source", "split")
    )


def nothing_written(rows: pl.DataFrame) -> list[tuple[str, str]]:
    """("source", name) and ("split", name) of the sources and splits with rows but no written sample."""
    written = rows.filter(pl.col("status") == "written")
    return [(what, name) for what in ("source", "split")
            for name in sorted(set(rows[what].to_list()) - set(written[what].to_list()))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferflow.shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", nargs="+", required=True)
    parser.add_argument("--faces", nargs="*", default=[], help="FACES tables <faces>/<source>/<unit>.parquet (tar beside)")
    parser.add_argument("--out", required=True, help="shard directory")
    parser.add_argument("--accounting", required=True)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summary", help="also write the printed accounting table to this text file")
    args = parser.parse_args(argv)
    try:
        rows = write_shards(args.manifest, args.faces, args.out, args.accounting, args.samples_per_shard, args.seed)
    except AccountingError as exc:
        print(f"write_shards: {exc}", file=sys.stderr)
        return 1
    with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=200, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True):
        text = ("accounting: every annotated frame or image, written to a shard or dropped with a reason\n"
                + ("(split test: every decoded frame of the test videos, which have no labels)\n"
                   if (rows["split"] == "test").any() else "")
                + f"{accounting_summary(rows)}\n"
                + "".join(f"warning: {what} {name!r}: no sample written (every row dropped, see the reasons above)\n"
                          for what, name in nothing_written(rows)))
    print(text)
    if args.summary:
        write_text(args.summary, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
