"""The dependency rule of docs/ARCHITECTURE.md, checked on the source: every module of the package (kernels/ and
export/ under their installed names) sits in exactly one layer of its ```layers block, each import, at the top of
a file or inside a function, reaches only the importer's layer or a lower one, and no imports form a cycle."""

import ast
import os
import re
from fnmatch import fnmatch

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
PACKAGES = {"lfm_fast": "lfm_fast", "lfm_fast.kernels": "kernels", "lfm_fast.export": "export"}


def layers(text: str) -> list[tuple[int, str, list[str]]]:
    """(rank, name, module globs) of each line of the first ```layers block."""
    block = re.search(r"```layers\n(.*?)```", text, re.S).group(1)
    out = []
    for line in block.strip().splitlines():
        head, globs = line.split(":", 1)
        rank, name = head.split()
        out.append((int(rank), name, globs.split()))
    return out


def modules() -> dict[str, str]:
    """Module name → file, for every .py of the installed packages."""
    found = {}
    for package, folder in PACKAGES.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))[:-3].replace(os.sep, ".")
                    rel = rel.removesuffix("__init__").rstrip(".")
                    found[f"{package}.{rel}" if rel else package] = os.path.join(dirpath, f)
    return found


def imports(name: str, path: str, known) -> set[str]:
    """The package's modules `path` imports anywhere in it (an imported name that is a module counts as that
    module; otherwise the module it comes from)."""
    def owner(dotted):
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted

    is_package = path.endswith("__init__.py")
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {owner(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package upwards
                parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(parts + ([base] if base else []))
            out |= {owner(f"{base}.{a.name}") for a in node.names}
    return {m for m in out if m and m != name}


def graph():
    found = modules()
    return found, {m: imports(m, p, found) for m, p in found.items()}


def rank_of(module: str, table) -> list[int]:
    return [rank for rank, _, globs in table if any(fnmatch(module, g) for g in globs)]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def table():
    with open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")) as f:
        return layers(f.read())


def test_every_module_in_one_layer_and_imports_only_downwards(table):
    found, edges = graph()
    assert len(found) > 40  # the walk found the package
    placed = {m: rank_of(m, table) for m in found}
    assert {m: r for m, r in placed.items() if len(r) != 1} == {}, "modules in no layer or in two"
    upward = sorted(f"{m} ({placed[m][0]}) imports {d} ({placed[d][0]})" for m, ds in edges.items() for d in ds
                    if placed[d][0] > placed[m][0])
    assert upward == []


def test_no_import_cycles():
    assert cycles(graph()[1]) == []


def test_the_checks_catch_a_back_edge_and_a_cycle(table, tmp_path):
    """The checker itself: a cycle, the layers of known modules, and imports inside functions and relative ones
    (the config ↔ models.dit cycle this cut hid in a function-level import)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert rank_of("lfm_fast.models.dit", table) == [1] and rank_of("lfm_fast.config", table) == [3]
    assert rank_of("lfm_fast.train.loop", table) == [3] and rank_of("lfm_fast.kernels.attention", table) == [1]
    src = tmp_path / "dit.py"
    src.write_text("import torch\nfrom . import cond\n\ndef load():\n    from lfm_fast.config import validate\n")
    known = {"lfm_fast.models.dit", "lfm_fast.models.cond", "lfm_fast.config"}
    assert imports("lfm_fast.models.dit", str(src), known) == {"lfm_fast.models.cond", "lfm_fast.config"}
