"""A corpus of broken inputs, made by code (small: a few kB per case).

Builders write one broken file each; the ``*_corpus`` functions put broken files beside good ones
in the native layout of a source and return the source's config entry and what must become of
every annotated frame or face: ``{video: {fate: count}}``, a fate being ``written`` or a drop
reason of the accounting. ``tests/test_bad_input.py`` runs them through the stages;
``docs/bad-input.md`` lists, per case, whether it is an error or a counted skip, and why.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import cv2
import numpy as np

from ferflow.labels import EXPR_HEADER, VA_HEADER
from test_accounting import BRIGHT, write_image, write_text, write_video

EXPR_DIR, VA_DIR = "EXPR_Classification_Challenge", "VA_Estimation_Challenge"
#: names that must survive the shell, tar members, sample keys and parquet
WEIRD_NAMES = ("with space", "quote's \"double\"", "ünïcödé 表情", "dollar $(touch PWNED); x")


# ---- files ---------------------------------------------------------------------------------------
def truncated_video(path: Path, frames: int = 12, keep: float = 0.85) -> Path:
    """An AVI of ``frames`` bright noisy frames, cut after ``keep`` of its bytes (a copy that was
    interrupted): OpenCV decodes only the frames before the cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = 64, 48
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (w, h))
    for _ in range(frames):
        writer.write(rng.integers(150, 255, (h, w, 3), dtype=np.uint8))
    writer.release()
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def truncated_mp4(path: Path, frames: int = 10, keep: float = 0.5) -> Path:
    """An MP4 cut in half (an interrupted download): its index (the ``moov`` box) is written at the
    end, so nothing of it can be opened."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (64, 48))
    for _ in range(frames):
        writer.write(np.full((48, 64, 3), BRIGHT, np.uint8))
    writer.release()
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def avi_frame_spans(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of each video frame's data in an AVI file (its ``##dc``/``##db`` chunks of the
    ``movi`` list), read from the RIFF chunk headers themselves."""
    spans = []
    pos = data.index(b"movi") + 4
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"idx1":
            break
        if chunk == b"LIST":  # a nested list (rec): its chunks follow its 4-byte type
            pos += 12
            continue
        if chunk[2:] in (b"dc", b"db"):
            spans.append((pos + 8, size))
        pos += 8 + size + (size & 1)
    return spans


def break_avi_frame(path: Path, frame: int, n_bytes: int = 400) -> Path:
    """Zero ``n_bytes`` at the start of one frame's data inside an AVI (its JPEG header for MJPG):
    that frame no longer decodes, the others still do, and the container's frame count is unchanged."""
    data = bytearray(path.read_bytes())
    offset, size = avi_frame_spans(bytes(data))[frame]
    assert size > n_bytes, f"{path}: frame {frame} holds only {size} bytes"
    data[offset:offset + n_bytes] = bytes(n_bytes)
    path.write_bytes(bytes(data))
    return path


def decodable_prefix(path: Path) -> int:
    """Frames OpenCV reads from ``path`` before its first failed read (what the extraction used
    to take as the video's length)."""
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def zero_frame_video(path: Path) -> Path:
    """A valid AVI container without a single frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 48))
    writer.release()
    return path


def not_a_video(path: Path) -> Path:
    """Text in a file with a video extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is a text file, not a video\n" * 30)
    return path


def annotation(path: Path, lines: list[str], *, header: str | None = None, bom: bool = False,
               crlf: bool = False) -> Path:
    """An Aff-Wild2 annotation file: its task's header (the task from the folder: VA under
    VA_Estimation_Challenge, else EXPR) or ``header``, then one line per frame."""
    task = "va" if VA_DIR in path.parts else "expr"
    head = (EXPR_HEADER if task == "expr" else VA_HEADER) if header is None else header
    eol = "\r\n" if crlf else "\n"
    text = eol.join([head, *lines]) + eol
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def corrupt_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 a JPEG header, then nothing of an image" * 4)
    return path


