"""The library's layers only look down, and no module imports itself back through others.

Every import of a `waveforge` module counts, at module level or inside a function alike (a function-level
import that dodges a circle is still a circle). The layer order is written here; a new module must be
placed in it, or this test fails naming it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "waveforge"

# Bottom to top. A module may import modules of its own layer or of layers below, never above.
LAYERS: list[tuple[str, set[str]]] = [
    ("runtime", {"config", "cli", "dist", "runtime"}),
    ("foundations", {"storage", "wavelet", "cpu_kernels", "images"}),
    ("math and parts", {"models", "diffusion", "samplers", "data"}),
    ("services", {"checkpoint", "tracking", "metrics", "proxy_features"}),
    ("use of a model", {"inference", "edm", "plan", "reference"}),
    ("training", {"meters", "steps", "checkpointer", "evaluator", "train"}),
    ("jobs", {"jobs", "submit", "sweep", "status"}),
]
LAYER_OF = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit(module: str) -> str:
    """The layer unit of a module: waveforge.models.layers -> models; waveforge (the package) -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path, module: str) -> set[str]:
    """Every waveforge module `path` imports (absolute and relative, any depth in the file)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "waveforge")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "waveforge":
                continue
            found.add(target)
            for alias in node.names:  # `from waveforge import config` imports the module waveforge.config
                found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            arg = node.args[0]  # importlib.import_module("waveforge.x") or f"waveforge.data.{name}"
            if isinstance(arg, ast.Constant) and str(arg.value).startswith("waveforge"):
                found.add(str(arg.value))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for target in imports(path, name):
            while target not in modules and "." in target:  # `from waveforge.data import X` names a symbol
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                targets.add(target)
        edges[name] = targets
    return edges


def test_every_module_has_a_layer() -> None:
    missing = sorted({unit(m) for m in graph() if unit(m)} - set(LAYER_OF))
    assert not missing, f"modules without a layer in tests/test_architecture.py: {missing}"


def test_imports_only_look_down() -> None:
    upward = []
    for src, targets in graph().items():
        for dst in targets:
            a, b = unit(src), unit(dst)
            if a and b and LAYER_OF[b] > LAYER_OF[a]:
                upward.append(f"{src} ({LAYERS[LAYER_OF[a]][0]}) imports {dst} ({LAYERS[LAYER_OF[b]][0]})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    # waveforge.data's lazy __init__ re-exports its submodules (importlib.import_module): a package facade,
    # not a circle, as long as no data submodule imports the facade.
    cycles = [c for c in cycles if not c.startswith("waveforge.data -> waveforge.data.")
              and "waveforge.data -> waveforge.data." not in c]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The walker is not blind: an import inside a function, a relative one and a dynamic one all count."""
    pkg = tmp_path / "waveforge"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from waveforge import b\n    from .c import x\n"
                              "    importlib.import_module('waveforge.d')\n")
    found = imports(pkg / "a.py", "waveforge.a")
    assert {"waveforge.b", "waveforge.c", "waveforge.d"} <= found
