"""Up-front input checks shared by the stage CLIs: a usage error is one line and exit status 2.

A stage checks the files it was given before it does anything else (no weight download, no output
folder created), so a mistyped path costs one line naming the option and the file instead of a
traceback from deep inside the stage. Exit status 2 is argparse's for usage errors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable

__all__ = ["input_problem", "require_inputs"]


def input_problem(option: str, path: str | os.PathLike | None, kind: str) -> str | None:
    """What is wrong with one input, or None: kind is "file" or "dir"; path None is not checked."""
    if path is None:
        return None
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', not {kind!r}")
    want = "file" if kind == "file" else "folder"
    if not os.path.exists(path):
        return f"{option} {os.fspath(path)}: no such {want}"
    ok = os.path.isfile(path) if kind == "file" else os.path.isdir(path)
    return None if ok else f"{option} {os.fspath(path)}: not a {want}"


def require_inputs(prog: str, inputs: Iterable[tuple[str, str | os.PathLike | None, str]]) -> None:
    """Exit with status 2 and one line per problem unless every (option, path, kind) input exists.

    kind is "file" or "dir". Call it first in ``main``, before any output is created. An input
    inside a folder already reported missing is not reported again.
    """
    problems, bad = [], []
    for option, path, kind in inputs:
        if path is None or any(Path(path).is_relative_to(b) for b in bad):
            continue
        problem = input_problem(option, path, kind)
        if problem:
            problems.append(problem)
            bad.append(Path(path))
    if problems:
        for p in problems:
            print(f"{prog}: error: {p}", file=sys.stderr)
        sys.exit(2)
