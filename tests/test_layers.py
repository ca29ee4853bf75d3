"""The design rules of docs/ARCHITECTURE.md ("Layers of engine/"), checked on the source: imports run down the
layers only, Ray is imported only where work is scheduled, and only the Workspace turns folder names into paths."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "engine"

# every engine module or package, by layer (docs/ARCHITECTURE.md); a new module must be placed here
LAYERS: dict[str, int] = {
    **dict.fromkeys(["atomic", "errors", "geo", "storage"], 1),
    **dict.fromkeys(["schema", "workspace", "product_layout", "geoparquet", "gpkg", "db"], 2),
    **dict.fromkeys(["imagery", "catalog", "osm", "buildings", "morphology", "scenes", "synth", "preview", "tiles", "pixels",
                     "model_bundle", "imagery_sources", "model_input", "weights_import", "model_card"], 3),
    **dict.fromkeys(["mapping", "training"], 4),
    **dict.fromkeys(["stitch", "change"], 5),
    **dict.fromkeys(["products", "accuracy"], 6),
    **dict.fromkeys(["pipelines", "web"], 7),
    **dict.fromkeys(["cli", "console"], 8),
}
# Ray outside pipelines/: only Ray Data's tensor column type (a data format the pipelines exchange, no scheduling)
RAY_OUTSIDE_PIPELINES = {"pixels": {"ray.data.extensions"}}
# folder names of the workspace layout: joined into paths only by engine/workspace.py
FOLDERS = {"products", "tiles", "runs", "models", "cities", "predictions", "preview", "_state", "_staging", "_done", "train", "index",
           "graphs"}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "engine" and len(parts) > 1 else None


def _modules() -> list[tuple[str, Path, ast.Module]]:
    out = []
    for path in sorted(ENGINE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out.append((name, path, ast.parse(path.read_text(), filename=str(path))))
    return out


def _imports(tree: ast.Module) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            if node.module == "engine":  # from engine import storage
                found += [(f"engine.{a.name}", node.lineno) for a in node.names]
    return found


MODULES = _modules()


def test_every_module_has_a_layer():
    units = {_unit(name) for name, _, _ in MODULES} - {None}
    assert units <= set(LAYERS), f"place these in LAYERS (and docs/ARCHITECTURE.md): {sorted(units - set(LAYERS))}"


def test_imports_run_down_the_layers_only():
    upward = []
    graph: dict[str, set[str]] = {}
    for name, path, tree in MODULES:
        src = _unit(name)
        if src is None:
            continue
        for target, line in _imports(tree):
            dst = _unit(target)
            if dst is None or dst == src:
                continue
            graph.setdefault(src, set()).add(dst)
            if LAYERS[dst] > LAYERS[src]:
                upward.append(f"{path.relative_to(REPO)}:{line} ({src}, layer {LAYERS[src]}) imports {target} (layer {LAYERS[dst]})")
    assert not upward, "imports that run up a layer:\n" + "\n".join(upward)

    def cycle_from(node: str, stack: list[str], seen: set[str]) -> list[str] | None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                found = cycle_from(nxt, stack + [nxt], seen)
                if found:
                    return found
        return None

    for start in sorted(graph):
        cycle = cycle_from(start, [start], {start})
        assert cycle is None, f"units import each other: {' -> '.join(cycle)}"


def test_ray_is_imported_only_where_work_is_scheduled():
    offenders = []
    for name, path, tree in MODULES:
        unit = _unit(name)
        if unit == "pipelines":
            continue
        for target, line in _imports(tree):
            if target.split(".")[0] == "ray" and target not in RAY_OUTSIDE_PIPELINES.get(unit or "", set()):
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not offenders, "Ray outside engine/pipelines/:\n" + "\n".join(offenders)


def test_the_model_package_imports_neither_ray_nor_engine():
    for path in sorted((REPO / "geolink_model").rglob("*.py")):
        for target, line in _imports(ast.parse(path.read_text())):
            assert target.split(".")[0] not in ("ray", "engine"), f"{path.relative_to(REPO)}:{line} imports {target}"


def _docstrings(tree: ast.Module) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _folder_joins(tree: ast.Module) -> list[tuple[int, str]]:
    """``x / "tiles"``, ``os.path.join(x, "runs", ...)`` and ``"city=..."`` strings outside docstrings."""
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and side.value in FOLDERS:
                    found.append((node.lineno, f"/ {side.value!r}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("join", "joinpath"):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and arg.value in FOLDERS:
                    found.append((node.lineno, f"join(..., {arg.value!r})"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs and "city=" in node.value:
            found.append((node.lineno, repr(node.value)))
    return found


@pytest.mark.parametrize("root", ["engine", "jobs"])
def test_only_the_workspace_joins_folder_names(root):
    offenders = []
    for path in sorted((REPO / root).rglob("*.py")):
        if path == ENGINE / "workspace.py":
            continue
        offenders += [f"{path.relative_to(REPO)}:{line} {what}" for line, what in _folder_joins(ast.parse(path.read_text()))]
    assert not offenders, "ask engine.workspace.Workspace for these paths:\n" + "\n".join(offenders)


def test_the_checks_would_catch_a_violation():
    """The checks above are not vacuous: each finds a planted violation."""
    planted = ast.parse('p = root / "tiles" / f"city={c}"\nq = os.path.join(ws, "runs", "train")\n')
    assert len(_folder_joins(planted)) >= 4
    assert ("ray.data", 1) in _imports(ast.parse("import ray.data"))
    assert LAYERS["stitch"] < LAYERS["products"] < LAYERS["pipelines"]
