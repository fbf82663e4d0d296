"""The package's import graph: no circles, and no stage module imported by lower-level code.

The graph is read from the source (``ast``), counting every ``from . import x`` / ``from .x import
y`` / ``ferflow.x`` import, also those inside functions (a lazy import is still a dependency). The
stage modules are the ones the workflow's rules run (``python -m ferflow.<stage>`` in
``workflow/rules/*.smk``), so the list follows the rules rather than this file.
"""

import re
from pathlib import Path

from ferflow.codeversion import module_imports

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ferflow"


def import_graph() -> dict[str, set[str]]:
    # the code-version hash reads imports the same way (ferflow.codeversion): one reader serves both
    files = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    return {name: module_imports(SRC, name) - {"__init__"} for name in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None (depth-first search, colouring)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def stage_modules() -> set[str]:
    rules = "\n".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    # `python -m ferflow.X`, or `{params.launch} -m ferflow.X` (training: python, or the device claim
    # `python -m ferflow.devices --gpus k -- torchrun`, a launcher and not a stage)
    found = set(re.findall(r"(?:python|\{params\.launch\}) -m ferflow\.(\w+)", rules))
    return found - {"devices"}


def test_find_cycle_finds_a_circle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_imports_of_sees_lazy_and_absolute_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "from . import atomic as a, schemas\nfrom .labels import X\nimport ferflow.metrics\n"
        "def f():\n    from ferflow import plots\n    from ferflow.truth import Y\n"
    )
    known = {"atomic", "schemas", "labels", "metrics", "plots", "truth", "data"}
    for name in known:
        (tmp_path / f"{name}.py").write_text("")
    assert module_imports(tmp_path, "m") == known - {"data"}


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert {"evaluate", "truth", "ensemble", "abaw", "plots", "data", "shardio", "augment"} <= set(graph)
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_no_stage_module_is_imported_by_a_lower_level_one():
    graph = import_graph()
    stages = stage_modules()
    assert {"index", "extract", "shards", "train", "predict", "evaluate"} <= stages
    wrong = {m: sorted(deps & stages) for m, deps in graph.items() if m not in stages and deps & stages}
    assert not wrong, f"library modules importing stage modules: {wrong}"


def module_map() -> dict[str, tuple[str, set[str]]]:
    """The module map of docs/design.md: module -> (floor, modules it may import)."""
    text = (ROOT / "docs" / "design.md").read_text()
    table = text[text.index("## Module map"):]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[1].startswith("`"):
            continue
        allowed = set(re.findall(r"`(\w+)`", cells[3]))
        for module in re.findall(r"`(\w+)`", cells[1]):
            rows[module] = (cells[0], allowed)
    return rows


def test_the_module_map_in_the_design_doc_matches_the_imports():
    graph, documented = import_graph(), module_map()
    assert set(documented) == set(graph), "docs/design.md's module map lists other modules than src/ferflow"
    stages = stage_modules()
    for module, (floor, allowed) in documented.items():
        assert graph[module] <= allowed, f"{module} imports {sorted(graph[module] - allowed)}, not in its map row"
        assert (floor == "stage") == (module in stages), f"{module}: floor {floor!r}"
        for dep in graph[module]:
            dep_floor = documented[dep][0]
            if floor != "stage":
                assert dep_floor != "stage" and int(dep_floor) < int(floor), f"{module} (floor {floor}) imports {dep} ({dep_floor})"
