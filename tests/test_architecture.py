"""The import rules of the source tree, read with `ast`: library code never imports a tool or a benchmark, and
no two modules import each other (docs/development.md, the map of the rooms)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# source folder -> the package name it installs as (setup.cfg's package_dir)
PACKAGES = {"gcvit": "gcvit", "data": "gcvit_data"}
# Command-line tools (python -m X) besides every module with a `__main__` guard: their helpers count as
# tools too. The data package's bench*, pack, prepare* and verify are tools by name.
TOOLS = re.compile(r"gcvit\.(bench|predict|export|doctor|plot|summary|convert|config_docs)(\..*)?"
                   r"|gcvit_data\.(bench\w*|pack|prepare\w*|verify)")
BENCHMARKS = re.compile(r"benchmarks(\..*)?")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p))
            for top in PACKAGES for p in sorted((REPO / top).rglob("*.py"))}


SOURCES = _sources()


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (never executed, so no dependency)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def _lazy_exports() -> dict[str, str]:
    """gcvit/__init__.py's lazily imported names -> the module each comes from (its _HOME table)."""
    tree = ast.parse((REPO / "gcvit" / "__init__.py").read_text())
    home = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "_HOME" for t in n.targets))
    return {**ast.literal_eval(home), "models": "gcvit.models"}


LAZY = _lazy_exports()


def _imports(name: str, tree: ast.Module) -> set[str]:
    """Every module `name` imports, at the top or inside a function: `from pkg import mod` names pkg.mod;
    `gcvit.create_model` (a name gcvit/__init__.py imports on first use) names the module it comes from."""
    package = name if tree is SOURCES.get(name) and _is_package(name) else name.rpartition(".")[0]
    skipped, found = _type_checking_only(tree), set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "gcvit"
                and node.attr in LAZY):
            found.add(LAZY[node.attr])
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                lazy = LAZY.get(alias.name) if base == "gcvit" else None  # from gcvit import create_model
                found.add(sub if sub in SOURCES else lazy or base)
    return {m for m in found if m != name}


def _is_package(name: str) -> bool:
    top, *rest = name.split(".")
    folder = {v: k for k, v in PACKAGES.items()}[top]
    return (REPO / folder / Path(*rest) / "__init__.py").is_file() if rest else True


GRAPH = {name: _imports(name, tree) for name, tree in SOURCES.items()}


def _is_main(tree: ast.Module) -> bool:
    """The module has an `if __name__ == "__main__":` block (it is run with python -m)."""
    return any(isinstance(n, ast.If) and isinstance(n.test, ast.Compare) and isinstance(n.test.left, ast.Name)
               and n.test.left.id == "__name__" for n in tree.body)


TOOL_MODULES = {name for name, tree in SOURCES.items() if TOOLS.fullmatch(name) or _is_main(tree)}


def test_the_rules_see_the_tree():
    """A negative control: the graph knows the modules and edges every run depends on."""
    assert {"gcvit.config", "gcvit.engine.loop", "gcvit_data.loaders", "gcvit.doctor"} <= set(GRAPH)
    assert "gcvit.engine.distributed" in GRAPH["gcvit.engine.loop"]
    assert {"gcvit.bench", "gcvit.config_docs", "gcvit_data.verify", "gcvit.doctor",
            "gcvit.doctor.cluster"} <= TOOL_MODULES
    assert not TOOL_MODULES & {"gcvit.config", "gcvit.engine.loop", "gcvit.models.gcvit", "gcvit_data.dali"}


@pytest.mark.parametrize("name", sorted(set(GRAPH) - TOOL_MODULES))
def test_library_imports_no_tool(name):
    """Tools import the library, never the reverse: a shared helper lives in a library module."""
    bad = sorted(m for m in GRAPH[name] if m in TOOL_MODULES or TOOLS.fullmatch(m) or BENCHMARKS.fullmatch(m))
    assert not bad, f"{name} (library) imports the command-line tool or benchmark {', '.join(bad)}"


# Layers below the engine: the model knows nothing of training or data, the data pipeline nothing of gcvit.
LAYERS = {"gcvit.models": re.compile(r"gcvit\.(engine|config|doctor)(\..*)?|gcvit_data(\..*)?"),
          "gcvit_data": re.compile(r"gcvit(\..*)?")}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_lower_layers_import_nothing_above_them(layer):
    """gcvit/models imports no engine, config or data module; the data package's pipeline imports no gcvit."""
    members = [m for m in GRAPH if (m == layer or m.startswith(layer + ".")) and m not in TOOL_MODULES]
    assert members
    bad = sorted(f"{m} -> {d}" for m in members for d in GRAPH[m] if LAYERS[layer].fullmatch(d))
    assert not bad, f"{layer} reaches above its layer: {', '.join(bad)}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph's modules (depth-first search), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in graph:
                continue  # outside the tree (torch, the standard library)
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Cycles of the graph, each found one cut at its last edge before searching again (all are reported)."""
    graph, found = {k: set(v) for k, v in graph.items()}, []
    while cycle := _cycle(graph):
        found.append(" -> ".join(cycle))
        graph[cycle[-2]].discard(cycle[-1])
    return found


def test_cycle_search_finds_function_level_cycles():
    """A negative control on a made-up graph: a -> b -> c -> a is found, a tree is not."""
    assert _cycles({"a": {"b"}, "b": {"c", "os"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert _cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    tree = ast.parse("def f():\n    from gcvit.engine import loop\n")
    assert "gcvit.engine.loop" in _imports("gcvit.engine.metrics", tree)
    lazy = ast.parse("import gcvit\nfrom gcvit import list_models\n\n"
                     "def f():\n    return gcvit.create_model('x'), gcvit.load_checkpoint\n")
    found = _imports("gcvit.engine.metrics", lazy)
    assert {"gcvit.models", "gcvit.models.checkpoint", "gcvit.variants"} <= found


def test_no_two_modules_import_each_other():
    """The module graph (function-level imports included) has no cycle: each room can be read on its own."""
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