def empty_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def unreadable_image(path: Path) -> Path:
    """A path that cannot be read as a file (a folder named like an image: unreadable even for
    root, for whom file permissions are no obstacle)."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def grayscale_image(path: Path, w: int = 64, h: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(1).integers(0, 255, (h, w), dtype=np.uint8)
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


# ---- sources -------------------------------------------------------------------------------------
#: The unusable videos of :func:`affwild2_corpus` (file name, and what the index says of it): with
#: ``on_unusable_input: stop`` the index stops naming each; with ``skip`` they are counted.
UNUSABLE_VIDEOS = {"zero_frames.avi": "no frame decoded", "not_a_video.mp4": "cannot be opened as a video",
                   "zero_bytes.mp4": "empty file (0 bytes)", "cut.mp4": "cannot be opened as a video",
                   "pair.*": "no video file 'pair_left' or 'pair'"}


def affwild2_corpus(root: Path, name: str = "aw") -> tuple[dict, dict]:
    """Videos and annotation files that are broken in every counted way, beside a good one.

    With ``on_unusable_input: skip`` everything here is a counted skip (or simply works); by default
    the unusable videos (:data:`UNUSABLE_VIDEOS`) stop the index. The errors of annotation files
    (wrong header, empty file) are :func:`wrong_header` and :func:`empty_annotation`.
    """
    aw = root / name
    videos, e, va = aw / "videos", aw / EXPR_DIR / "Train_Set", aw / VA_DIR / "Train_Set"
    expected: dict[str, dict[str, int]] = {}

    write_video(videos / "good.avi", [BRIGHT] * 6)
    annotation(e / "good.txt", ["0", "1", "2", "3", "4", "5"])
    annotation(va / "good.txt", ["0.1,0.2"] * 6)
    expected["good"] = {"written": 6}

    trunc = truncated_video(videos / "truncated.avi", frames=12)
    decoded = decodable_prefix(trunc)
    assert 3 <= decoded < 12, f"truncated video decodes {decoded} frames"
    # the container still states 12 frames: those after the cut exist but do not decode
    annotation(e / "truncated.txt", [str(i % 8) for i in range(14)])
    expected["truncated"] = {"written": decoded, "unreadable_frame": 12 - decoded, "beyond_video_end": 2}

    zero_frame_video(videos / "zero_frames.avi")
    annotation(e / "zero_frames.txt", ["1", "2", "3"])
    expected["zero_frames"] = {"unreadable_video": 3}

    not_a_video(videos / "not_a_video.mp4")
    annotation(e / "not_a_video.txt", ["1", "2", "3"])
    expected["not_a_video"] = {"unreadable_video": 3}

    empty_file(videos / "zero_bytes.mp4")
    annotation(va / "zero_bytes.txt", ["0.1,0.1", "0.2,0.2"])
    expected["zero_bytes"] = {"unreadable_video": 2}

    truncated_mp4(videos / "cut.mp4")
    annotation(e / "cut.txt", ["4", "4"])
    expected["cut"] = {"unreadable_video": 2}

    write_video(videos / "non_numeric.avi", [BRIGHT] * 6)
    annotation(e / "non_numeric.txt", ["0", "x", "2", "", "4", "five"])  # a blank line is a frame too
    expected["non_numeric"] = {"written": 3, "invalid_value": 3}

    write_video(videos / "out_of_range.avi", [BRIGHT] * 6)
    annotation(e / "out_of_range.txt", ["0", "8", "-2", "7", "1", "100"])
    annotation(va / "out_of_range.txt", ["0.5,0.5", "1.5,0", "0,-1.5", "-1,1", "1,-1", "0,0"])
    # frame 1: EXPR 8 and VA 1.5 invalid; frame 2: EXPR -2 invalid, VA -1.5 = Aff-Wild2's "not
    # annotated" marker (< -1): no usable label, dropped as invalid_value (one part is invalid);
    # frame 5: EXPR 100 invalid, VA usable: written with VA only (its expression null)
    expected["out_of_range"] = {"written": 4, "invalid_value": 2}

    write_video(videos / "nan.avi", [BRIGHT] * 4)
    annotation(va / "nan.txt", ["nan,0.1", "0.1,NaN", "0.2,0.2", "inf,0"])
    expected["nan"] = {"written": 1, "invalid_value": 3}

    write_video(videos / "more_lines.avi", [BRIGHT] * 4)
    annotation(e / "more_lines.txt", ["1"] * 7)
    expected["more_lines"] = {"written": 4, "beyond_video_end": 3}

    write_video(videos / "fewer_lines.avi", [BRIGHT] * 8)
    annotation(e / "fewer_lines.txt", ["2"] * 3)  # frames 3..7 have no line: not annotated, no row
    expected["fewer_lines"] = {"written": 3}

    write_video(videos / "crlf.avi", [BRIGHT] * 4)
    annotation(e / "crlf.txt", ["3", "3", "-1", "3"], crlf=True)
    expected["crlf"] = {"written": 3, "unannotated": 1}

    write_video(videos / "bom.avi", [BRIGHT] * 4)
    annotation(va / "bom.txt", ["0.5,-0.5"] * 4, bom=True, crlf=True)
    expected["bom"] = {"written": 4}

    annotation(e / "header_only.txt", [])  # a header and no line: no frame annotated, no row
    write_video(videos / "header_only.avi", [BRIGHT] * 4)

    # two people in a video whose file is missing
    annotation(e / "pair_left.txt", ["1", "2"])
    annotation(e / "pair_right.txt", ["3", "4", "5"])
    expected["pair_left"] = {"no_video": 2}
    expected["pair_right"] = {"no_video": 3}
    return {"name": name, "kind": "affwild2", "root": str(aw), "videos": str(videos)}, expected


def wrong_header(path: Path) -> Path:
    return annotation(path, ["0", "1"], header="Neutral,Angry,Sad")


def empty_annotation(path: Path) -> Path:
    return empty_file(path)


def expw_corpus(root: Path, name: str = "expw") -> tuple[dict, dict]:
    """ExpW images that are unreadable, empty, grayscale, missing; boxes outside the image, of
    zero area, inverted, partly outside; a name with quotes and non-ASCII characters (ExpW's list is
    split on whitespace, so no spaces here: see :func:`generic_corpus`)."""
    ex = root / name
    img = ex / "image" / "origin"
    write_image(img / "good.jpg")
    grayscale_image(img / "gray.png")
    corrupt_image(img / "corrupt.jpg")
    empty_file(img / "empty.jpg")
    unreadable_image(img / "folder.jpg")
    weird = "ünï'cödé\"表情.jpg"
    write_image(img / weird)
    lines = [  # name face top left right bottom confidence label (ExpW: 3 happy, 6 neutral)
        "good.jpg 0 8 8 40 40 0.9 3",
        "good.jpg 1 200 200 300 300 0.9 3",   # outside the 64x64 image
        "good.jpg 2 10 20 20 40 0.9 3",       # zero width (left == right)
        "good.jpg 3 10 40 8 40 0.9 3",        # inverted (right < left)
        "good.jpg 4 -10 -10 30 30 0.9 6",     # partly outside: cropped, padded
        "gray.png 0 4 4 60 60 0.9 6",
        "corrupt.jpg 0 1 1 20 20 0.9 1",
        "empty.jpg 0 1 1 20 20 0.9 1",
        "folder.jpg 0 1 1 20 20 0.9 1",
        "missing.jpg 0 1 1 20 20 0.9 1",
        f"{weird} 0 8 8 40 40 0.9 3",
    ]
    write_text(ex / "label" / "label.lst", "\n".join(lines) + "\n")
    expected = {"good.jpg": {"written": 2, "bad_box": 3}, "gray.png": {"written": 1},
                "corrupt.jpg": {"unreadable_image": 1}, "empty.jpg": {"unreadable_image": 1},
                "folder.jpg": {"unreadable_image": 1}, "missing.jpg": {"unreadable_image": 1},
                weird: {"written": 1}}
    return {"name": name, "kind": "expw", "root": str(ex), "split": "train", "chunks": 2}, expected


def generic_corpus(root: Path, name: str = "gen") -> tuple[dict, dict]:
    """A generic csv table naming images with spaces, quotes and non-ASCII characters (in a folder
    with such a name too), and a box with NaN coordinates."""
    folder = root / name / "ïmages 'x'"
    rows, expected = [], {}
    for i, stem in enumerate(WEIRD_NAMES):
        rel = f"{folder.name}/{stem}.png"
        write_image(folder / f"{stem}.png", 48, 40)
        rows.append([rel, "Sadness" if i % 2 else "Happiness", "0.1", "-0.2", "", "", "", ""])
        expected[rel] = {"written": 1}
    write_image(folder / "nan box.png", 48, 40)
    rows.append([f"{folder.name}/nan box.png", "Anger", "", "", "nan", "0", "10", "10"])
    expected[f"{folder.name}/nan box.png"] = {"bad_box": 1}
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["path", "expression", "valence", "arousal", "x0", "y0", "x1", "y1"])
    out.writerows(rows)
    table = write_text(root / name / "table.csv", buf.getvalue())
    return {"name": name, "kind": "generic", "root": str(table), "split": "train"}, expected


def unusable_corpus(root: Path, name: str = "nothing", split: str = "train") -> tuple[dict, dict]:
    """A source without a single usable face: unmapped labels, a corrupt image, a box outside."""
    ex = root / name
    corrupt_image(ex / "image" / "origin" / "a.jpg")
    write_image(ex / "image" / "origin" / "b.jpg")
    write_text(ex / "label" / "label.lst", "a.jpg 0 1 1 20 20 0.9 3\nb.jpg 0 1 1 20 20 0.9 11\n"
               "b.jpg 1 100 100 120 120 0.9 3\n")
    expected = {"a.jpg": {"unreadable_image": 1}, "b.jpg": {"unmapped_label": 1, "bad_box": 1}}
    return {"name": name, "kind": "expw", "root": str(ex), "split": split, "chunks": 1}, expected


def same_video_two_sources(root: Path) -> list[dict]:
    """Two Aff-Wild2 sources, each with a video ``clip`` (its own file, its own labels)."""
    sources = []
    for name, label in (("awa", "1"), ("awb", "2")):
        aw = root / name
        write_video(aw / "videos" / "clip.avi", [BRIGHT] * 4)
        annotation(aw / EXPR_DIR / "Train_Set" / "clip.txt", [label] * 4)
        sources.append({"name": name, "kind": "affwild2", "root": str(aw), "videos": str(aw / "videos")})
    return sources


def same_stem_twice(root: Path) -> dict:
    """One source whose video folders hold ``clip.avi`` and ``clip.mp4``: which one does
    ``clip.txt`` annotate?"""
    aw = root / "twice"
    write_video(aw / "videos" / "batch1" / "clip.avi", [BRIGHT] * 4)
    write_video(aw / "videos" / "batch2" / "clip.mp4", [BRIGHT] * 4)
    annotation(aw / EXPR_DIR / "Train_Set" / "clip.txt", ["1"] * 4)
    return {"name": "twice", "kind": "affwild2", "root": str(aw), "videos": str(aw / "videos")}
