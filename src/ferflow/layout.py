"""What a source holds on disk, listed without reading it: the extraction units of each source.

Used by the workflow at parse time (to build the DAG) and by the index stage, so that both agree
on which annotation belongs to which video file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
AFFWILD2_TASK_DIRS = {"expr": "EXPR_Classification_Challenge", "va": "VA_Estimation_Challenge"}
AFFWILD2_SPLIT_DIRS = {"Train_Set": "train", "Validation_Set": "validation"}
PERSON_SUFFIXES = ("_left", "_right")
TEST_SPLIT = "test"


@dataclass
class Annotation:
    """One annotation name (a person in a video) with its files per task and its split."""

    name: str
    person: str  # "", "left" or "right"
    split: str
    files: dict[str, str] = field(default_factory=dict)  # task -> annotation txt (none for test videos)


@dataclass
class VideoUnit:
    """One video file and the annotated people in it: one extraction job."""

    unit: str  # video file stem
    video_path: str | None  # None when no video file was found (counted as no_video)
    annotations: list[Annotation] = field(default_factory=list)

    @property
    def persons(self) -> list[str]:
        return sorted({a.person for a in self.annotations})


def find_videos(folder: str | os.PathLike, listing: list[str] | None = None) -> dict[str, str]:
    """Map video stem -> path for every video file under ``folder`` (recursive).

    ``listing`` (paths of files that will exist, e.g. the demo plan) replaces the disk walk.
    Two files with the same stem are an error (:class:`DuplicateVideoError`): annotation names
    could not tell them apart.
    """
    found: dict[str, str] = {}
    folder = Path(folder)
    if listing is not None:
        prefix = str(folder) + os.sep
        paths = sorted(p for p in listing if p.startswith(prefix))
    else:
        if not folder.is_dir():
            raise FileNotFoundError(f"video folder {folder} does not exist")
        paths = [os.path.join(d, f) for d, _, files in os.walk(folder) for f in sorted(files)]
    for path in paths:
        stem, ext = os.path.splitext(os.path.basename(path))
        if ext.lower() in VIDEO_EXTENSIONS:
            if stem in found:
                raise DuplicateVideoError(f"two videos named {stem!r}: {found[stem]} and {path} (an annotation "
                                          "name could not tell them apart)")
            found[stem] = path
    return found


def _list_txt(folder: Path, listing: list[str] | None) -> list[str]:
    if listing is not None:
        prefix = str(folder) + os.sep
        return sorted(p[len(prefix):] for p in listing if p.startswith(prefix) and os.sep not in p[len(prefix):])
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def read_test_list(path: str | os.PathLike) -> list[str]:
    """Video names of a test list: one a line; blank lines and ``#`` comments skipped, a video
    extension (``.mp4``) or an annotation file's ``.txt`` tolerated and removed, repeated names
    kept once (in first-seen order)."""
    names: dict[str, None] = {}
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise FileNotFoundError(f"test list {path}: cannot be read ({exc})") from exc
    for lineno, line in enumerate(text.splitlines(), start=1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        stem, ext = os.path.splitext(name)
        if ext.lower() in VIDEO_EXTENSIONS or ext.lower() == ".txt":
            name = stem
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"{path}:{lineno}: a test list names videos, not paths: {line.strip()!r}")
        names[name] = None
    return list(names)


def affwild2_units(root: str | os.PathLike, videos: str | os.PathLike | None = None,
                   splits: dict[str, str | None] | None = None, tasks=("expr", "va"),
                   listing: list[str] | None = None, test_names: list[str] | None = None) -> list[VideoUnit]:
    """List Aff-Wild2 annotation files and pair each with its video file.

    ``<video>_left`` / ``<video>_right`` annotations refer to ``<video>.<ext>`` unless a video named
    with the suffix itself exists. ``listing`` replaces the disk (see :func:`find_videos`).
    ``splits`` maps the native split folders to pipeline splits; a folder mapped to None is not used.
    ``test_names`` (a test list) become annotations of split ``test`` without files: every frame of
    those videos is extracted and written, without labels.
    """
    root = Path(root)
    if listing is None and not root.is_dir():
        raise FileNotFoundError(f"source root {root} does not exist")
    splits = AFFWILD2_SPLIT_DIRS if splits is None else splits
    video_files = find_videos(videos if videos is not None else root / "videos", listing)
    annotations: dict[tuple[str, str], Annotation] = {}
    seen: dict[str, list[tuple[str, str, str]]] = {}  # name -> (task, split, file) of each file
    for task in tasks:
        task_dir = root / AFFWILD2_TASK_DIRS[task]
        for native, split in splits.items():
            if split is None:
                continue
            d = task_dir / native
            for f in _list_txt(d, listing):
                if not f.endswith(".txt"):
                    continue
                name = f[: -len(".txt")]
                seen.setdefault(name, []).append((task, split, str(d / f)))
                key = (split, name)
                if key not in annotations:
                    annotations[key] = Annotation(name=name, person="", split=split)
                annotations[key].files[task] = str(d / f)
    check_split_leaks(seen)
    for name in test_names or []:
        annotations.setdefault((TEST_SPLIT, name), Annotation(name=name, person="", split=TEST_SPLIT))
    units: dict[str, VideoUnit] = {}
    for (split, name), ann in sorted(annotations.items()):
        unit = name
        if name not in video_files:
            for suffix in PERSON_SUFFIXES:
                if name.endswith(suffix) and name[: -len(suffix)] in video_files:
                    unit = name[: -len(suffix)]
                    ann.person = suffix[1:]
        if unit not in units:
            units[unit] = VideoUnit(unit=unit, video_path=video_files.get(unit))
        units[unit].annotations.append(ann)
    check_whole_video_leaks(units.values())
    return [units[u] for u in sorted(units)]


class SplitLeakError(ValueError):
    """Frames of one annotated video (or person) in two splits; names the files."""


class DuplicateAnnotationError(ValueError):
    """Two annotation files for one task of one video in one split; names the files."""


class DuplicateVideoError(ValueError):
    """Two video files with the same name (stem); names both."""


def check_split_leaks(files: dict[str, list[tuple[str, str, str]]]) -> None:
    """Raise :class:`SplitLeakError` naming the files when an annotation name (a video, or a person
    in it) has files in two pipeline splits (its frames would be in both: train and validation), and
    :class:`DuplicateAnnotationError` when it has two files for one task in one split (two native
    split folders mapped to one split: which one is right?).

    ``files``: annotation name -> ``(task, split, file)`` of each of its files.
    """
    leaks, twice = [], []
    for name, entries in sorted(files.items()):
        splits = sorted({split for _, split, _ in entries})
        tasks = [task for task, _, _ in entries]
        if len(splits) > 1:
            leaks.append(f"{name!r} is annotated in splits {' and '.join(splits)}: "
                         + " and ".join(f for _, _, f in entries))
        elif len(tasks) != len(set(tasks)):
            twice.append(f"{name!r} has two {tasks[0].upper()} files in split {splits[0]}: "
                         + " and ".join(f for _, _, f in entries))
    _raise_leaks(leaks)
    if twice:
        raise DuplicateAnnotationError(
            "two annotation files for one task of one video in one split (are two native split folders "
            "mapped to the same split?):\n  " + "\n  ".join(twice))


def _raise_leaks(problems: list[str]) -> None:
    if problems:
        raise SplitLeakError("split leak: the same annotated video in two places (its frames would be "
                             "trained and evaluated on):\n  " + "\n  ".join(problems))


def check_whole_video_leaks(units) -> None:
    """Raise :class:`SplitLeakError` when a video annotated whole (``X.txt``: its one annotated face)
    also has a person annotated (``X_left.txt``) in another split: the whole-video annotation may be
    the same face, whose frames would then be trained and evaluated on. (``X_left`` in train and
    ``X_right`` in validation are two people: allowed, see :func:`shared_videos`.)"""
    problems = []
    for u in units:
        labelled = [a for a in u.annotations if a.split != TEST_SPLIT]
        whole = [a for a in labelled if a.person == ""]
        if whole and len({a.split for a in labelled}) > 1:
            files = " and ".join(f"{f} ({a.split})" for a in sorted(labelled, key=lambda a: a.name)
                                 for f in a.files.values())
            problems.append(f"video {u.unit!r} is annotated whole in split {whole[0].split} and per person in "
                            f"another: {files}")
    _raise_leaks(problems)


def shared_videos(units: list[VideoUnit]) -> list[tuple[str, str]]:
    """(video file stem, message) of each video whose people are annotated in different splits
    (``X_left`` in train, ``X_right`` in validation): allowed (different people), but the same scene
    is seen by training and validation, so the summary warns about it once, by name."""
    out = []
    for u in units:
        by_split: dict[str, list[str]] = {}
        for a in u.annotations:
            if a.split != TEST_SPLIT:
                by_split.setdefault(a.split, []).append(a.name)
        if len(by_split) > 1:
            parts = "; ".join(f"{s}: {', '.join(sorted(n))}" for s, n in sorted(by_split.items()))
            out.append((u.unit, f"video {u.unit!r} has people in more than one split ({parts})"))
    return out


def chunk_of(relative_path: str, chunks: int) -> str:
    """Stable chunk id of an image (independent of listing order and of Python's hash seed)."""
    h = int.from_bytes(hashlib.blake2b(relative_path.encode("utf-8"), digest_size=8).digest(), "big")
    return f"chunk{h % chunks:03d}"


def image_units(chunks: int) -> list[str]:
    return [f"chunk{i:03d}" for i in range(chunks)]


def image_name(relative_path: str) -> str:
    """The ``video`` name of an image of an image source: its path relative to the source root,
    with ``/`` separators, without empty or ``.`` parts, ``..`` written ``%2E%2E`` (so that it is
    a safe tar member folder). Sample keys built from it are stable: adding images to a source
    never changes the key of an image already there."""
    parts = [p for p in relative_path.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"empty image path {relative_path!r}")
    return "/".join("%2E%2E" if p == ".." else p for p in parts)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
AFFECTNET_NPY_SPLITS = {"train_set": "train", "val_set": "validation"}


def affectnet_npy_folders(root: str | os.PathLike, splits: dict[str, str | None] | None = None) -> list[str]:
    """The ``annotations`` folders of AffectNet's newer release (``<root>/<split>_set/annotations``)."""
    splits = AFFECTNET_NPY_SPLITS if splits is None else splits
    return [str(Path(root) / native / "annotations") for native, split in splits.items() if split is not None]


def aihub_label_files(root: str | os.PathLike, splits: dict[str, str | None] | None = None) -> list[str]:
    """The JSON label files of an AI-Hub source: every ``*.json`` under ``<root>/<native split>``
    (or under ``root`` without ``splits``), sorted; folders mapped to None are not used."""
    folders = [Path(root)] if not splits else [Path(root) / n for n, s in splits.items() if s is not None]
    return sorted(str(p) for folder in folders if folder.is_dir() for p in folder.rglob("*.json") if p.is_file())
