"""The library's modules import each other in one direction: no import cycles (imports inside
functions included), codecs never import kernels, the container format is a leaf, and no module
imports another package's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.tools.blocked_imports import block_imports

PACKAGE = Path(__file__).resolve().parents[1] / "kvstore"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, str]]:
    """(imported module, imported name or "") of every ``kvstore`` import anywhere in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kvstore":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((full, "") if full in known else (node.module, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "kvstore"]
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {target for target, _ in imports(path, known) if target != name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_check_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_codecs_do_not_import_kernels_and_the_container_is_a_leaf():
    edges = graph()
    codecs_to_kernels = [(a, b) for a, targets in edges.items() for b in targets
                         if package(a) == "kvstore.codecs" and package(b) == "kvstore.kernels"]
    assert codecs_to_kernels == []
    assert edges["kvstore.format.container"] <= {"kvstore.errors", "kvstore.format.dtypes", "kvstore.format.signed"}
    for leaf in ("kvstore.format.dtypes", "kvstore.format.signed", "kvstore.errors"):
        assert edges[leaf] <= {"kvstore.errors"}, leaf


def test_the_torch_references_import_no_triton():
    for name in ("kvstore.kernels.torch_ops", "kvstore.kernels.rans_streams", "kvstore.kernels.rans_encode_plan",
                 "kvstore.kernels.support", "kvstore.codecs.devices"):
        tree = ast.parse(modules()[name].read_text())
        top = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not any(n.split(".")[0] == "triton" for n in names), name
        assert not any(n in ("kvstore.kernels.rans_decode", "kvstore.kernels.rans_encode") for n in names), name


def test_no_private_names_across_packages():
    known = modules()
    private = [(name, f"{target}.{imported}") for name, path in known.items()
               for target, imported in imports(path, known)
               if imported.startswith("_") and package(target) != package(name)]
    assert private == []


def test_the_torch_references_run_without_triton():
    script = block_imports(("triton",), "blocked") + """
import numpy as np, torch
from kvstore.codecs import rans
from kvstore.codecs.symbol_model import FrequencyTable
from kvstore.kernels import decode_rans, encode_rans, triton_available
from kvstore.kernels.torch_ops import rans_decode_ref, rans_encode_ref
symbols = np.random.default_rng(0).integers(0, 16, size=(4, 1000)).astype(np.uint8)
table = FrequencyTable.from_counts(np.bincount(symbols.ravel(), minlength=256)[None, :] + 1)
data = rans.encode(symbols, table)
assert rans_encode_ref(torch.from_numpy(symbols), table) == bytes(data)
assert np.array_equal(rans_decode_ref(data, table, shape=symbols.shape).numpy(), symbols)
assert np.array_equal(decode_rans(data, table, shape=symbols.shape).numpy(), symbols)
assert encode_rans(torch.from_numpy(symbols), table) == bytes(data)
assert not triton_available() and "triton" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_importing_kvstore_loads_no_jit_compiler():
    """vLLM scans every loaded module's globals at engine start and trips over llvmlite's
    (numba's) ffi object: importing the library, as the connector does, must not load them."""
    script = "import sys, kvstore, kvstore.store, kvstore.sync; " \
             "print(sorted(m for m in ('numba', 'llvmlite') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
