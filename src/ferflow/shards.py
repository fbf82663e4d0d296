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
are not annotated frames: the summary counts them in their own ``test`` split. Per task (EXPR, VA)
as well: annotated lines (manifest rows with a status for the task) == labels written + labels
dropped with a reason (``expr_fate`` / ``va_fate`` of the accounting); a label is ``written``
exactly where the written sample carries it, and labels.parquet holds exactly those.

The end-of-run summary (printed, and ``--summary``) has both tables and names every video or image
dropped whole, every annotation file with invalid lines (first lines, with numbers), every
header-only annotation file and every video whose people are in two splits (from the index's
``--issues`` tables).

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
import os
import sys
import tarfile
from pathlib import Path

if __name__ == "__main__":
    # The stage's own process only (before polars loads): polars' allocator (jemalloc) returns
    # freed pages at once instead of keeping them for reuse. The stage frees large temporary
    # tables as it goes; bench/scale.py measured the peak resident memory 17% lower with this at
    # 160k frames (221 vs 266 MiB), which keeps full ABAW3 under a 4 GiB job.
    os.environ.setdefault("_RJEM_MALLOC_CONF", "background_thread:false,dirty_decay_ms:0,muzzy_decay_ms:0")

import polars as pl  # noqa: E402

from .atomic import atomic_dir, atomic_path, write_text  # noqa: E402
from .inputcheck import error, fail, prog_of, require_inputs  # noqa: E402
from .schemas import (ACCOUNTING, DROP_REASONS, FACES, ISSUES, LABEL_USABLE, LABELS, MANIFEST, TASKS, WHOLE_VIDEO,  # noqa: E402
                      SchemaError, read_table, write_table)


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


#: FACES columns the shards stage does not use (left out when read: memory at full size, bench/scale.py).
FACES_UNUSED = ("x0", "y0", "x1", "y1", "score")
#: MANIFEST columns the shards stage does not use.
MANIFEST_UNUSED = ("person", "path")


def load_faces(paths: list[str]) -> pl.DataFrame:
    """All FACES tables with their source and unit (from ``<faces>/<source>/<unit>.parquet``),
    without the boxes and scores (:data:`FACES_UNUSED`)."""
    frames = []
    for p in paths:
        p = Path(p)
        t = read_table(p, FACES).drop(*FACES_UNUSED).with_columns(
            source=pl.lit(p.parent.name), unit=pl.lit(p.stem),
            tar=pl.lit(str(p.with_suffix(".tar"))).cast(pl.Categorical))  # one path per unit, not per row
        frames.append(t)
    if not frames:
        return pl.DataFrame(schema={**{c: t for c, t in FACES.items() if c not in FACES_UNUSED},
                                    "source": pl.String, "unit": pl.String, "tar": pl.Categorical})
    faces = pl.concat(frames)
    dup = faces.filter(pl.struct("source", "video", "frame").is_duplicated())
    if dup.height:
        r = dup.row(0, named=True)
        raise AccountingError(f"faces tables: {dup.height} rows repeat a (source, video, frame), e.g. "
                              f"{r['source']}/{r['video']} frame {r['frame']} in {r['unit']}.parquet")
    return faces


def check_faces_units(manifest: pl.DataFrame, faces_tables: list[str]) -> None:
    """Every unit with a usable manifest row has a faces table. A unit's table is ``<faces>/<source>/<unit>.parquet``: its parent folder names
    the source. Without this check a table in a differently named folder (or a forgotten one) would
    make every frame of its unit look ``unreadable_video``.

    Raises :class:`AccountingError` naming the first unit without a table. (A table of a unit with
    no usable row, e.g. a header-only annotation file's video, is allowed.)"""
    have = {(Path(p).parent.name, Path(p).stem): str(p) for p in faces_tables}
    need = manifest.filter(pl.col("drop").is_null()).select("source", "unit").unique().sort("source", "unit")
    missing = [(s, u) for s, u in need.iter_rows() if (s, u) not in have]
    if missing:
        s, u = missing[0]
        raise AccountingError(f"no faces table for {len(missing)} unit(s) with usable frames, e.g. {s}/{u}: "
                              f"expected <faces>/{s}/{u}.parquet (its folder names the source)")


