"""Stage ``index``: read one source in its native layout and write its manifest.

One manifest row per annotated frame (videos) or annotated image (image datasets), with labels
already mapped into the ABAW space. Rows that can never be used keep their place in the manifest
with a ``drop`` reason, so that the accounting can show where every annotated frame went.

    python -m ferflow.index --source '{"name": "affwild2", "kind": "affwild2", "root": ...}' \
        --out results/manifest/affwild2.parquet
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

import polars as pl

from . import layout
from .labels import EXPR_HEADER, EXPRESSIONS, NUM_EXPRESSIONS, VA_HEADER, expression_index
from .schemas import MANIFEST, write_table

DEFAULT_LABEL_MAPS: dict[str, dict[str, str]] = {
    "affwild2": {str(i): name for i, name in enumerate(EXPRESSIONS)},
    # AffectNet: 0 Neutral 1 Happy 2 Sad 3 Surprise 4 Fear 5 Disgust 6 Anger 7 Contempt (8-10 dropped)
    "affectnet": {"0": "Neutral", "1": "Happiness", "2": "Sadness", "3": "Surprise", "4": "Fear",
                  "5": "Disgust", "6": "Anger", "7": "Other"},
    # ExpW: 0 angry 1 disgust 2 fear 3 happy 4 sad 5 surprise 6 neutral
    "expw": {"0": "Anger", "1": "Disgust", "2": "Fear", "3": "Happiness", "4": "Sadness",
             "5": "Surprise", "6": "Neutral"},
    "generic": {name: name for name in EXPRESSIONS} | {str(i): n for i, n in enumerate(EXPRESSIONS)},
}
DEFAULT_SPLITS = {"affwild2": dict(layout.AFFWILD2_SPLIT_DIRS),
                  "affectnet": {"training": "train", "validation": "validation"}}


class AnnotationError(ValueError):
    """A file that cannot be read as what it claims to be; the message names the file."""


def label_map_for(source: dict) -> dict[str, int]:
    names = source.get("label_map") or DEFAULT_LABEL_MAPS[source["kind"]]
    return {str(k): expression_index(v) for k, v in names.items()}


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """Lines of a text file, tolerant of a UTF-8 byte-order mark and Windows line endings."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path}: not UTF-8 text ({exc})") from exc
    return text.splitlines()


