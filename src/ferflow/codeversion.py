"""Per-stage code versions for the workflow's rerun triggers, blind to comments and docstrings.

Each rule carries ``code_version(src, stage)`` as a param, so Snakemake reruns a stage when the code
it runs changes. The version hashes every ferflow module the stage's CLI module imports
(transitively), each as its abstract syntax tree (``ast.dump``) with docstrings removed: comments,
docstrings, blank lines and line breaks do not change it; any change to what the code does does.
No Snakemake import: the workflow (``workflow/rules/common.smk``) and the tests call it alike.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

__all__ = ["module_imports", "stage_modules", "normalized_source", "code_version"]


def _tree(src: Path, module: str) -> ast.Module:
    path = src / f"{module}.py"
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def module_imports(src: str | Path, module: str) -> set[str]:
    """The ferflow modules (names of ``<src>/<name>.py`` files) that ``<src>/<module>.py`` imports:
    ``from . import x``, ``from .x import y``, ``from ferflow.x import y``, ``import ferflow.x``,
    anywhere in the file (also inside functions)."""
    src = Path(src)
    found = set()
    for node in ast.walk(_tree(src, module)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("ferflow."):
                found.add(node.module.split(".")[1])
            elif node.module == "ferflow":
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ferflow."))
    return {m for m in found if (src / f"{m}.py").exists()}


def stage_modules(src: str | Path, entry: str) -> list[str]:
    """entry and every ferflow module it imports, transitively, sorted by name."""
    todo, seen = [entry], set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(module_imports(src, m) - seen)
    return sorted(seen)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def normalized_source(path: str | Path) -> str:
    """What of a Python file counts for its code version: ``ast.dump`` of its syntax tree without
    docstrings (no comments, no line numbers, no formatting). Raises SyntaxError for a broken file."""
    path = Path(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return ast.dump(_strip_docstrings(tree), include_attributes=False)


def code_version(src: str | Path, entry: str) -> str:
    """16 hex digits of SHA-256 over the normalized source of every module of the stage."""
    src = Path(src)
    h = hashlib.sha256()
    for module in stage_modules(src, entry):
        h.update(module.encode() + b"\0")
        h.update(normalized_source(src / f"{module}.py").encode() + b"\0")
    return h.hexdigest()[:16]
