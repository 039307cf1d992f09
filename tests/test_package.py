"""The package's shape: no import circle among its modules, and the floors
import downwards only (docs/ARCHITECTURE.md)."""

import ast
import pathlib

import jax_mxfp4_moe

ROOT = pathlib.Path(jax_mxfp4_moe.__file__).parent
# A floor may import the floors before it in this order (each sub-package is
# one floor; the vendor backends share one, and neither imports the other).
FLOORS = {"spec": 0, "numerics": 1, "runtime": 1, "layer": 2, "cuda": 3, "rocm": 3, "tools": 4,
          "nnx": 4, "selfcheck": 4}


def _modules():
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = ["jax_mxfp4_moe", *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _module_level_imports(name, path):
    """Package modules imported at module level (imports inside functions are
    lazy and run after every module has loaded: they cannot form a circle)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("jax_mxfp4_moe")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("jax_mxfp4_moe"):
                # `from pkg import sub` imports the submodule (pkg is initialised
                # before any of its submodules anyway); `from mod import name`, mod
                subs = {f"{mod}.{a.name}" for a in node.names} & MODULES
                out |= subs if len(subs) == len(node.names) else subs | {mod}
    return out


MODULES = {m for m, _ in _modules()}


def _graph():
    mods = dict(_modules())
    return {m: {d for d in _module_level_imports(m, p) if d in mods and d != m} for m, p in mods.items()}


def test_no_import_circle():
    graph = _graph()
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def _floor(module):
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the package itself: the public re-exports
    return FLOORS.get(parts[1])


def test_floors_import_downwards():
    bad = []
    for m, deps in _graph().items():
        fm = _floor(m)
        for d in deps:
            fd = _floor(d)
            if fm is None or fd is None:
                continue
            if fd > fm or (fd == fm and m.split(".")[1] != d.split(".")[1]):
                bad.append(f"{m} -> {d}")
    assert not bad, bad
