"""The house rules, read from the code itself: every import of every module (ast, lazy imports
inside functions included), no cycles between modules, and arrows only pointing down.

Rooms (DESIGN.md, "Layout"): `services/engine` is the runtime and knows nothing of KV transport,
routers, slots, HTTP or Redis; `kvtransfer` moves bytes and knows no node, role or router; the
router's decision code is pure (no gRPC, Redis or HTTP); nothing in `services` imports `bench`, and
only the composition root (the `nitsum` command line and the launcher) wires the router and the
roles in: the slot process gets its roles injected; the two roles do not know each other.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("services", "router", "prefill_node", "decode_node", "kvtransfer", "bench")
THIRD_PARTY_IO = ("grpc", "redis", "fastapi", "httpx", "uvicorn", "starlette")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every name this module imports, as absolute dotted names (`from a import b` gives a.b)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _target(imported: str) -> str | None:
    """The project module an imported name lives in (the longest module prefix), if any."""
    parts = imported.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}
EDGES = {name: {t for i in names if (t := _target(i)) is not None and t != name} for name, names in IMPORTS.items()}


def _in(module: str, *rooms: str) -> bool:
    return any(module == r or module.startswith(r + ".") for r in rooms)


def _composition_root(module: str) -> bool:
    """`nitsum` and its subcommand modules, and `nitsum up`: where the rooms are wired together."""
    last = module.rsplit(".", 1)[-1]
    return module in ("services.cli", "services.launch") or last in ("cli", "__main__") or last.endswith("_cli")


FORBIDDEN: list[tuple[str, tuple[str, ...], tuple[str, ...], object]] = [
    ("the engine is the runtime only", ("services.engine",),
     ("kvtransfer", "router", "services.node", "services.gateway", "services.cluster", "prefill_node", "decode_node"),
     None),
    ("kvtransfer moves bytes: no node, role or router", ("kvtransfer",),
     ("services.node", "prefill_node", "decode_node", "router"), None),
    ("services never import bench", ("services",), ("bench",), lambda m: not _composition_root(m)),
    ("only the composition root wires in the router and the roles", ("services",),
     ("router", "prefill_node", "decode_node"), lambda m: not _composition_root(m)),
    ("the prefill role does not know the decode role", ("prefill_node",), ("decode_node",), None),
    ("the decode role does not know the prefill role", ("decode_node",), ("prefill_node",), None),
]


def _violations() -> list[str]:
    out = []
    for why, sources, targets, applies in FORBIDDEN:
        for module, deps in sorted(EDGES.items()):
            if not _in(module, *sources) or (applies is not None and not applies(module)):  # type: ignore[operator]
                continue
            out += [f"{module} -> {d} ({why})" for d in sorted(deps) if _in(d, *targets)]
    return out


def test_no_import_goes_against_the_arrows() -> None:
    bad = _violations()
    assert not bad, "imports against the layout:\n  " + "\n  ".join(bad)


def test_the_routers_decision_code_does_no_io() -> None:
    pure = [m for m in MODULES if _in(m, "router.decide")]
    assert pure, "router/decide/ holds the pure decision code"
    bad = [f"{m} imports {i}" for m in pure for i in sorted(IMPORTS[m])
           if i.split(".")[0] in THIRD_PARTY_IO or _target(i) not in (None, *[x for x in MODULES
                                                                            if _in(x, "router.decide", "services.tiers")])]
    assert not bad, "router/decide must be pure (no gRPC, Redis, HTTP, nor modules that do it):\n  " + "\n  ".join(bad)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(EDGES[v]):
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

    for v in sorted(EDGES):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_modules() -> None:
    cycles = _cycles()
    assert not cycles, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("limit, what", [(400, "lines in a module")])
def test_modules_and_functions_stay_small(limit: int, what: str) -> None:
    long_modules = [f"{m}: {n}" for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > limit]
    assert not long_modules, f"over {limit} {what}:\n  " + "\n  ".join(long_modules)
    long_functions = []
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 60:
                    long_functions.append(f"{m}.{node.name}: {length} lines")
    assert not long_functions, "functions over 60 lines:\n  " + "\n  ".join(long_functions)


def test_the_rules_see_the_imports_they_judge() -> None:
    """The checker itself: it resolves relative and lazy imports (a test that cannot fail is none)."""
    deps = defaultdict(set, EDGES)
    assert "services.engine.engine" in deps["services.engine"]  # the package's re-export
    assert any(_in(d, "services.engine") for d in deps["services.node.slot"])  # absolute
    assert "services.cluster.schema" in deps["services.cluster.client"]  # relative (`from .schema`)
