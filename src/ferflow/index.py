"""Stage ``index``: read one source in its native layout and write its manifest.

One manifest row per annotated frame (videos) or annotated face of an image (image datasets), with
labels already mapped into the ABAW space. Rows that can never be used keep their place in the
manifest with a ``drop`` reason, so that the accounting can show where every annotated frame went.

Kinds (native layouts in ``docs/formats.md``):

- ``affwild2``: EXPR/VA txt files per video (two-person ``_left``/``_right`` files); a ``test_list``
  adds one placeholder row per test video (frame :data:`WHOLE_VIDEO`, split ``test``, no labels):
  the frame count is only known once the video is decoded, so the shard stage expands it into one
  row per decoded frame.
- ``affectnet``: the csv release; ``affectnet_npy``: the newer ``{train,val}_set/images`` +
  ``annotations/<id>_{exp,val,aro}.npy`` release (face crops: the box is the whole image).
- ``expw``: ``label/label.lst``. ``aihub``: per-emotion folders with JSON lists of three annotators'
  labels and boxes (``vote: majority | unanimous``; disagreement is dropped as ``no_consensus``).
- ``generic``: a csv or parquet of ``path``, optional box ``x0,y0,x1,y1`` (none: the image is the
  face), ``expression`` (ABAW name or index), ``valence``, ``arousal``, optional ``split``.

Images: ``video`` is the image's path relative to the source (:func:`layout.image_name`), ``frame``
the face's number in the image, so sample keys never change when images are added. The same face
listed twice in one split is kept once; the other rows are dropped as ``duplicate``.

Labels are accounted per task: each row's ``expr_status`` / ``va_status`` is null when the row has no
line (value) for the task, ``usable``, or why the label is dropped (``invalid_value``,
``unannotated``, ``unmapped_label``, ``no_consensus``), whatever becomes of the frame. Errors (the
message names the files): an unreadable annotation file, an annotated video or image in two splits
(:class:`layout.SplitLeakError`), and, unless ``--on-unusable-input skip``, every annotated video
that is missing or cannot be opened (:class:`UnusableInputError`). What the summary must name
(invalid lines with their numbers, header-only files, unusable videos, videos whose people are in
two splits) goes to ``--issues`` (schema ISSUES).

    python -m ferflow.index --source '{"name": "affwild2", "kind": "affwild2", "root": ...}' \
        --out results/manifest/affwild2.parquet --issues results/issues/affwild2.parquet
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl

from . import layout
from .inputcheck import error, fail, input_problem, json_option, prog_of
from .labels import (EXPR_HEADER, EXPR_UNANNOTATED, EXPRESSIONS, NUM_EXPRESSIONS, VA_HEADER, VA_INVALID_BELOW,
                     expression_index)
from .schemas import ISSUES, LABEL_USABLE, MANIFEST, TASKS, WHOLE_VIDEO, write_table

AFFECTNET_MAP = {"0": "Neutral", "1": "Happiness", "2": "Sadness", "3": "Surprise", "4": "Fear",
                 "5": "Disgust", "6": "Anger", "7": "Other"}
DEFAULT_LABEL_MAPS: dict[str, dict[str, str]] = {
    "affwild2": {str(i): name for i, name in enumerate(EXPRESSIONS)},
    # AffectNet: 0 Neutral 1 Happy 2 Sad 3 Surprise 4 Fear 5 Disgust 6 Anger 7 Contempt (8-10 dropped)
    "affectnet": AFFECTNET_MAP,
    "affectnet_npy": AFFECTNET_MAP,
    # ExpW: 0 angry 1 disgust 2 fear 3 happy 4 sad 5 surprise 6 neutral
    "expw": {"0": "Anger", "1": "Disgust", "2": "Fear", "3": "Happiness", "4": "Sadness",
             "5": "Surprise", "6": "Neutral"},
    # AI-Hub: the paper's subset (neutral, anger, fear, surprise); 기쁨 joy, 슬픔 sadness and 상처
    # hurt are left out (unmapped_label) unless the config maps them
    "aihub": {"중립": "Neutral", "분노": "Anger", "불안": "Fear", "당황": "Surprise"},
    "generic": {name: name for name in EXPRESSIONS} | {str(i): n for i, n in enumerate(EXPRESSIONS)},
}
DEFAULT_SPLITS = {"affwild2": dict(layout.AFFWILD2_SPLIT_DIRS),
                  "affectnet": {"training": "train", "validation": "validation"},
                  "affectnet_npy": dict(layout.AFFECTNET_NPY_SPLITS)}
VOTES = ("majority", "unanimous")
SPLITS = ("train", "validation", "test")


class AnnotationError(ValueError):
    """A file that cannot be read as what it claims to be; the message names the file."""


def _nfc(text) -> str:
    """Native label as text: stripped, Unicode NFC (Korean names may come decomposed), integral
    floats as integers (a parquet column of 1.0, 4.0 means classes 1 and 4)."""
    if isinstance(text, float) and text.is_integer():
        text = int(text)
    return unicodedata.normalize("NFC", str(text).strip())


class LabelMap:
    """Native label -> ABAW class index, from the source's ``label_map`` (or its kind's default).

    Lookup is exact, then case-insensitive; labels it does not know map to None (unmapped_label).
    """

    def __init__(self, names: dict[str, str]):
        self.exact = {_nfc(k): expression_index(v) for k, v in names.items()}
        self.folded = {k.casefold(): v for k, v in self.exact.items()}

    def get(self, native) -> int | None:
        if native is None:
            return None
        text = _nfc(native)
        return self.exact.get(text, self.folded.get(text.casefold()))

    def __contains__(self, native) -> bool:
        return self.get(native) is not None


def label_map_for(source: dict) -> LabelMap:
    names = source.get("label_map") or DEFAULT_LABEL_MAPS[source["kind"]]
    return LabelMap(names)


def splits_for(source: dict) -> dict[str, str]:
    """Native split -> pipeline split, without the native splits mapped to None (not used)."""
    given = source.get("splits")
    splits = DEFAULT_SPLITS.get(source["kind"], {}) if given is None else given
    bad = {k: v for k, v in splits.items() if v is not None and v not in SPLITS}
    if bad:
        raise ValueError(f"source {source.get('name')!r}: unknown pipeline splits {bad}; valid: {SPLITS} (or null: not used)")
    return {k: v for k, v in splits.items() if v is not None}


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """Lines of a text file, tolerant of a UTF-8 byte-order mark and Windows line endings."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path}: not UTF-8 text ({exc})") from exc
    return text.splitlines()


