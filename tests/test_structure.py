"""The shape of the code base: stages never import each other and `src/` has no import cycle.

Imports are read from the source with `ast`, wherever they stand (module level or inside a
function), so a lazy import counts as much as any other.
"""

import ast
from pathlib import Path

from constitutional.stages import STAGES, stage_module

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "constitutional"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The `constitutional.*` modules a file imports (`from pkg import name` counts as pkg.name if that is a module)."""
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(
                f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules
            )
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in SRC.rglob("*.py")}


def test_no_stage_imports_another_stage():
    graph = import_graph()
    stage_modules = {f"{PACKAGE}.stages.{name}" for name in STAGES}
    for stage in stage_modules:
        others = graph[stage] & (stage_modules - {stage})
        assert not others, f"{stage} imports {sorted(others)}: stages talk through the run directory"
        assert f"{PACKAGE}.stages" not in graph[stage], f"{stage} imports the stage registry"


def test_src_has_no_import_cycle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                cycle = path[path.index(child) :] + [child] if child in path else [node, child]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if child not in state:
                visit(child, path + [child])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_every_stage_follows_the_contract():
    for name in STAGES:
        module = stage_module(name)
        assert name == module.NAME
        for attribute in ("Settings", "CONFIG_KEYS", "reads", "check", "input_hashes", "run"):
            assert hasattr(module, attribute), f"stage {name} lacks {attribute}"
        assert callable(module.Settings().validate)
