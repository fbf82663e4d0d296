"""File contracts between stages: the columns and dtypes of every parquet the pipeline writes.

Each table is written once through :func:`write_table` and read through :func:`read_table`, which
check the columns and dtypes and name the file when they do not match.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from .atomic import atomic_path

Schema = dict[str, pl.DataType]

#: ``frame`` of a manifest row that stands for every decoded frame of its video: a video of a test
#: list, whose frame count is only known once decoded. The shard stage expands it into one row per
#: decoded frame (written, or dropped as no_face); it stays one row when the video is unusable.
WHOLE_VIDEO = -1

#: One row per annotated frame (videos) or annotated face of an image (image datasets), plus one
#: WHOLE_VIDEO row per test video.
MANIFEST: Schema = {
    "source": pl.String,  # source name from config
    "split": pl.String,  # train | validation | test
    "unit": pl.String,  # extraction unit: video file stem, or chunk id for image sources
    "video": pl.String,  # annotation name (e.g. "10-60-1280x720_left"); images: path relative to the source
    "frame": pl.Int64,  # 0-based frame index in the video (WHOLE_VIDEO: every frame); images: face number
    "person": pl.String,  # "", "left" or "right"
    "path": pl.String,  # video file or image file
    "expression": pl.Int8,  # ABAW class index, null when absent/invalid
    "valence": pl.Float32,  # null when absent/invalid
    "arousal": pl.Float32,
    "box_x0": pl.Float32,  # given face box in pixels (image datasets), else null
    "box_y0": pl.Float32,
    "box_x1": pl.Float32,
    "box_y1": pl.Float32,
    "drop": pl.String,  # reason found while indexing (unannotated, invalid_value, ...), else null
    # per task, the fate of this row's label as the index found it: null when the row has no line
    # (value) for the task, LABEL_USABLE when its value is usable, else the label's drop reason
    # (unannotated, invalid_value, unmapped_label, no_consensus); see TASKS
    "expr_status": pl.String,
    "va_status": pl.String,
}

#: The label tasks and the manifest/accounting columns of each: (status column, fate column, label
#: columns). Labels are accounted per task: an annotated line of a task is written (its label is in
#: a written sample) or dropped with a reason, whatever happens to the other task of the frame.
TASKS = {"expr": ("expr_status", "expr_fate", ("expression",)),
         "va": ("va_status", "va_fate", ("valence", "arousal"))}
#: MANIFEST.{expr,va}_status of a usable label.
LABEL_USABLE = "usable"

#: One row per (person, frame) of an extraction unit.
FACES: Schema = {
    "video": pl.String,  # annotation name, as in MANIFEST.video
    "frame": pl.Int64,
    "status": pl.String,  # detected | interpolated | provided | missing | unreadable | bad_box | undecodable (video frame)
    "x0": pl.Float32,
    "y0": pl.Float32,
    "x1": pl.Float32,
    "y1": pl.Float32,
    "score": pl.Float32,
    "member": pl.String,  # name of the crop inside the unit's tar, null when no crop
    "n_frames": pl.Int64,  # frames of the video: the container's count, not fewer when frames fail to decode (images: rows of the chunk)
}

#: The five landmarks of a face, in image order as RetinaFace gives them ("left" = image left).
LANDMARK_POINTS = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")

#: Per-frame details the extraction writes after FACES' columns, in the same file. Kept apart from
#: FACES so that readers of FACES (shards, evaluate) and tables written without them stay valid;
#: read ``<unit>.parquet`` with FACES_FULL to get them.
FACE_DETAILS: Schema = {
    # landmarks in frame pixels (interpolated like the box); null without landmarks (Haar, given
    # boxes, cropped_aligned frames) and without a face
    **{f"{p}_{c}": pl.Float32 for p in LANDMARK_POINTS for c in "xy"},
    "crop": pl.String,  # square | aligned | cropped_aligned (the dataset's own crop); null when no crop
    "detector": pl.String,  # settings used, as sorted JSON: {"detector": {...}, "extract": {...}}; same on every row
}

#: Everything ``ferflow.extract`` writes to ``<unit>.parquet``.
FACES_FULL: Schema = {**FACES, **FACE_DETAILS}

#: One row per sample written to a shard; the single source of truth for labels.
LABELS: Schema = {
    "key": pl.String,  # WebDataset __key__, unique
    "split": pl.String,
    "source": pl.String,
    "video": pl.String,
    "frame": pl.Int64,
    "expression": pl.Int8,
    "valence": pl.Float32,
    "arousal": pl.Float32,
    "shard": pl.String,  # shard path relative to the shard directory
    "still": pl.Boolean,  # a face of a still image (image sources): never subsampled by frame_step
}

#: One row per manifest row: where it ended, with its labels (the evaluation's ground truth). A
#: WHOLE_VIDEO row (test video) becomes one row per decoded frame (no labels), or stays one row
#: (frame WHOLE_VIDEO) when its video is missing or unreadable.
ACCOUNTING: Schema = {
    "source": pl.String,
    "split": pl.String,
    "video": pl.String,
    "frame": pl.Int64,
    "expression": pl.Int8,
    "valence": pl.Float32,
    "arousal": pl.Float32,
    "status": pl.String,  # written | dropped
    "reason": pl.String,  # null when written, else one of DROP_REASONS
    "key": pl.String,  # shard sample key when written, else null
    # per task (see TASKS): null when the row has no line for the task, "written" when its label is
    # in a written sample, else why the label was lost: its own reason (MANIFEST.*_status) or the
    # frame's
    "expr_fate": pl.String,
    "va_fate": pl.String,
}

#: What the index stage found about whole files and lines, for the end-of-run summary (one row per
#: finding): an annotation file without any line, an unusable video, a line with an invalid value, a
#: video shared by people of two splits. ``line`` is 1-based (null: the whole file).
ISSUES: Schema = {
    "source": pl.String,
    "split": pl.String,
    "task": pl.String,  # expr | va | null (not about one task)
    "file": pl.String,
    "line": pl.Int64,
    "reason": pl.String,  # a drop reason, or one of ISSUE_KINDS
    "text": pl.String,  # the line as read (clipped), or what is wrong with the file
}
#: Issue reasons that are not drop reasons: a header without lines, and a warning.
ISSUE_KINDS = ("header_only", "shared_video")

#: One row per predicted frame of one variant (or of the ensemble).
PREDICTIONS: Schema = {
    "split": pl.String,
    "source": pl.String,
    "video": pl.String,
    "frame": pl.Int64,
    **{f"p{i}": pl.Float32 for i in range(8)},  # class probabilities in ABAW order
    "valence": pl.Float32,
    "arousal": pl.Float32,
}

#: Width of the per-frame feature of a variant (the DAN's fused vector, ``model.FEAT_DIM``).
FEATURE_DIM = 512

#: One row per scored frame of a split (ACCOUNTING rows written, or dropped as no_face /
#: unreadable_frame) for one variant: the per-frame input of the temporal stage. Written by
#: ``ferflow.predict --features`` from the same forward pass as the PREDICTIONS. A frame without a
#: face crop has ``has_face`` false and null feature, probabilities and VA (never invented values).
FEATURES: Schema = {
    "split": pl.String,
    "source": pl.String,
    "video": pl.String,  # annotation name: one (video, person)
    "frame": pl.Int64,
    "has_face": pl.Boolean,
    "feature": pl.Array(pl.Float32, FEATURE_DIM),  # the fused vector that the fc/BN heads read
    **{f"p{i}": pl.Float32 for i in range(8)},  # the variant's softmax probabilities
    "valence": pl.Float32,
    "arousal": pl.Float32,
}

#: ``ferflow annotate``: one row per frame and tracked face of a video, and one row with a null
#: ``track`` (and null values) for every frame without a face: every decoded frame appears.
ANNOTATIONS: Schema = {
    "video": pl.String,  # the video file's name without its extension
    "frame": pl.Int64,  # 0-based decoded frame
    "time": pl.Float64,  # seconds: frame / the container's fps (null when it gives none)
    "track": pl.Int64,  # face track id, stable along the video; null: no face in this frame
    "status": pl.String,  # detected | interpolated (box between two detections of the track); null
    "x1": pl.Float32,  # face box in pixels of the frame
    "y1": pl.Float32,
    "x2": pl.Float32,
    "y2": pl.Float32,
    "score": pl.Float32,  # detection score (interpolated between detections)
    # ensemble class probabilities (soft vote, smoothed), one column per class named by the class
    "Neutral": pl.Float32,
    "Anger": pl.Float32,
    "Disgust": pl.Float32,
    "Fear": pl.Float32,
    "Happiness": pl.Float32,
    "Sadness": pl.Float32,
    "Surprise": pl.Float32,
    "Other": pl.Float32,
    "expression": pl.String,  # the class with the highest probability
    "valence": pl.Float32,  # in [-1, 1]
    "arousal": pl.Float32,
}

DROP_REASONS = (
    "unannotated",
    "no_video",
    "invalid_value",
    "unmapped_label",
    "beyond_video_end",
    "no_face",
    "unreadable_video",
    "unreadable_frame",
    "unreadable_image",
    "bad_box",
    "duplicate",
    "no_consensus",
)


class SchemaError(ValueError):
    pass


def conform(df: pl.DataFrame, schema: Schema, where: str) -> pl.DataFrame:
    """Select and cast ``df`` to ``schema``; missing columns are an error naming ``where``."""
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise SchemaError(f"{where}: missing columns {missing}; expected {list(schema)}")
    try:
        return df.select([pl.col(c).cast(t, strict=True) for c, t in schema.items()])
    except Exception as exc:  # polars raises several types for failed casts
        raise SchemaError(f"{where}: cannot cast to the expected dtypes: {exc}") from exc


def empty(schema: Schema) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def write_table(df: pl.DataFrame, path: str | os.PathLike, schema: Schema) -> None:
    """Check ``df`` against ``schema`` and write it atomically as parquet."""
    df = conform(df, schema, str(path))
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)


def read_table(path: str | os.PathLike, schema: Schema) -> pl.DataFrame:
    """Read a parquet written by :func:`write_table`, checking its columns and dtypes. Raises
    FileNotFoundError, or :class:`SchemaError` naming the file when it is not a parquet table or
    does not match ``schema``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such table")
    try:
        df = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SchemaError(f"{path}: not a readable parquet table ({reason})") from None
    wrong = {c: str(df.schema[c]) for c, t in schema.items() if c in df.columns and df.schema[c] != t}
    missing = [c for c in schema if c not in df.columns]
    if missing or wrong:
        raise SchemaError(f"{path}: table does not match its schema (missing {missing}, wrong dtypes {wrong})")
    return df.select(list(schema))
