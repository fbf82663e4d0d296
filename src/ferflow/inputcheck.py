"""Up-front input checks shared by the stage CLIs: a usage error is one line and exit status 2.

A stage checks the files it was given before it does anything else (no weight download, no output
folder created), so a mistyped path costs one line naming the option and the file instead of a
traceback from deep inside the stage. Exit status 2 is argparse's for usage errors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, NoReturn

__all__ = ["error", "fail", "input_problem", "json_option", "json_problem", "prog_of", "require_inputs"]


def prog_of(stage: str) -> str:
    """The name a stage's messages start with: the console-script form ``ferflow STAGE`` (also for
    ``python -m ferflow.STAGE``, which runs the same code)."""
    return f"ferflow {stage}"


def error(prog: str, *problems: str) -> None:
    """Print ``<prog>: error: <problem>`` on stderr, one line per problem (a problem listing several
    files may go on over indented lines)."""
    for p in problems:
        print(f"{prog}: error: {p}", file=sys.stderr)


def fail(prog: str, *problems: str) -> NoReturn:
    """A usage error: :func:`error`, then exit with status 2 (argparse's). Input data that cannot be
    what it should be is reported with :func:`error` and status 1 by the stage's ``main``."""
    error(prog, *problems)
    sys.exit(2)


def json_option(prog: str, option: str, text: str) -> Any:
    """The value of an option given as a JSON string or as the path of a JSON file. Bad JSON is a
    usage error (:func:`fail`): one line naming the option (and file), the line and column."""
    path = Path(text)
    where = option
    if not text.lstrip().startswith(("{", "[")) and path.is_file():
        where = f"{option} {text}"
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            fail(prog, f"{where}: cannot be read ({exc})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(prog, f"{where}: {json_problem(exc)}")


def json_problem(exc: json.JSONDecodeError) -> str:
    """``not valid JSON (<what> at line L column C)``: a JSON decoding error in one line."""
    return f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"


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
        fail(prog, *problems)
