"""The package's layering, read from the source: imports go one way, and no module imports itself
back through others. Lazy imports inside functions count too: they are edges all the same."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgetune"
# Lowest first: a module may import from its own layer or a lower one, never a higher one.
LAYERS = (
    ("core", ("edgetune", "edgetune.errors", "edgetune.units", "edgetune.config", "edgetune.constants",
              "edgetune.runfiles", "edgetune.tables", "edgetune.metrics", "edgetune.hardware",
              "edgetune.shape", "edgetune.hf", "edgetune.records", "edgetune.models",
              "edgetune.templates", "edgetune.examples", "edgetune.folders", "edgetune.signals",
              "edgetune.methods")),
    ("devices", ("edgetune.devices",)),
    ("plan", ("edgetune.plan",)),
    ("train", ("edgetune.train",)),
    ("export", ("edgetune.export",)),
    ("top", ("edgetune.cli", "edgetune.__main__", "edgetune.quickstart", "edgetune.report",
             "edgetune.cache", "edgetune.merge", "edgetune.distill")),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    """The index of the most specific layer prefix that names `module`."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def imports(path: Path, known: set[str]) -> set[str]:
    """The edgetune modules `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "edgetune"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "edgetune":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if f"{node.module}.{a.name}" in known}
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def test_imports_go_down_the_layers():
    wrong = [f"{src} ({LAYERS[layer(src)][0]}) imports {dst} ({LAYERS[layer(dst)][0]})"
             for src, targets in graph().items() for dst in sorted(targets) if layer(dst) > layer(src)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_check_sees_a_wrong_way_edge(tmp_path, monkeypatch):
    """A plan module importing train is caught (the test above can fail)."""
    fake = tmp_path / "edgetune"
    (fake / "plan").mkdir(parents=True)
    (fake / "train").mkdir()
    for init in (fake / "__init__.py", fake / "plan" / "__init__.py", fake / "train" / "__init__.py"):
        init.write_text("")
    (fake / "train" / "loop.py").write_text("")
    (fake / "plan" / "bad.py").write_text("def f():\n    from edgetune.train import loop\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="edgetune.plan.bad .* imports edgetune.train.loop"):
        test_imports_go_down_the_layers()


def test_the_check_sees_a_cycle(tmp_path, monkeypatch):
    fake = tmp_path / "edgetune"
    (fake / "export").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "export" / "__init__.py").write_text("")
    (fake / "export" / "a.py").write_text("from edgetune.export import b\n")
    (fake / "export" / "b.py").write_text("def f():\n    from edgetune.export.a import g\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(pytest.fail.Exception, match="edgetune.export.a -> edgetune.export.b -> edgetune"):
        test_no_import_cycles()