def read_affwild2_file(path: str, task: str) -> tuple[list, list[str | None], list[str]]:
    """Values, a reason per frame (None where the value is usable) and the lines as read.

    EXPR: one int per line, -1 = not annotated. VA: ``v,a`` per line, a finite value < -1 (-5) = not
    annotated. Unparsable, NaN, infinite or out-of-range values and a wrong number of fields are
    ``invalid_value``. Line i of the lists is line i + 2 of the file (after the header).
    """
    lines = read_text_lines(path)
    header = EXPR_HEADER if task == "expr" else VA_HEADER
    if not lines:
        raise AnnotationError(f"{path}: empty annotation file (expected the header {header!r})")
    if lines[0].strip().replace(" ", "") != header:
        raise AnnotationError(f"{path}: wrong header {lines[0][:80]!r}, expected {header!r}")
    body = lines[1:]
    while body and not body[-1].strip():  # a trailing blank line is not a frame
        body.pop()
    values: list = []
    reasons: list[str | None] = []
    for line in body:
        value, reason = (_parse_expr if task == "expr" else _parse_va)(line.strip())
        values.append(value)
        reasons.append(reason)
    return values, reasons, body


def _parse_expr(text: str):
    try:
        v = int(text)
    except ValueError:
        return None, "invalid_value"
    if v == EXPR_UNANNOTATED:
        return None, "unannotated"
    if not 0 <= v < NUM_EXPRESSIONS:
        return None, "invalid_value"
    return v, None


