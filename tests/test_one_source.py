"""One source of truth: the shipped YAML configs and the README's callback table state the defaults of the
options dataclasses (and of CurvatureScheduler's signature), and the package's imports form no cycle and reach
for no other module's private names."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import yaml

import lightning_soo
from lightning_soo import options

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_soo"
OPTIONS = {
    "KFACCallback": options.KFACOptions,
    "ShampooCallback": options.ShampooOptions,
    "GaussNewtonCallback": options.GaussNewtonOptions,
    "PSGDCallback": options.PSGDOptions,
}


def _defaults(name: str) -> dict[str, object]:
    if name in OPTIONS:
        return OPTIONS[name].defaults()
    cls = getattr(lightning_soo, name)
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def _same(value: object, default: object) -> bool:
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple)) and list(default) == list(value)
    return value == default and type(value) in (type(default), int if isinstance(default, float) else type(default))


@pytest.mark.parametrize("path", sorted((PACKAGE / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_yaml_configs_state_the_defaults(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    (entry,) = config["trainer"]["callbacks+"]
    name = entry["class_path"].rsplit(".", 1)[1]
    defaults = _defaults(name)
    for key, value in entry["init_args"].items():
        assert key in defaults, f"{path.name}: {key} is not an option of {name}"
        assert _same(value, defaults[key]), f"{path.name}: {key}={value!r}, but the default is {defaults[key]!r}"


def _readme_rows() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Callbacks") :]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `(\w+)` \|", line)
        if m:
            rows[m.group(1)] = line
    return rows


def test_readme_table_states_the_defaults() -> None:
    rows = _readme_rows()
    assert set(rows) >= {*OPTIONS, "CurvatureScheduler"}
    for name, row in rows.items():
        defaults = _defaults(name)
        pairs = re.findall(r"`(\w+)=([^`]+)`", row)
        assert pairs, name
        for key, text in pairs:
            assert key in defaults, f"README row {name}: {key} is not an option"
            value = ast.literal_eval(text)
            assert _same(value, defaults[key]), f"README row {name}: {key}={text}, default {defaults[key]!r}"


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module imported, names imported, under TYPE_CHECKING) for every lightning_soo import in ``path``."""
    tree = ast.parse(path.read_text())
    guarded = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_soo"):
            out.append((node.module, [a.name for a in node.names], id(node) in guarded))
        elif isinstance(node, ast.Import):
            out.extend((a.name, [], id(node) in guarded) for a in node.names if a.name.startswith("lightning_soo"))
    return out


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_and_no_private_imports() -> None:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        edges = set()
        for target, names, _guarded in _imports(path):
            for name in names:
                assert not (name.startswith("_") and name != "__version__"), f"{mod} imports private {target}.{name}"
                if f"{target}.{name}" in files:
                    target_mod = f"{target}.{name}"
                    edges.add(target_mod)
            if target in files and target != mod:
                edges.add(target)
        graph[mod] = edges
    # the package's own __init__ files re-export their children: edges into a package are edges to its __init__,
    # which must not import back a module that imports it
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt.startswith(node + "."):  # a package importing its own children
                continue
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):
                cycle = [*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if state.get(nxt) is None:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for mod in sorted(graph):
        if state.get(mod) is None:
            visit(mod, [mod])


def test_numerical_core_imports_no_lightning() -> None:
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        if rel[0] in ("callbacks", "app"):
            continue
        source = path.read_text()
        assert not re.search(r"^\s*(import|from) lightning(\.| |$)", source, re.M), path


def test_lazy_callbacks_are_visible() -> None:
    names = dir(lightning_soo)
    for name in ("KFACCallback", "CurvatureScheduler", "PreconditionerManager", "KFACOptions"):
        assert name in names
    assert (PACKAGE / "py.typed").exists()