def expand_whole_videos(manifest: pl.DataFrame, faces: pl.DataFrame) -> pl.DataFrame:
    """Replace each usable WHOLE_VIDEO row by one row per frame its video's faces table lists
    (every decoded frame); a WHOLE_VIDEO row without any such frame stays as it is."""
    whole = (pl.col("frame") == WHOLE_VIDEO) & pl.col("drop").is_null()
    placeholders = manifest.filter(whole)
    if not placeholders.height:
        return manifest
    frames = faces.select("source", "video", pl.col("frame").alias("_frame"))
    expanded = (placeholders.join(frames, on=["source", "video"], how="inner")
                .with_columns(frame=pl.col("_frame")).select(manifest.columns).sort("source", "video", "frame"))
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
    # per task: no line (null), the label's own reason, else the frame's fate
    out = out.with_columns(**{
        fate: pl.when(pl.col(status).is_null()).then(None)
        .when(pl.col(status) != LABEL_USABLE).then(pl.col(status))
        .when(pl.col("reason").is_not_null()).then(pl.col("reason"))
        .otherwise(pl.lit("written"))
        for status, fate, _ in TASKS.values()})
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
    problems += _label_problems(manifest, rows)
    if problems:
        raise AccountingError("accounting does not add up: " + "; ".join(problems))


def _label_problems(manifest: pl.DataFrame, rows: pl.DataFrame) -> list[str]:
    """Per task: the annotated lines of the manifest (rows with a status for the task) == the
    accounting rows with a fate for it, per (source, split); every fate is ``written`` or a drop
    reason; ``written`` exactly where the sample is written with that task's label."""
    problems = []
    for task, (status, fate, columns) in TASKS.items():
        lines = manifest.filter(pl.col(status).is_not_null()).group_by("source", "split").agg(pl.len().alias("lines"))
        fates = rows.filter(pl.col(fate).is_not_null()).group_by("source", "split").agg(pl.len().alias("fates"))
        cmp = lines.join(fates, on=["source", "split"], how="full", coalesce=True).fill_null(0)
        for r in cmp.filter(pl.col("lines") != pl.col("fates")).sort("source", "split").iter_rows(named=True):
            problems.append(f"{r['source']}/{r['split']} {task}: {r['lines']} annotated lines, {r['fates']} labels "
                            "written or dropped")
        unknown = rows.filter(pl.col(fate).is_not_null() & ~pl.col(fate).is_in(["written", *DROP_REASONS]))
        if unknown.height:
            problems.append(f"{task}: {unknown.height} labels with an unknown fate, e.g. {unknown[fate][0]!r}")
        labelled = pl.all_horizontal([pl.col(c).is_not_null() for c in columns]) & (pl.col("status") == "written")
        wrong = rows.filter(labelled != (pl.col(fate) == "written").fill_null(False))
        if wrong.height:
            r = wrong.row(0, named=True)
            problems.append(f"{task}: {wrong.height} labels whose fate and written value disagree, e.g. "
                            f"{r['source']}/{r['video']} frame {r['frame']}: {fate} {r[fate]!r}, "
                            + ", ".join(f"{c} {r[c]!r}" for c in columns))
    return problems


def label_accounting(rows: pl.DataFrame) -> pl.DataFrame:
    """Per source, split and task: annotated ``lines`` = ``written`` + the labels dropped for each
    reason (one column per reason met); test frames (no labels) have no line."""
    parts = [rows.filter(pl.col(fate).is_not_null()).select("source", "split", pl.lit(task).alias("task"),
                                                             pl.col(fate).alias("fate"))
             for task, (_, fate, _) in TASKS.items()]
    long = pl.concat(parts)
    if not long.height:
        return pl.DataFrame(schema={"source": pl.String, "split": pl.String, "task": pl.String, "lines": pl.UInt32})
    wide = long.pivot(on="fate", index=["source", "split", "task"], values="fate", aggregate_function="len").fill_null(0)
    if "written" not in wide.columns:
        wide = wide.with_columns(written=pl.lit(0, pl.UInt32))
    reasons = [r for r in DROP_REASONS if r in wide.columns]
    return (wide.with_columns(lines=pl.sum_horizontal("written", *reasons))
            .select("source", "split", "task", "lines", "written", *reasons).sort("source", "split", "task"))


