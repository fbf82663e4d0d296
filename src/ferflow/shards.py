"""Stage ``write_shards``: manifests + face crops -> WebDataset shards, labels and accounting.

Every manifest row ends in exactly one place: written to a shard, or dropped with a reason. The
totals are checked before anything is written, and a summary table is printed.

Shards: ``<out>/<split>/shard-{i:05d}.tar``, samples shuffled across videos and sources with a
seed, ``samples_per_shard`` per shard (the last one smaller), members ``<key>.jpg`` only.
Labels: ``<out>/labels.parquet`` (schema LABELS), the single source of truth for labels.

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

from .atomic import atomic_dir, write_text
from .schemas import ACCOUNTING, FACES, LABELS, MANIFEST, read_table, write_table

FACE_STATUS_REASON = {"missing": "no_face", "unreadable": "unreadable_image", "bad_box": "bad_box"}


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
    return pl.concat(frames)


def account(manifest: pl.DataFrame, faces: pl.DataFrame) -> pl.DataFrame:
    """Join manifest rows to their crops and give each row its fate (status, reason, key)."""
    # decoded frame count per (source, unit); a unit with an empty table was not readable
    frames_per_unit = faces.group_by("source", "unit").agg(pl.col("n_frames").max())
    joined = (
        manifest.join(faces.select("source", "video", "frame", "status", "member", "tar"),
                      on=["source", "video", "frame"], how="left")
        .join(frames_per_unit, on=["source", "unit"], how="left")
    )
    reason = (
        pl.when(pl.col("drop").is_not_null()).then(pl.col("drop"))
        .when(pl.col("n_frames").is_null()).then(pl.lit("unreadable_video"))
        .when(pl.col("status").is_null() & (pl.col("frame") >= pl.col("n_frames"))).then(pl.lit("beyond_video_end"))
        .when(pl.col("status").is_null()).then(pl.lit("no_face"))
        .otherwise(pl.col("status").replace_strict(FACE_STATUS_REASON, default=None))
    )
    out = joined.with_columns(reason=reason).with_columns(
        status=pl.when(pl.col("reason").is_null()).then(pl.lit("written")).otherwise(pl.lit("dropped")),
        key=pl.when(pl.col("reason").is_null()).then(
            pl.concat_str([pl.col("split"), pl.col("source"), pl.col("video"),
                           pl.col("frame").cast(pl.String).str.zfill(6)], separator="/")),
    )
    if out.height != manifest.height:
        raise AssertionError(f"accounting: {manifest.height} manifest rows became {out.height}")
    return out


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
    written = rows.filter(pl.col("status") == "written")
    # shuffle across videos and sources, deterministically, per split
    labels = []
    with atomic_dir(out_dir) as tmp:
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
                                members[tar_path] = {m.name: m for m in tars[tar_path].getmembers()}
                            info = members[tar_path].get(safe_member_name(member, tar_path))
                            if info is None:
                                raise FileNotFoundError(f"{tar_path}: crop {member!r} listed in its table is missing")
                            data = tars[tar_path].extractfile(info).read()
                            new = tarfile.TarInfo(f"{key}.jpg")
                            new.size, new.mtime, new.mode = len(data), 0, 0o644
                            out.addfile(new, io.BytesIO(data))
                labels.append(part)
        finally:
            for t in tars.values():
                t.close()
        label_table = pl.concat(labels) if labels else pl.DataFrame(schema=LABELS)
        write_table(label_table, Path(tmp) / "labels.parquet", LABELS)
    write_table(rows, accounting_path, ACCOUNTING)
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
    rows = write_shards(args.manifest, args.faces, args.out, args.accounting, args.samples_per_shard, args.seed)
    with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=200, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True):
        text = ("accounting: every annotated frame or image, written to a shard or dropped with a reason\n"
                f"{accounting_summary(rows)}\n")
    print(text)
    if args.summary:
        write_text(args.summary, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
