"""The import contract: the package's layers, read from the source with `ast`.

`LAYERS` is the one ordered table of the package (bottom first): a module may import modules of
its own layer or of a layer below, never above. A new module must be placed in the table (heal,
search, data ... slot in where their imports allow), so the layering is decided, not drifted
into. Also: `surgeon/layers/` imports only `arithmetic` and `errors` from the rest of surgeon,
nothing but the CLI imports the CLI, and no two modules import each other through any chain
(function-level imports included). `make lint` runs this file too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "surgeon"

# (layer, modules); "pkg.*" is a package and everything in it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("bottom", ("surgeon.errors", "surgeon.arithmetic", "surgeon.schema", "surgeon.submodules")),
    (
        "io: building models, checkpoint files and weights files",
        (
            "surgeon.models",
            "surgeon.checkpoint",
            "surgeon.checkpoint.atomic",
            "surgeon.checkpoint.manifest",
            "surgeon.checkpoint.files",
            "surgeon.checkpoint.weights",
        ),
    ),
    (
        "analysis",
        (
            "surgeon.trace",
            "surgeon.calls",
            "surgeon.neighbours",
            "surgeon.strides",
            "surgeon.geometry",
            "surgeon.sites",
            "surgeon.scan",
        ),
    ),
    ("replacement layers", ("surgeon.layers.*",)),
    ("edit operations and the editor", ("surgeon.edits",)),
    ("policy", ("surgeon.policy", "surgeon.policy_loader")),
    ("rewrites", ("surgeon.rewrites.*",)),
    ("patch and its reports", ("surgeon.patch", "surgeon.report", "surgeon.report_html")),
    ("tools built on patch", ("surgeon.placements", "surgeon.backends", "surgeon.fold")),
    (
        "recording and loading checkpoints",
        (
            "surgeon.checkpoint.record",
            "surgeon.checkpoint.replay",
            "surgeon.checkpoint.restore",
            "surgeon.checkpoint.resolve",
        ),
    ),
    ("tools that consume checkpoints", ("surgeon.export", "surgeon.evaluate")),
    (
        "training: the distillation loss, image data, the engine",
        ("surgeon.distill", "surgeon.data", "surgeon.training"),
    ),
    ("tools that train", ("surgeon.heal", "surgeon.supernet", "surgeon.ranking", "surgeon.search")),
    ("the Python surface", ("surgeon.api", "surgeon")),
    ("the command line", ("surgeon.cli", "surgeon.__main__")),
]

LAYERS_MAY_IMPORT = {"surgeon.arithmetic", "surgeon.errors"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str) -> Iterator[tuple[str, int]]:
    """(imported surgeon module, line) for every import in `module`, wherever it stands."""
    path = _modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, node.lineno
            for alias in node.names:  # `from surgeon import policy` imports a module
                if f"{base}.{alias.name}" in _modules():
                    yield f"{base}.{alias.name}", node.lineno


def _surgeon_imports(module: str) -> set[tuple[str, int]]:
    return {
        (name, line)
        for name, line in _imports(module)
        if name in _modules() and name != module and not module.startswith(f"{name}.")
    }


def _layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (specificity, layer)
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            root = pattern.removesuffix(".*")
            if module == pattern:
                candidate = (len(pattern) + 1, index)  # an exact entry beats a package's
            elif pattern.endswith(".*") and (module == root or module.startswith(f"{root}.")):
                candidate = (len(root), index)
            else:
                continue
            if best is None or candidate[0] > best[0]:
                best = candidate
    return None if best is None else best[1]


def test_every_module_has_a_place_in_the_layer_table() -> None:
    unplaced = [name for name in _modules() if _layer_of(name) is None]
    assert not unplaced, f"add these modules to LAYERS in tests/test_architecture.py: {unplaced}"


def test_imports_only_point_down_the_layers() -> None:
    upward = []
    for module in _modules():
        mine = _layer_of(module)
        for name, line in sorted(_surgeon_imports(module)):
            theirs = _layer_of(name)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(
                    f"{module}:{line} ({LAYERS[mine][0]}) imports {name} ({LAYERS[theirs][0]})"
                )
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_replacement_layers_import_only_arithmetic_and_errors() -> None:
    outside = [
        f"{module}:{line} imports {name}"
        for module in _modules()
        if module.startswith("surgeon.layers")
        for name, line in sorted(_surgeon_imports(module))
        if not name.startswith("surgeon.layers") and name not in LAYERS_MAY_IMPORT
    ]
    assert not outside, "surgeon/layers/ reaches outside arithmetic and errors:\n" + "\n".join(
        outside
    )


def test_nothing_but_the_cli_imports_the_cli() -> None:
    importers = [
        module
        for module in _modules()
        # __main__ is `python -m surgeon` (and `torchrun -m surgeon`): the CLI's other door
        if module not in ("surgeon.cli", "surgeon.__main__")
        and any(n == "surgeon.cli" for n, _ in _imports(module))
    ]
    assert not importers, f"modules that import surgeon.cli: {importers}"


def test_no_import_cycles() -> None:
    graph = {m: {name for name, _ in _surgeon_imports(m)} for m in _modules()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for name in sorted(graph[module]):
            if state.get(name) == 1:
                return [*path[path.index(name) :], name]
            if name not in state and (cycle := visit(name)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_every_package_is_shipped() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    shipped = set(config["tool"]["setuptools"]["packages"])
    packages = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert packages <= shipped, f"add to pyproject's packages: {sorted(packages - shipped)}"