def _parse_va(text: str):
    parts = text.split(",")
    try:
        v, a = (float(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        v = a = None
    if v is None or not (math.isfinite(v) and math.isfinite(a)):
        return None, "invalid_value"  # also -inf: the "not annotated" marker is a finite -5
    if v > 1 or a > 1:
        return None, "invalid_value"
    if v < VA_INVALID_BELOW or a < VA_INVALID_BELOW:
        return None, "unannotated"
    return (v, a), None


def _rows(**columns) -> pl.DataFrame:
    n = max(len(v) for v in columns.values() if isinstance(v, list))
    data = {c: (v if isinstance(v, list) else [v] * n) for c, v in columns.items()}
    for c in MANIFEST:
        data.setdefault(c, [None] * n)
    return pl.DataFrame(data, schema=MANIFEST)


class UnusableInputError(ValueError):
    """Annotated videos that are missing or cannot be decoded (config ``on_unusable_input: stop``);
    the message names every such file."""


ON_UNUSABLE = ("stop", "skip")


def probe_video(path: str) -> str | None:
    """Why a video file cannot be used, or None: it is missing, empty (0 bytes), OpenCV cannot open
    its container, or the container reports no frame and its first frame does not decode. Cheap
    (opens the container, decodes at most one frame): it does not find a frame that fails to
    decode later in the video."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if size == 0:
        return "empty file (0 bytes)"
    import cv2

    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            return "cannot be opened as a video"
        if cap.get(cv2.CAP_PROP_FRAME_COUNT) <= 0 and not cap.read()[0]:
            return "no frame decoded"
    finally:
        cap.release()
    return None


def _issue(source: dict, split, task, file, line, reason, text) -> dict:
    return dict(source=source["name"], split=split, task=task, file=str(file), line=line, reason=reason,
                text=None if text is None else str(text)[:120] if line is not None else str(text))


def check_split_folders(source: dict, tasks) -> None:
    """A native split folder named in the source's own ``splits`` must exist under at least one of
    its task folders that exist: a misspelt name (``Valid_Set``) would otherwise leave that split
    out without a word. (The default folders are not checked: a copy without a validation set is
    then reported by the shards stage's summary.) Raises :class:`AnnotationError` naming the folder."""
    if not source.get("splits"):
        return
    root = Path(source["root"])
    task_dirs = [root / layout.AFFWILD2_TASK_DIRS[t] for t in tasks if (root / layout.AFFWILD2_TASK_DIRS[t]).is_dir()]
    for native, split in splits_for(source).items():
        if task_dirs and not any((d / native).is_dir() for d in task_dirs):
            raise AnnotationError(f"source {source['name']!r}: split folder {native!r} (mapped to {split!r}) exists under "
                             f"none of {', '.join(str(d) for d in task_dirs)}; fix its name in 'splits' or map it to null")


def index_affwild2(source: dict, issues: list[dict], on_unusable: str = "stop") -> pl.DataFrame:
    tasks = source.get("tasks") or ["expr", "va"]
    if source.get("label_map"):
        raise AnnotationError(f"source {source['name']!r}: a label_map is not used for kind affwild2 (its EXPR "
                              f"files hold the ABAW classes in the order of their header); remove it")
    check_split_folders(source, tasks)
    test_names = layout.read_test_list(source["test_list"]) if source.get("test_list") else None
    units = layout.affwild2_units(source["root"], source.get("videos"), splits_for(source), tasks,
                                  test_names=test_names)
    videos = source.get("videos") or str(Path(source["root"]) / "videos")
    unusable = []  # (split, file, reason, message) of each missing or undecodable video
    for unit in units:
        files = [f for a in unit.annotations for f in a.files.values()]
        named_by = ", ".join(files) if files else f"the test list {source.get('test_list')}"
        if unit.video_path is None:
            for a in unit.annotations:
                by = ", ".join(a.files.values()) or f"the test list {source.get('test_list')}"
                names = [a.name] + [a.name[: -len(s)] for s in layout.PERSON_SUFFIXES if a.name.endswith(s)]
                unusable.append((a.split, f"{videos}/{unit.unit}.*", "no_video",
                                 f"no video file {' or '.join(map(repr, names))} under {videos} (annotated by {by})"))
            continue
        why = probe_video(unit.video_path)
        if why is not None:
            for split in sorted({a.split for a in unit.annotations}):
                unusable.append((split, unit.video_path, "unreadable_video",
                                 f"{unit.video_path}: {why} (annotated by {named_by})"))
    frames = []
    for unit in units:
        for ann in unit.annotations:
            if ann.split == layout.TEST_SPLIT and not ann.files:
                # a test video: one placeholder row, expanded to every decoded frame by the shards
                frames.append(_rows(source=source["name"], split=ann.split, unit=unit.unit, video=ann.name,
                                    frame=[WHOLE_VIDEO], person=ann.person, path=unit.video_path or "",
                                    drop=None if unit.video_path else "no_video"))
                continue
            per_task = {}
            for t, f in ann.files.items():
                values, reasons, lines = read_affwild2_file(f, t)
                per_task[t] = (values, reasons)
                if not lines:
                    issues.append(_issue(source, ann.split, t, f, None, "header_only",
                                         "a header without any line: no frame annotated for this task"))
                for i, r in enumerate(reasons):
                    if r == "invalid_value":
                        issues.append(_issue(source, ann.split, t, f, i + 2, r, lines[i]))
            n = max(len(v) for v, _ in per_task.values())
            expr_v, expr_r = per_task.get("expr", ([], []))
            va_v, va_r = per_task.get("va", ([], []))
            expression, valence, arousal, drop = [], [], [], []
            status = {"expr": [], "va": []}
            for i in range(n):
                e = expr_v[i] if i < len(expr_v) else None
                va = va_v[i] if i < len(va_v) else None
                expression.append(e)
                valence.append(None if va is None else va[0])
                arousal.append(None if va is None else va[1])
                for t, (_, rs) in (("expr", (expr_v, expr_r)), ("va", (va_v, va_r))):
                    status[t].append(None if i >= len(rs) else (rs[i] or LABEL_USABLE))
                if e is None and va is None:
                    rs = {r[i] for _, r in per_task.values() if i < len(r)}
                    drop.append("invalid_value" if "invalid_value" in rs else "unannotated")
                elif unit.video_path is None:
                    drop.append("no_video")
                else:
                    drop.append(None)
            frames.append(_rows(
                source=source["name"], split=ann.split, unit=unit.unit, video=ann.name,
                frame=list(range(n)), person=ann.person, path=unit.video_path or "",
                expression=expression, valence=valence, arousal=arousal, drop=drop,
                expr_status=status["expr"], va_status=status["va"],
            ))
    # after the annotation files were read (their errors first): every unusable video at once
    if unusable and on_unusable == "stop":
        raise UnusableInputError(
            f"source {source['name']!r}: {len(unusable)} annotated video(s) missing or unusable (set "
            "on_unusable_input: skip to leave them out, counted):\n  " + "\n  ".join(m for *_, m in unusable))
    for split, file, reason, message in unusable:
        issues.append(_issue(source, split, None, file, None, reason, message))
    for unit_name, message in layout.shared_videos(units):
        issues.append(_issue(source, None, None, unit_name, None, "shared_video", message))
    return pl.concat(frames) if frames else pl.DataFrame(schema=MANIFEST)


# ---- image sources -------------------------------------------------------------------------------
WHOLE_IMAGE = "image"  # a record's box: the image is the face crop; the box is the image's bounds


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) of an image from its header (PIL; OpenCV decodes what PIL cannot); None when
    unreadable (the extraction then counts it as ``unreadable_image``)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except Exception:
        pass
    try:
        import cv2

        img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        return None if img is None else (img.shape[1], img.shape[0])
    except Exception:
        return None


def _va_state(v, a) -> tuple[bool, bool]:
    """(usable, given but invalid) for a valence/arousal pair; a finite value < -1 (AffectNet's -2)
    is 'not annotated'; NaN, infinite or > 1 is invalid."""
    if v is None or a is None:
        return False, False
    if not (math.isfinite(v) and math.isfinite(a)) or v > 1 or a > 1:
        return False, True
    return (v >= VA_INVALID_BELOW and a >= VA_INVALID_BELOW), False


def _image_rows(source: dict, split: str, records: list[dict], issues: list[dict]) -> pl.DataFrame:
    """Rows for image sources. A record: ``rel`` (image path relative to the source), ``face``
    (number of the face in the image, default 0), ``path``, ``box`` (x0, y0, x1, y1), None, or
    :data:`WHOLE_IMAGE`), native ``expression``, ``valence``, ``arousal`` (a key that is absent: the
    source does not annotate that task), ``origin`` ((file, line, text) it was read from), and
    optional reasons found by the reader: ``drop`` about the labels (e.g. ``no_consensus``), checked
    first, and ``box_drop`` (``bad_box``), checked after the labels. Invalid values are added to
    ``issues``. The rows carry an extra column ``origin`` ("file:line") for the split check."""
    chunks = int(source.get("chunks") or 1)
    tasks = source.get("tasks") or ["expr", "va"]
    lmap = label_map_for(source)
    out = {c: [] for c in [*MANIFEST, "origin"]}
    for rec in records:
        video = layout.image_name(rec["rel"])
        native = rec.get("expression")
        native = None if native is None or _nfc(native) == "" else native
        expr = lmap.get(native)
        v, a = rec.get("valence"), rec.get("arousal")
        va_ok, va_bad = _va_state(v, a)
        drop = rec.get("drop")
        status = {"expr": None, "va": None}
        if "expression" in rec and "expr" in tasks:
            status["expr"] = drop or ("unannotated" if native is None else
                                      "unmapped_label" if expr is None else LABEL_USABLE)
        if "valence" in rec and "va" in tasks:
            status["va"] = drop or (LABEL_USABLE if va_ok else "invalid_value" if va_bad else "unannotated")
        if status["expr"] != LABEL_USABLE:
            expr = None
        if status["va"] != LABEL_USABLE:
            va_ok = False
        if drop is None and expr is None and not va_ok:
            if status["expr"] == "unmapped_label":
                drop = "unmapped_label"
            elif "invalid_value" in status.values():
                drop = "invalid_value"
            else:
                drop = "unannotated"  # AffectNet's -2, or no label at all
        file, line, text = rec.get("origin") or (rec["path"], None, None)
        for task, st in status.items():
            if st == "invalid_value":
                issues.append(_issue(source, split, task, file, line, st, text))
        drop = drop or rec.get("box_drop")
        box = rec.get("box")
        if box == WHOLE_IMAGE:
            size = image_size(rec["path"]) if drop is None else None
            box = (0.0, 0.0, float(size[0]), float(size[1])) if size else None
        row = dict(source=source["name"], split=split, unit=layout.chunk_of(video, chunks), video=video,
                   frame=int(rec.get("face", 0)), person="", path=rec["path"], expression=expr,
                   valence=v if va_ok else None, arousal=a if va_ok else None,
                   box_x0=box[0] if box else None, box_y0=box[1] if box else None,
                   box_x1=box[2] if box else None, box_y1=box[3] if box else None, drop=drop,
                   expr_status=status["expr"], va_status=status["va"],
                   origin=f"{file}:{line}" if line is not None else str(file))
        for c in out:
            out[c].append(row[c])
    return pl.DataFrame(out, schema={**MANIFEST, "origin": pl.String})


def mark_duplicates(df: pl.DataFrame) -> pl.DataFrame:
    """Of the usable rows of one face (same video and frame) in one split, keep the first; the
    others are dropped as ``duplicate``. Extraction then sees each face once. (The same image in two
    splits is an error: :func:`check_image_splits`.)"""
    usable = pl.col("drop").is_null()
    first = pl.int_range(pl.len()).over("video", "frame", usable) == 0
    return df.with_columns(drop=pl.when(usable & ~first).then(pl.lit("duplicate")).otherwise(pl.col("drop")))


def check_image_splits(df: pl.DataFrame, source: dict) -> None:
    """Raise :class:`layout.SplitLeakError` when one image of an image source is listed in two
    splits (its faces would be trained and evaluated on), naming where each split lists it."""
    leaks = (df.group_by("video").agg(pl.col("split").n_unique().alias("n"), pl.col("split"), pl.col("origin"))
             .filter(pl.col("n") > 1).sort("video"))
    if not leaks.height:
        return
    lines = []
    for video, _, splits, origins in leaks.head(10).iter_rows():
        firsts = {}
        for sp, o in zip(splits, origins):
            firsts.setdefault(sp, o)
        lines.append(f"{video!r} in " + " and ".join(f"{sp} ({o})" for sp, o in sorted(firsts.items())))
    more = f"\n  ... and {leaks.height - 10} more" if leaks.height > 10 else ""
    raise layout.SplitLeakError(f"source {source['name']!r}: split leak: {leaks.height} image(s) listed in "
                                "two splits (their faces would be trained and evaluated on):\n  "
                                + "\n  ".join(lines) + more)


def _float(text) -> float | None:
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _label_number(text) -> float | None:
    """A valence/arousal cell: None when empty (not annotated), NaN when not a number (an
    ``invalid_value``, never silently 'not annotated')."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def index_affectnet(source: dict, issues: list[dict]) -> pl.DataFrame:
    root = Path(source["root"])
    frames = []
    for native, split in splits_for(source).items():
        csv_path = root / "Manually_Annotated_file_lists" / f"{native}.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(f"{csv_path}: AffectNet list for split {native!r} not found")
        records = []
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            need = {"subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression"}
            if not need <= set(reader.fieldnames or []):
                raise AnnotationError(f"{csv_path}: missing columns {sorted(need - set(reader.fieldnames or []))}")
            for row in reader:
                x, y = _float(row["face_x"]), _float(row["face_y"])
                w, h = _float(row["face_width"]), _float(row["face_height"])
                box = (x, y, x + w, y + h) if None not in (x, y, w, h) else None
                rel = row["subDirectory_filePath"]
                text = ",".join(str(row.get(k) or "") for k in ("expression", "valence", "arousal"))
                rec = dict(rel=rel, path=str(root / "Manually_Annotated_Images" / rel), box=box,
                           expression=row["expression"], box_drop=None if box else "bad_box",
                           origin=(str(csv_path), reader.line_num, f"{rel}: expression,valence,arousal {text}"))
                if "valence" in row or "arousal" in row:
                    rec.update(valence=_label_number(row.get("valence")), arousal=_label_number(row.get("arousal")))
                records.append(rec)
        frames.append(_image_rows(source, split, records, issues))
    return pl.concat(frames) if frames else pl.DataFrame(schema=MANIFEST)


def _npy_value(path: Path):
    """The scalar of one AffectNet ``.npy`` annotation (a string like ``'3'`` or ``'-0.25'`` in the
    release, or a number); ``None`` when the file is absent; ``ValueError`` when unreadable."""
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if arr.size != 1:
        raise ValueError(f"{path}: expected one value, found shape {arr.shape}")
    value = arr.reshape(()).item()
    return value.decode() if isinstance(value, bytes) else value


def index_affectnet_npy(source: dict, issues: list[dict]) -> pl.DataFrame:
    """AffectNet's newer release: ``<root>/<native split>/images/<id>.jpg`` and
    ``annotations/<id>_{exp,val,aro,lnd}.npy``. One row per ``<id>_exp.npy`` (an annotated image);
    an unreadable annotation file is ``invalid_value``, a missing image ``unreadable_image``."""
    root = Path(source["root"])
    tasks = source.get("tasks") or ["expr", "va"]
    frames = []
    for native, split in splits_for(source).items():
        ann_dir, img_dir = root / native / "annotations", root / native / "images"
        if not ann_dir.is_dir():
            raise FileNotFoundError(f"{ann_dir}: AffectNet annotations for split {native!r} not found")
        images = {os.path.splitext(f)[0]: f for f in (sorted(os.listdir(img_dir)) if img_dir.is_dir() else [])
                  if os.path.splitext(f)[1].lower() in layout.IMAGE_EXTENSIONS}
        ids = sorted(e.name[: -len("_exp.npy")] for e in os.scandir(ann_dir) if e.name.endswith("_exp.npy"))
        records = []
        for image_id in ids:
            name = images.get(image_id, f"{image_id}.jpg")
            rec = dict(rel=f"{native}/images/{name}", path=str(img_dir / name), box=WHOLE_IMAGE,
                       expression=None, origin=(str(ann_dir / f"{image_id}_exp.npy"), None, None))
            if "va" in tasks:
                rec.update(valence=None, arousal=None)
            try:
                rec["expression"] = _npy_value(ann_dir / f"{image_id}_exp.npy")
                if "va" in tasks:
                    rec["valence"] = _label_number(_npy_value(ann_dir / f"{image_id}_val.npy"))
                    rec["arousal"] = _label_number(_npy_value(ann_dir / f"{image_id}_aro.npy"))
            except ValueError as exc:
                rec["drop"] = "invalid_value"
                rec["origin"] = (str(exc).split(": ", 1)[0], None, str(exc).split(": ", 1)[-1])
            records.append(rec)
        frames.append(_image_rows(source, split, records, issues))
    return pl.concat(frames) if frames else pl.DataFrame(schema=MANIFEST)


def index_expw(source: dict, issues: list[dict]) -> pl.DataFrame:
    root = Path(source["root"])
    lst = root / "label" / "label.lst"
    records = []
    for lineno, line in enumerate(read_text_lines(lst), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 8:
            raise AnnotationError(f"{lst}:{lineno}: expected 8 fields, got {len(parts)}: {line[:80]!r}")
        name, face_id, top, left, right, bottom, _conf, label = parts
        try:
            box = (float(left), float(top), float(right), float(bottom))
            face = int(face_id)
        except ValueError as exc:
            raise AnnotationError(f"{lst}:{lineno}: non-numeric face id or box: {line[:80]!r}") from exc
        records.append(dict(rel=name, face=face, path=str(root / "image" / "origin" / name), box=box,
                            expression=label, origin=(str(lst), lineno, line.strip())))
    return _image_rows(source, source.get("split") or "train", records, issues)


# ---- AI-Hub --------------------------------------------------------------------------------------
def vote(labels: list, n_annotators: int, rule: str) -> tuple[str | None, str | None]:
    """(label, drop reason) from the annotators' labels (None: that annotator gave none).

    ``majority``: a label given by more than half of the annotators; ``unanimous``: by all of them.
    No label at all is ``unannotated``; otherwise no winner is ``no_consensus``.
    """
    if rule not in VOTES:
        raise ValueError(f"unknown vote {rule!r}; valid: {', '.join(VOTES)}")
    given = [_nfc(x) for x in labels if x is not None and _nfc(x) != ""]
    if not given:
        return None, "unannotated"
    label, count = Counter(given).most_common(1)[0]
    need = n_annotators if rule == "unanimous" else n_annotators // 2 + 1
    return (label, None) if count >= need else (None, "no_consensus")


def median_box(boxes: list) -> tuple[float, float, float, float] | None:
    """Per-coordinate median of the annotators' valid boxes ``{minX, minY, maxX, maxY}``."""
    valid = []
    for b in boxes:
        if not isinstance(b, dict):
            continue
        c = [_float(b.get(k)) for k in ("minX", "minY", "maxX", "maxY")]
        if None in c or not all(math.isfinite(x) for x in c) or c[2] <= c[0] or c[3] <= c[1]:
            continue
        valid.append(c)
    if not valid:
        return None
    return tuple(float(statistics.median(col)) for col in zip(*valid))


def _aihub_images(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for d, _, files in os.walk(folder):
        for f in sorted(files):
            if os.path.splitext(f)[1].lower() in layout.IMAGE_EXTENSIONS:
                found.setdefault(unicodedata.normalize("NFC", f), []).append(Path(d) / f)
    return found


def index_aihub(source: dict, issues: list[dict]) -> pl.DataFrame:
    """AI-Hub Korean emotion images: JSON lists of items ``{"filename", "faceExp_uploader",
    "annot_A": {"faceExp", "boxes": {minX, minY, maxX, maxY}}, "annot_B", "annot_C"}``.

    The label is the annotators' vote (config ``vote``: majority, the default, or unanimous) on
    their native labels, then mapped by ``label_map``; the box is the median of their boxes (no
    valid box: ``bad_box``). An image is looked up beside its JSON file, else by file name
    anywhere under the split's folder (two candidates there: an error naming them).
    """
    root = Path(source["root"])
    rule = source.get("vote") or "majority"
    if rule not in VOTES:
        raise ValueError(f"source {source.get('name')!r}: unknown vote {rule!r}; valid: {', '.join(VOTES)}")
    given = source.get("splits")
    splits = {"": source.get("split") or "train"} if not given else splits_for(source)
    frames = []
    for native, split in splits.items():
        folder = root / native if native else root
        jsons = layout.aihub_label_files(folder)
        if not jsons:
            raise FileNotFoundError(f"{folder}: no AI-Hub JSON label files found")
        images = _aihub_images(folder)
        records = []
        for jpath in map(Path, jsons):
            try:
                items = json.loads(jpath.read_bytes().decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise AnnotationError(f"{jpath}: not a JSON file ({exc})") from exc
            if not isinstance(items, list):
                raise AnnotationError(f"{jpath}: the root must be a list of items, got {type(items).__name__}")
            for i, item in enumerate(items):
                if not isinstance(item, dict) or not isinstance(item.get("filename"), str) or not item["filename"].strip():
                    raise AnnotationError(f"{jpath}: item {i} has no 'filename'")
                filename = unicodedata.normalize("NFC", item["filename"].strip())
                path = jpath.parent / filename
                if not path.is_file():
                    candidates = images.get(Path(filename).name, [])
                    if len(candidates) > 1:
                        raise AnnotationError(f"{jpath}: item {i}: {filename!r} matches several images: "
                                              f"{[str(c) for c in candidates[:3]]}")
                    if candidates:
                        path = candidates[0]
                annots = [v for k, v in sorted(item.items()) if k.startswith("annot_") and isinstance(v, dict)]
                label, drop = vote([a.get("faceExp") for a in annots], len(annots), rule)
                box = median_box([a.get("boxes") for a in annots])
                try:
                    rel = path.relative_to(root).as_posix()
                except ValueError:
                    rel = path.as_posix()
                records.append(dict(rel=rel, path=str(path), box=box, expression=label, drop=drop,
                                    box_drop=None if box else "bad_box",
                                    origin=(str(jpath), None, f"item {i} ({filename})")))
        frames.append(_image_rows(source, split, records, issues))
    return pl.concat(frames)


# ---- generic tables ------------------------------------------------------------------------------
BOX_COLUMNS = ("x0", "y0", "x1", "y1")


def _generic_number(value, table: Path, row: int, column: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise AnnotationError(f"{table}: row {row}: column {column!r} is not a number: {value!r}") from None


def index_generic(source: dict, issues: list[dict]) -> pl.DataFrame:
    """A csv or parquet table: ``path`` (relative paths are relative to the table's folder),
    optional ``x0, y0, x1, y1`` (all four; a row without them: the whole image is the face),
    ``expression`` (ABAW name or index, or native labels with a ``label_map``), ``valence`` and
    ``arousal`` (both or neither), and an optional ``split`` column (else the source's ``split``).
    At least one label column is needed. Empty cells are missing labels; an image listed again with
    the same box is a ``duplicate``; several boxes of one image are its faces 0, 1, ..."""
    table = Path(source["root"])
    if table.suffix.lower() not in (".csv", ".parquet"):
        raise AnnotationError(f"{table}: a generic source is a .csv or .parquet table")
    if not table.is_file():
        raise FileNotFoundError(f"{table}: generic source table not found")
    try:
        df = pl.read_parquet(table) if table.suffix.lower() == ".parquet" else pl.read_csv(table, infer_schema_length=0)
    except Exception as exc:
        raise AnnotationError(f"{table}: cannot be read as {table.suffix[1:]} ({exc})") from exc
    cols = set(df.columns)
    problems = []
    if "path" not in cols:
        problems.append("a 'path' column is required")
    if not cols & {"expression", "valence", "arousal"}:
        problems.append("at least one label column (expression, valence, arousal) is required")
    if len(cols & {"valence", "arousal"}) == 1:
        problems.append("valence and arousal come together")
    if 0 < len(cols & set(BOX_COLUMNS)) < 4:
        problems.append(f"a box needs all of {', '.join(BOX_COLUMNS)} (found {sorted(cols & set(BOX_COLUMNS))})")
    if problems:
        raise AnnotationError(f"{table}: {'; '.join(problems)}; columns found: {df.columns}")
    default_split = source.get("split") or "train"
    per_split: dict[str, list[dict]] = {}
    faces: dict[str, list] = {}  # path -> boxes in table order (the face number is the index)
    for row_no, row in enumerate(df.iter_rows(named=True), start=2 if table.suffix.lower() == ".csv" else 0):
        p = row["path"]
        if p is None or not str(p).strip():
            raise AnnotationError(f"{table}: row {row_no}: empty path")
        p = str(p).strip()
        split = row.get("split") or default_split
        if split not in SPLITS:
            raise AnnotationError(f"{table}: row {row_no}: unknown split {split!r}; valid: {', '.join(SPLITS)}")
        box = None
        if "x0" in cols:
            c = [_generic_number(row[k], table, row_no, k) for k in BOX_COLUMNS]
            if all(x is not None for x in c):
                box = tuple(c)
            elif any(x is not None for x in c):
                raise AnnotationError(f"{table}: row {row_no}: box {c} is incomplete")
        boxes = faces.setdefault(p, [])
        given = box or WHOLE_IMAGE
        if given in boxes:  # the same face again: same face number, dropped as duplicate
            face = boxes.index(given)
        else:
            face = len(boxes)
            boxes.append(given)
        rel = p if not os.path.isabs(p) else p.lstrip("/")
        rec = dict(rel=rel, face=face, path=p if os.path.isabs(p) else str(table.parent / p), box=given,
                   origin=(str(table), row_no, ",".join(f"{k}={row.get(k)}" for k in ("path", "expression", "valence", "arousal") if k in cols)))
        if "expression" in cols:
            rec["expression"] = row.get("expression")
        if "valence" in cols:
            rec.update(valence=_generic_number(row.get("valence"), table, row_no, "valence"),
                       arousal=_generic_number(row.get("arousal"), table, row_no, "arousal"))
        if box is not None and not all(math.isfinite(x) for x in box):
            rec["box_drop"] = "bad_box"
        per_split.setdefault(split, []).append(rec)
    frames = [_image_rows(source, split, recs, issues) for split, recs in per_split.items()]
    return pl.concat(frames) if frames else pl.DataFrame(schema=MANIFEST)


READERS = {"affwild2": index_affwild2, "affectnet": index_affectnet, "affectnet_npy": index_affectnet_npy,
           "expw": index_expw, "aihub": index_aihub, "generic": index_generic}
IMAGE_KINDS = {"affectnet", "affectnet_npy", "expw", "aihub", "generic"}


def check_label_status(df: pl.DataFrame, where: str) -> None:
    """Raise AssertionError unless, per task, a label value is given exactly where the row's status
    for that task is ``usable`` (a label never becomes null without a counted reason)."""
    for task, (status, _, columns) in TASKS.items():
        given = pl.all_horizontal([pl.col(c).is_not_null() for c in columns])
        bad = df.filter(given != (pl.col(status) == LABEL_USABLE).fill_null(False))
        if bad.height:
            r = bad.row(0, named=True)
            raise AssertionError(f"{where}: {bad.height} rows whose {task} label and {status} disagree, e.g. "
                                 f"{r['source']}/{r['video']} frame {r['frame']}: {status} {r[status]!r}, "
                                 + ", ".join(f"{c} {r[c]!r}" for c in columns))


def index_source(source: dict, on_unusable: str = "stop", issues: list[dict] | None = None) -> pl.DataFrame:
    """The manifest rows of one source (schema MANIFEST).

    ``on_unusable``: ``stop`` (the default) raises :class:`UnusableInputError` naming every annotated
    video that is missing or cannot be opened; ``skip`` lists them in ``issues`` and goes on (their
    frames are counted as ``no_video`` / ``unreadable_video``). ``issues``, when given, receives one
    dict (schema ISSUES) per finding: invalid lines, header-only files, unusable videos, videos
    shared across splits. Raises :class:`AnnotationError` for unreadable annotation files and
    :class:`layout.SplitLeakError` for an annotated video or image in two splits.
    """
    if source["kind"] not in READERS:
        raise ValueError(f"source {source.get('name')!r}: unknown kind {source['kind']!r}; known: {sorted(READERS)}")
    if source.get("test_list") and source["kind"] != "affwild2":
        raise ValueError(f"source {source.get('name')!r}: test_list is for affwild2 sources (videos), not {source['kind']!r}")
    if on_unusable not in ON_UNUSABLE:
        raise ValueError(f"on_unusable_input: {on_unusable!r}; valid: {', '.join(ON_UNUSABLE)}")
    issues = [] if issues is None else issues
    if source["kind"] in IMAGE_KINDS:
        df = READERS[source["kind"]](source, issues)
        check_image_splits(df.filter(pl.col("drop").is_null()), source)
        df = mark_duplicates(df.select(list(MANIFEST)))
    else:
        df = READERS[source["kind"]](source, issues, on_unusable)
    check_label_status(df, f"source {source['name']!r}")
    return df


def issues_table(issues: list[dict]) -> pl.DataFrame:
    """The ISSUES table of the dicts :func:`index_source` collected."""
    return pl.DataFrame(issues, schema=ISSUES) if issues else pl.DataFrame(schema=ISSUES)


def summary(df: pl.DataFrame) -> pl.DataFrame:
    return (df.group_by("split", pl.col("drop").fill_null("usable")).len()
            .sort("split", "drop"))


def source_problems(source) -> list[str]:
    """What makes a source entry unusable before any file of it is read, one line each: not a JSON
    object, ``name`` / ``kind`` / ``root`` missing, an unknown kind, a root, ``videos`` folder or
    ``test_list`` that does not exist (each named with its key). Empty when it is usable."""
    if not isinstance(source, dict):
        return [f"--source: a JSON object (the source's config entry) is expected, not {type(source).__name__}"]
    where = f"source {source['name']!r}" if isinstance(source.get("name"), str) else "--source"
    problems = [f"{where}: {key!r} is required but missing" for key in ("name", "kind", "root") if not source.get(key)]
    kind = source.get("kind")
    if kind and kind not in READERS:
        problems.append(f"{where}: unknown kind {kind!r}; known: {', '.join(sorted(READERS))}")
    if source.get("root"):
        problems.append(input_problem(f"{where} root", source["root"], "file" if kind == "generic" else "dir"))
    if kind == "affwild2" and source.get("root") and Path(source["root"]).is_dir():
        problems.append(input_problem(f"{where} videos", source.get("videos") or Path(source["root"]) / "videos", "dir"))
    problems.append(input_problem(f"{where} test_list", source.get("test_list"), "file"))
    return [p for p in problems if p]


def main(argv: list[str] | None = None) -> int:
    prog = prog_of("index")
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="the source's config entry as JSON (or a path to a JSON file)")
    parser.add_argument("--out", required=True, help="manifest parquet to write")
    parser.add_argument("--issues", help="ISSUES parquet to write (invalid lines, header-only files, unusable "
                        "videos, videos shared across splits), read by the shards stage's summary")
    parser.add_argument("--on-unusable-input", choices=ON_UNUSABLE, default="stop",
                        help="an annotated video that is missing or cannot be opened: stop (error naming "
                        "every such file) or skip (counted, named in the end-of-run summary)")
    args = parser.parse_args(argv)
    source = json_option(prog, "--source", args.source)
    problems = source_problems(source)
    if problems:
        fail(prog, *problems)
    issues: list[dict] = []
    try:
        df = index_source(source, args.on_unusable_input, issues)
    except (ValueError, FileNotFoundError) as exc:  # bad input (AnnotationError, SplitLeakError, ...): named
        message = str(exc) if str(exc).startswith("source ") else f"source {source['name']!r}: {exc}"
        error(prog, message)
        return 1
    if args.issues:
        write_table(issues_table(issues), args.issues, ISSUES)
    write_table(df, args.out, MANIFEST)
    print(f"{source['name']}: {df.height} annotated rows -> {args.out}", file=sys.stderr)
    print(summary(df), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