def parse_affwild2_file(path: str, task: str) -> tuple[list, list[str | None]]:
    """Values per frame and a reason per frame (None where the value is usable).

    EXPR: one int per line, -1 = not annotated. VA: ``v,a`` per line, a value < -1 (-5) = not
    annotated. Unparsable, NaN or out-of-range values are ``invalid_value``.
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
    return values, reasons


def _parse_expr(text: str):
    try:
        v = int(text)
    except ValueError:
        return None, "invalid_value"
    if v == -1:
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
    if v is None or math.isnan(v) or math.isnan(a):
        return None, "invalid_value"
    if v < -1 or a < -1:
        return None, "unannotated"
    if v > 1 or a > 1:
        return None, "invalid_value"
    return (v, a), None


def _rows(**columns) -> pl.DataFrame:
    n = max(len(v) for v in columns.values() if isinstance(v, list))
    data = {c: (v if isinstance(v, list) else [v] * n) for c, v in columns.items()}
    for c in MANIFEST:
        data.setdefault(c, [None] * n)
    return pl.DataFrame(data, schema=MANIFEST)


def index_affwild2(source: dict) -> pl.DataFrame:
    tasks = source.get("tasks") or ["expr", "va"]
    units = layout.affwild2_units(source["root"], source.get("videos"),
                                  source.get("splits") or DEFAULT_SPLITS["affwild2"], tasks)
    frames = []
    for unit in units:
        for ann in unit.annotations:
            per_task = {t: parse_affwild2_file(f, t) for t, f in ann.files.items()}
            n = max(len(v) for v, _ in per_task.values())
            expr_v, expr_r = per_task.get("expr", ([], []))
            va_v, va_r = per_task.get("va", ([], []))
            expression, valence, arousal, drop = [], [], [], []
            for i in range(n):
                e = expr_v[i] if i < len(expr_v) else None
                va = va_v[i] if i < len(va_v) else None
                expression.append(e)
                valence.append(None if va is None else va[0])
                arousal.append(None if va is None else va[1])
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
            ))
    return pl.concat(frames) if frames else pl.DataFrame(schema=MANIFEST)


def _image_rows(source: dict, split: str, records: list[dict]) -> pl.DataFrame:
    """Rows for image sources: records with rel, path, box, native expression, valence, arousal."""
    chunks = int(source.get("chunks") or 1)
    lmap = label_map_for(source)
    out = {c: [] for c in MANIFEST}
    counters: dict[str, int] = {}
    for rec in sorted(records, key=lambda r: (r["rel"], r.get("face_id", 0))):
        chunk = layout.chunk_of(rec["rel"], chunks)
        frame = counters.get(chunk, 0)
        counters[chunk] = frame + 1
        native = rec.get("expression")
        expr = None if native is None else lmap.get(str(native).strip())
        v, a = rec.get("valence"), rec.get("arousal")
        va_ok = v is not None and a is not None and -1 <= v <= 1 and -1 <= a <= 1
        drop = None
        if expr is None and not va_ok:
            va_given = v is not None and a is not None
            if native is not None and str(native).strip() not in lmap:
                drop = "unmapped_label"
            elif va_given and (math.isnan(v) or math.isnan(a) or v > 1 or a > 1):
                drop = "invalid_value"
            else:
                drop = "unannotated"  # AffectNet's -2, or no label at all
        box = rec.get("box")
        row = dict(source=source["name"], split=split, unit=chunk, video=chunk, frame=frame,
                   person="", path=rec["path"], expression=expr,
                   valence=v if va_ok else None, arousal=a if va_ok else None,
                   box_x0=box[0] if box else None, box_y0=box[1] if box else None,
                   box_x1=box[2] if box else None, box_y1=box[3] if box else None, drop=drop)
        for c in MANIFEST:
            out[c].append(row[c])
    return pl.DataFrame(out, schema=MANIFEST)


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def index_affectnet(source: dict) -> pl.DataFrame:
    root = Path(source["root"])
    splits = source.get("splits") or DEFAULT_SPLITS["affectnet"]
    frames = []
    for native, split in splits.items():
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
                records.append(dict(rel=rel, path=str(root / "Manually_Annotated_Images" / rel), box=box,
                                    expression=row["expression"], valence=_float(row.get("valence")),
                                    arousal=_float(row.get("arousal"))))
        if "va" not in (source.get("tasks") or ["expr", "va"]):
            for r in records:
                r["valence"] = r["arousal"] = None
        frames.append(_image_rows(source, split, records))
    return pl.concat(frames)


def index_expw(source: dict) -> pl.DataFrame:
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
        except ValueError as exc:
            raise AnnotationError(f"{lst}:{lineno}: non-numeric box: {line[:80]!r}") from exc
        records.append(dict(rel=f"{name}#{face_id}", face_id=int(face_id) if face_id.isdigit() else 0,
                            path=str(root / "image" / "origin" / name), box=box, expression=label))
    return _image_rows(source, source.get("split") or "train", records)


def index_generic(source: dict) -> pl.DataFrame:
    """A csv or parquet with columns path, expression (name or index), valence, arousal and an
    optional box (x0, y0, x1, y1); relative paths are relative to the table's folder."""
    table = Path(source["root"])
    df = pl.read_parquet(table) if table.suffix == ".parquet" else pl.read_csv(table, infer_schema_length=0)
    if "path" not in df.columns:
        raise AnnotationError(f"{table}: a generic source needs a 'path' column")
    records = []
    for row in df.iter_rows(named=True):
        p = str(row["path"])
        box = None
        if all(row.get(c) not in (None, "") for c in ("x0", "y0", "x1", "y1")):
            box = tuple(float(row[c]) for c in ("x0", "y0", "x1", "y1"))
        records.append(dict(rel=p, path=p if os.path.isabs(p) else str(table.parent / p), box=box,
                            expression=row.get("expression"), valence=_float(row.get("valence")),
                            arousal=_float(row.get("arousal"))))
    return _image_rows(source, source.get("split") or "train", records)


READERS = {"affwild2": index_affwild2, "affectnet": index_affectnet, "expw": index_expw,
           "generic": index_generic}


def index_source(source: dict) -> pl.DataFrame:
    if source["kind"] not in READERS:
        raise ValueError(f"source {source.get('name')!r}: unknown kind {source['kind']!r}; known: {sorted(READERS)}")
    return READERS[source["kind"]](source)


def summary(df: pl.DataFrame) -> pl.DataFrame:
    return (df.group_by("split", pl.col("drop").fill_null("usable")).len()
            .sort("split", "drop"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferflow.index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="the source's config entry as JSON (or a path to a JSON file)")
    parser.add_argument("--out", required=True, help="manifest parquet to write")
    args = parser.parse_args(argv)
    text = Path(args.source).read_text() if os.path.isfile(args.source) else args.source
    source = json.loads(text)
    df = index_source(source)
    write_table(df, args.out, MANIFEST)
    print(f"{source['name']}: {df.height} annotated rows -> {args.out}", file=sys.stderr)
    print(summary(df), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
