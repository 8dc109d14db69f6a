"""The import graph of klops (issue 31): no circle, function-level imports included, and no op module takes a
private name from another op module; shared machinery lives in the underscore modules, which anyone may import."""

import ast
import importlib.util
import re
from pathlib import Path

import klops

# The modules that are not op modules: the package's face, its dispatch rule, the tools (cli, bench*), the float64
# oracle and the nn.Module wrappers; and every module whose name starts with "_" (shared machinery).
NOT_OPS = {"klops", "klops.backend", "klops.cli", "klops.nn", "klops.reference"}
# launcher_table's "module:name" entries (klops/backend.py) are imports made when a call takes that backend.
LAUNCHER_ENTRY = re.compile(r"^(klops(?:\.\w+)+):(\w+)")


def modules() -> dict[str, Path]:
    """Every module of klops and klops.kernels by its dotted name (a package's is its __init__.py's)."""
    found = {}
    kernels = importlib.util.find_spec("klops.kernels").submodule_search_locations
    for package, folder in (("klops", Path(klops.__file__).parent), ("klops.kernels", Path(next(iter(kernels))))):
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def is_op_module(name: str) -> bool:
    """klops.<op>: a module directly under klops, not shared machinery, nor one of NOT_OPS, nor klops.bench*."""
    parts = name.split(".")
    return len(parts) == 2 and not parts[1].startswith(("_", "bench")) and name not in NOT_OPS


def imports(name: str, path: Path, known) -> list[tuple[str, str | None, int]]:
    """(module, name taken from it or None, line) of every import in the module, at any depth: ``import``,
    ``from ... import`` (relative ones resolved), launcher_table's "module:name" strings, and ``module.name`` where
    an import bound the module to a local name."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found, bound = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
            bound |= {alias.asname: alias.name for alias in node.names if alias.asname}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(part for part in (base, node.module) if part)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in known:
                    found.append((submodule, None, node.lineno))
                    bound[alias.asname or alias.name] = submodule
                else:
                    found.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and LAUNCHER_ENTRY.match(node.value):
            module, taken = LAUNCHER_ENTRY.match(node.value).groups()
            found.append((module, taken, node.lineno))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            found.append((bound[node.value.id], node.attr, node.lineno))
    return [(module, taken, line) for module, taken, line in found if module in known]


def import_graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """The modules of one import circle, the first repeated at the end, or None."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for after in sorted(graph[node]):
            if state.get(after) == "open":
                return path[path.index(after) :] + [after]
            if after not in state and (circle := visit(after)):
                return circle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_no_import_circle():
    graph = {name: {module for module, _, _ in found if module != name} for name, found in import_graph().items()}
    # the graph sees imports inside functions and launcher_table's entries
    assert "klops" in graph["klops.bench"] and "klops.kernels.divergence" in graph["klops.divergence"]
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_find_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_op_modules_take_no_private_names_from_each_other():
    """An op module may import another's public names (fused_kl, TopK, divergence_op); private helpers that two
    op modules share belong in an underscore module."""
    graph = import_graph()
    assert {"klops.divergence", "klops.topk", "klops.linear", "klops.linear_divergence", "klops.distill"} <= set(
        filter(is_op_module, graph)
    )
    taken = [
        f"{name}:{line} takes {module}.{private}"
        for name, found in graph.items()
        if is_op_module(name)
        for module, private, line in found
        if module != name and is_op_module(module) and private is not None and private.startswith("_")
    ]
    assert not taken, "\n".join(taken)


def test_setup_ships_every_subpackage():
    """setup.py lists its packages by hand: every folder of klops/ with an __init__.py must be among them, or the
    wheel (not an editable install) lacks it and `import klops.cli` fails there."""
    root = Path(klops.__file__).parent
    listed = re.search(r"^packages = (\[.*\])$", (root.parent / "setup.py").read_text(), re.MULTILINE)
    assert listed, "setup.py has no line `packages = [...]`"
    found = {".".join(("klops",) + p.parent.relative_to(root).parts) for p in root.rglob("__init__.py")}
    missing = found - set(ast.literal_eval(listed.group(1)))
    assert {"klops", "klops.integrations", "klops.trainers"} <= found and not missing, missing
