"""The import map of the repository (README "Layout"): imports point down only.

- `magi_train` is the core: it never imports `magi_infer` (the serving app) or `tools`.
- `magi_train/model` is single-process code: it imports nothing from `magi_train/parallel`
  (parallelism enters through `parallelize_dit` and the layer spec).
- No import cycles between files, counting imports inside functions too (a lazy import is still a
  dependence, only a deferred one).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("magi_train", "magi_infer")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _imported(path: Path, name: str, known: Set[str]) -> Set[str]:
    """Project modules that file `path` (module `name`) imports anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: Set[str] = set()

    def resolve(target: str) -> None:
        # `from a.b import c`: c may be a module (a.b.c) or a name in a.b.
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                full = f"{module}.{alias.name}"
                resolve(full if full in known else module)
    found.discard(name)
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imported(path, name, known) for name, path in modules.items()}


def test_graph_sees_the_packages():
    graph = _graph()
    assert "magi_train.model.dit" in graph and "magi_infer.engine" in graph
    # The walker must find real edges, or every test below passes vacuously.
    assert "magi_train.config.schema" in graph["magi_train.model.dit"]


def test_core_never_imports_the_apps():
    bad = sorted(f"{src} imports {dst}" for src, dsts in _graph().items() if src.startswith("magi_train")
                 for dst in dsts if dst.startswith("magi_infer"))
    assert not bad, "magi_train is the core; it must not import magi_infer:\n" + "\n".join(bad)


def test_model_imports_no_parallelism():
    bad = sorted(f"{src} imports {dst}" for src, dsts in _graph().items() if src.startswith("magi_train.model")
                 for dst in dsts if dst.startswith("magi_train.parallel"))
    assert not bad, "magi_train/model is single-process code:\n" + "\n".join(bad)


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ importing its own submodules is how packages re-export; that edge and the
    # submodule's import of a sibling through the package do not make a cycle between files.
    for name in graph:
        graph[name] = {d for d in graph[name] if not (name.startswith(d + ".") or d.startswith(name + "."))}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_source_file_over_600_lines():
    too_long = []
    for folder in (*PACKAGES, "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > 600:
                too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not too_long, "files over 600 lines:\n" + "\n".join(too_long)


def test_megatron_enters_only_through_mcore():
    # magi_train/mcore.py imports megatron-core with its torch.compile decorations deferred (half of a process's
    # start-up otherwise); a module that imported megatron directly, first, would undo that for the process.
    bad = []
    for folder in (*PACKAGES, "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "magi_train" / "mcore.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                        if n == "megatron" or n.startswith("megatron.")]
    assert not bad, "import megatron-core names from magi_train.mcore:\n" + "\n".join(bad)