def duplicates(manifest: pl.DataFrame) -> pl.DataFrame:
    """Mark repeated (split, source, video, frame) rows: the first is kept, others dropped."""
    dup = manifest.select(pl.struct("split", "source", "video", "frame").is_first_distinct().not_())
    return manifest.with_columns(
        drop=pl.when(dup.to_series() & pl.col("drop").is_null()).then(pl.lit("duplicate")).otherwise(pl.col("drop")))


def crop_index(tar_paths: list[str]) -> pl.DataFrame:
    """Where each member of the units' tars lies: one row per member with ``tar``, ``member``,
    ``_offset`` and ``_size`` (bytes of its data in the file) and ``_regular`` (a regular file, not
    a link), read from the tar headers alone (no crop is read; one tar's headers in memory at a
    time). A name that repeats in a tar is its last member's (as extraction would give it). Raises
    ValueError naming the tar for an unsafe member name (:func:`safe_member_name`)."""
    parts = []
    for path in tar_paths:
        names, offsets, sizes, regular = [], [], [], []
        with tarfile.open(path, "r") as t:
            for m in t:
                names.append(safe_member_name(m.name, path))
                offsets.append(m.offset_data)
                sizes.append(m.size)
                regular.append(m.isfile())
            t.members = []
        parts.append(pl.DataFrame({"member": names, "_offset": offsets, "_size": sizes, "_regular": regular},
                                  schema={"member": pl.String, "_offset": pl.Int64, "_size": pl.Int64,
                                          "_regular": pl.Boolean})
                     .unique("member", keep="last", maintain_order=True)
                     .with_columns(tar=pl.lit(path).cast(pl.Categorical)))
    if not parts:
        return pl.DataFrame(schema={"member": pl.String, "_offset": pl.Int64, "_size": pl.Int64,
                                    "_regular": pl.Boolean, "tar": pl.Categorical})
    return pl.concat(parts)


def check_crops(written: pl.DataFrame) -> None:
    """Every written row's crop is a regular member of its tar (``written`` joined with
    :func:`crop_index`). Raises FileNotFoundError (missing) or ValueError (a link or another
    non-file member), naming the tar and the member."""
    missing = written.filter(pl.col("_offset").is_null())
    if missing.height:
        r = missing.row(0, named=True)
        raise FileNotFoundError(f"{r['tar']}: crop {r['member']!r} listed in its table is missing"
                                + (f" ({missing.height} crops in all)" if missing.height > 1 else ""))
    odd = written.filter(~pl.col("_regular"))
    if odd.height:  # a link would be resolved inside the archive
        r = odd.row(0, named=True)
        raise ValueError(f"{r['tar']}: crop {r['member']!r} is not a regular file")


