"""surgeon/layers is the bottom of the replacement stack: it imports only `surgeon.arithmetic`
and `surgeon.errors` from the package, nothing private from anywhere, and no private torch API."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import surgeon.layers

ROOT = Path(surgeon.layers.__file__).resolve().parents[2]
LAYERS = sorted(Path(surgeon.layers.__file__).parent.glob("*.py"))
ALLOWED = ("surgeon.arithmetic", "surgeon.errors", "surgeon.layers")
PRIVATE_TORCH = re.compile(r"\btorch\.(_\w|utils\._|nn\.modules\.\w+\._)|\b_C\.")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import statement in `path`."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def test_layers_import_only_arithmetic_errors_and_each_other() -> None:
    wrong = [
        f"{path.name}: {module}"
        for path in LAYERS
        for module, _ in _imports(path)
        if module.split(".")[0] == "surgeon" and not module.startswith(ALLOWED)
    ]
    assert LAYERS and not wrong, f"layers import from above them: {wrong}"


def test_nothing_private_is_imported_from_layers_or_into_them() -> None:
    sources = sorted({*(ROOT / "surgeon").rglob("*.py"), *(ROOT / "tests").glob("*.py")})
    wrong = [
        f"{path.relative_to(ROOT)}: from {module} import {name}"
        for path in sources
        for module, names in _imports(path)
        for name in names
        if name.startswith("_")
        and (module.startswith("surgeon.layers") or path.parent.name == "layers")
    ]
    assert not wrong, f"private names imported across modules: {wrong}"


def test_layers_use_no_private_torch_api() -> None:
    wrong = [
        f"{path.name}:{number}: {line.strip()}"
        for path in LAYERS
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_TORCH.search(line)
    ]
    assert not wrong, f"private torch APIs in surgeon/layers: {wrong}"
