"""The shape of the code base: stages never import each other, `src/` has no import cycle, only the
config and the pipeline import stages, and modules and functions stay short enough to read.

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


# Only these assemble the stages: the config (one section per stage) and the pipeline (runs them).
STAGE_ASSEMBLERS = {f"{PACKAGE}.config", f"{PACKAGE}.pipeline"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60  # the whole definition, docstring included: one screen


def test_only_the_config_and_the_pipeline_import_stages():
    """Library modules (the report among them) know stages only through `registry.py`."""
    for module, imports in import_graph().items():
        if module.startswith(f"{PACKAGE}.stages") or module in STAGE_ASSEMBLERS:
            continue
        stages = sorted(name for name in imports if name.startswith(f"{PACKAGE}.stages"))
        assert not stages, f"{module} imports {stages}: read stage facts from constitutional.registry"


def test_modules_and_functions_stay_short():
    too_long = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(SRC)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function: {too_long}"