class CropReader:
    """Reads crops out of the units' tars by offset (``os.pread``), keeping at most ``max_open``
    files open (least recently used closed first): the samples are shuffled across every unit, so
    a crop comes from any of hundreds of tars."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self.fds: dict[str, int] = {}

    def read(self, path: str, offset: int, size: int) -> bytes:
        fd = self.fds.pop(path, None)
        if fd is None:
            if len(self.fds) >= self.max_open:
                os.close(self.fds.pop(next(iter(self.fds))))
            fd = os.open(path, os.O_RDONLY)
        self.fds[path] = fd  # most recently used last
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ValueError(f"{path}: crop at byte {offset} is cut short ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> "CropReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_shards(manifests: list[str], faces_tables: list[str], out_dir: str, accounting_path: str,
                 samples_per_shard: int = 1000, seed: int = 0) -> pl.DataFrame:
    """Write the shards, ``labels.parquet`` and the accounting; returns the accounting rows.

    Raises :class:`AccountingError`, before anything is written, when frames or labels (per task)
    do not add up, and after the shards are written (nothing is renamed into place) when the shard
    members or the labels of ``labels.parquet`` are not the written rows'."""
    manifest = (pl.concat([read_table(p, MANIFEST).drop(*MANIFEST_UNUSED) for p in manifests]) if manifests
                else pl.DataFrame(schema=MANIFEST).drop(*MANIFEST_UNUSED))
    manifest = duplicates(manifest)
    check_faces_units(manifest, faces_tables)
    faces = load_faces(faces_tables)
    rows = account(manifest, faces)
    check_accounting(manifest, faces, rows)
    # memory (bench/scale.py): from here on only the written samples' labels and crops, and the
    # accounting's own columns, are kept
    del manifest, faces
    written = rows.filter(pl.col("status") == "written").select(
        *[c for c in LABELS if c != "shard"], "member", "tar")
    rows = rows.select(list(ACCOUNTING))
    n_members = 0
    # shuffle across videos and sources, deterministically, per split
    labels = []
    # where each crop lies in its unit's tar, from the tar headers (checked before any shard is written)
    crops = crop_index(written["tar"].unique().sort().to_list())
    written = written.join(crops, on=["tar", "member"], how="left", maintain_order="left")
    del crops
    check_crops(written)
    # the accounting is written before the shard directory is committed, and renamed into place
    # after it: a failed write (a full disk) leaves the shards, labels and accounting of the last
    # run, or no output at all, never a half-written one
    with atomic_path(accounting_path) as accounting_tmp, atomic_dir(out_dir) as tmp, CropReader() as reader:
        for split in sorted(written["split"].unique().to_list()):
            part = written.filter(pl.col("split") == split).sort("key").sample(
                fraction=1.0, shuffle=True, seed=seed)
            part = part.with_columns(
                shard=pl.format("{}/shard-{}.tar", pl.lit(split),
                                (pl.int_range(pl.len()) // samples_per_shard).cast(pl.String).str.zfill(5)))
            (Path(tmp) / split).mkdir(parents=True, exist_ok=True)
            # one shard at a time, one crop at a time: memory does not grow with the number of samples
            for shard_name, group in part.group_by("shard", maintain_order=True):
                with tarfile.open(Path(tmp) / shard_name[0], "w", format=tarfile.PAX_FORMAT) as out:
                    for key, tar_path, offset, size in group.select("key", "tar", "_offset", "_size").iter_rows():
                        data = reader.read(tar_path, offset, size)
                        new = tarfile.TarInfo(f"{key}.jpg")
                        new.size, new.mtime, new.mode = len(data), 0, 0o644
                        out.addfile(new, io.BytesIO(data))
                        n_members += 1
            labels.append(part.drop("_offset", "_size", "_regular", "member", "tar"))
        label_table = pl.concat(labels) if labels else pl.DataFrame(schema=LABELS)
        if not (n_members == label_table.height == written.height):
            raise AccountingError(f"{written.height} samples to write, {n_members} written to shards, "
                                  f"{label_table.height} in labels.parquet")
        for task, (_, fate, columns) in TASKS.items():
            in_labels = label_table.filter(pl.all_horizontal([pl.col(c).is_not_null() for c in columns])).height
            if in_labels != rows.filter(pl.col(fate) == "written").height:
                raise AccountingError(f"{task}: {rows.filter(pl.col(fate) == 'written').height} labels written, "
                                      f"{in_labels} in labels.parquet")
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


#: Reasons for which a whole video or image is dropped (every annotated frame or face of it).
WHOLE_UNIT_REASONS = ("no_video", "unreadable_video", "unreadable_image")
LISTED_LINES = 3  # invalid lines quoted per file in the summary


def load_issues(paths: list[str]) -> pl.DataFrame:
    """The ISSUES tables the index stage wrote (one per source)."""
    frames = [read_table(p, ISSUES) for p in paths]
    return pl.concat(frames) if frames else pl.DataFrame(schema=ISSUES)


def dropped_whole(rows: pl.DataFrame) -> pl.DataFrame:
    """(source, split, video, reason, n) of each video or image all of whose rows were dropped for
    one of :data:`WHOLE_UNIT_REASONS` (a missing or unreadable file)."""
    per = rows.group_by("source", "split", "video").agg(
        pl.col("reason").unique().alias("reasons"), pl.len().alias("n"), (pl.col("status") == "written").any().alias("w"))
    per = per.filter(~pl.col("w") & (pl.col("reasons").list.len() == 1))
    per = per.with_columns(reason=pl.col("reasons").list.first())
    return per.filter(pl.col("reason").is_in(list(WHOLE_UNIT_REASONS))).select(
        "source", "split", "video", "reason", "n").sort("source", "split", "video")


def summary_text(rows: pl.DataFrame, issues: pl.DataFrame | None = None) -> str:
    """The end-of-run summary: frames and labels (per task) by fate, sources and splits without a
    sample, every video and image dropped whole, every annotation file with invalid values (its
    first lines, with line numbers), every header-only annotation file, and warnings."""
    issues = pl.DataFrame(schema=ISSUES) if issues is None else issues
    out = []
    with pl.Config(tbl_rows=1000, tbl_cols=30, tbl_width_chars=250, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True):
        out.append("accounting: every annotated frame or image, written to a shard or dropped with a reason\n"
                   + ("(split test: every decoded frame of the test videos, which have no labels)\n"
                      if (rows["split"] == "test").any() else "")
                   + f"{accounting_summary(rows)}\n")
        out.append("labels per task: annotated lines = labels written + labels dropped for each reason\n"
                   f"{label_accounting(rows)}\n")
    out += [f"warning: {what} {name!r}: no sample written (every row dropped, see the reasons above)\n"
            for what, name in nothing_written(rows)]
    whole = dropped_whole(rows)
    if whole.height:
        out.append(f"dropped whole ({whole.height} videos or images: every annotated frame or face of each):\n")
        out += [f"  {src}/{split}: {video}: {reason} ({n} {'frames' if n != 1 else 'frame'})\n"
                for src, split, video, reason, n in whole.iter_rows()]
    unusable = issues.filter(pl.col("reason").is_in(["no_video", "unreadable_video"]))
    if unusable.height:
        out.append("unusable videos found by the index (on_unusable_input: skip):\n")
        out += [f"  {r['source']}: {r['text']}\n" for r in unusable.unique(["source", "file", "text"], maintain_order=True)
                .iter_rows(named=True)]
    invalid = issues.filter(pl.col("reason") == "invalid_value")
    if invalid.height:
        files = invalid.group_by("source", "file", maintain_order=True).agg(pl.len().alias("n"), pl.col("line"), pl.col("text"))
        out.append(f"files with invalid values ({invalid.height} lines or items in {files.height} files; each "
                   "label counted as invalid_value):\n")
        for src, file, n, lines, texts in files.iter_rows():
            shown = "; ".join(f"line {ln}: {t!r}" if ln is not None else f"{t}"
                              for ln, t in list(zip(lines, texts))[:LISTED_LINES])
            more = f"; ... ({n - LISTED_LINES} more)" if n > LISTED_LINES else ""
            out.append(f"  {src}: {file}: {n} invalid: {shown}{more}\n")
    header_only = issues.filter(pl.col("reason") == "header_only")
    if header_only.height:
        out.append(f"annotation files with a header and no line ({header_only.height}; no frame annotated "
                   "for their task):\n")
        out += [f"  {r['source']}/{r['split']} {r['task']}: {r['file']}\n" for r in header_only.iter_rows(named=True)]
    out += [f"warning: {r['source']}: {r['text']}\n"
            for r in issues.filter(pl.col("reason") == "shared_video").iter_rows(named=True)]
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_of("shards"), description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", nargs="+", required=True, help="MANIFEST parquet of each source (ferflow.index)")
    parser.add_argument("--faces", nargs="*", default=[], help="FACES tables <faces>/<source>/<unit>.parquet (tar beside)")
    parser.add_argument("--issues", nargs="*", default=[], help="ISSUES tables of the index stage, for the summary")
    parser.add_argument("--out", required=True, help="shard directory")
    parser.add_argument("--accounting", required=True,
                        help="ACCOUNTING parquet to write: one row per annotated frame, written or dropped with a reason")
    parser.add_argument("--samples-per-shard", type=int, default=1000,
                        help="samples per shard tar, at least 1 (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle across videos and sources (default: 0)")
    parser.add_argument("--summary", help="also write the printed accounting summary to this text file")
    args = parser.parse_args(argv)
    require_inputs(parser.prog, [("--manifest", m, "file") for m in args.manifest]
                   + [("--faces", f, "file") for f in args.faces] + [("--issues", f, "file") for f in args.issues])
    if args.samples_per_shard < 1:
        fail(parser.prog, f"--samples-per-shard {args.samples_per_shard}: must be at least 1")
    try:
        rows = write_shards(args.manifest, args.faces, args.out, args.accounting, args.samples_per_shard, args.seed)
    except (AccountingError, SchemaError) as exc:  # inputs that do not add up, or are not the tables they should be
        error(parser.prog, str(exc))
        return 1
    text = summary_text(rows, load_issues(args.issues))
    print(text)
    if args.summary:
        write_text(args.summary, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
