"""klops/reference.py is an independent oracle: it imports nothing from klops, whose code it checks."""

import ast
from pathlib import Path

import klops.reference


def test_reference_imports_nothing_from_klops():
    tree = ast.parse(Path(klops.reference.__file__).read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
    modules = [alias.name for node in imports if isinstance(node, ast.Import) for alias in node.names]
    modules += ["." * node.level + (node.module or "") for node in imports if isinstance(node, ast.ImportFrom)]
    assert modules, "no imports found"
    assert not [m for m in modules if m.startswith((".", "klops"))], modules
