"""The house rules of docs/architecture.md, checked on the source: which layer may import which, no import
cycles, transformers only in offload.hf, no torch in cache_policies, no matplotlib on import, short files."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("offload", "cache_policies", "offload_bench")

# Layer of a module, by longest matching prefix.
LAYERS = {
    "cache_policies": "policy",
    "offload.errors": "base",
    "offload.units": "base",
    "offload.offload_stats": "base",
    "offload.config": "base",
    "offload.user_cache": "base",
    "offload.torch_threads": "base",
    "offload.memory": "memory",
    "offload.kernels": "compute",
    "offload.runtime": "scheduling",
    "offload.hf": "integration",
    "offload": "surface",  # the package itself, api, cli
    "offload_bench": "bench",
}
# What each layer may import from the project: lower layers never import higher ones.
MAY_IMPORT = {
    "policy": {"policy"},
    "base": {"base", "policy"},
    "memory": {"base", "memory"},
    "compute": {"base", "memory", "compute"},
    "scheduling": {"base", "policy", "memory", "compute", "scheduling"},
    "integration": {"base", "policy", "memory", "compute", "scheduling", "integration"},
    "surface": {"base", "policy", "memory", "compute", "scheduling", "integration", "surface"},
    "bench": {"base", "policy", "memory", "compute", "scheduling", "integration", "surface", "bench"},
}
# Third-party packages only some layers may import (anywhere in a module, lazily too).
RESTRICTED = {
    "transformers": {"integration", "bench"},
    "torch": {"base", "memory", "compute", "scheduling", "integration", "surface", "bench"},
    "triton": {"compute", "bench"},  # bench: triton.testing times kernels
    "matplotlib": {"policy"},  # the sweep's plot only, imported when it draws
}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def layer_of(module: str) -> str:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer")


def imports(path: Path, name: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every import outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{name}:{child.lineno}: the project uses absolute imports only"
                base = child.module or ""
                for alias in child.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in known else base, child.lineno, top))
            else:
                inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                visit(child, inner)

    visit(tree, True)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int, bool]]]:
    found = modules()
    return {name: imports(path, name, set(found)) for name, path in found.items()}


def test_layers_import_only_downwards_and_restricted_packages_stay_in_their_layer(graph) -> None:
    problems = []
    for module, edges in graph.items():
        mine = layer_of(module)
        for target, line, _ in edges:
            top = target.split(".")[0]
            if top in PACKAGES:
                if layer_of(target) not in MAY_IMPORT[mine]:
                    problems.append(f"{module}:{line} ({mine}) imports {target} ({layer_of(target)})")
            elif top in RESTRICTED and mine not in RESTRICTED[top]:
                problems.append(f"{module}:{line} ({mine}) imports {top}")
    matplotlib_users = {m for m, edges in graph.items() for t, _, _ in edges if t.startswith("matplotlib")}
    assert matplotlib_users <= {"cache_policies.study.sweep_report"}
    assert not problems, "\n".join(problems)


def test_no_import_cycles(graph) -> None:
    edges = {m: {t for t, _, _ in e if t in graph and t != m} for m, e in graph.items()}
    # A package's __init__ importing its own submodules is how packages re-export; not a cycle by itself.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_file_over_400_lines() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for folder in (*PACKAGES, "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, "\n".join(long)


def _fresh(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)


def test_cache_policies_and_the_bench_command_import_no_torch() -> None:
    _fresh(
        "import sys, cache_policies, cache_policies.study.sweep, offload_bench.cli; "
        "offload_bench.cli.build_parser(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )


def test_offload_imports_no_matplotlib() -> None:
    _fresh(
        "import sys, offload; offload.from_pretrained; offload.stats; import offload.cli.run; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
