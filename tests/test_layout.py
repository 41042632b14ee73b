"""The package's import rules, read from its source: the layout cannot decay without a failing test.

The graph has one node per module of ``torch_backprop`` and one edge per import statement anywhere in
a module (top level or inside a function), relative imports resolved. ``from pkg import name`` counts
as an import of ``pkg.name`` when that is a module, else of ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "torch_backprop"
SUBPACKAGES = ("core", "firstorder", "secondorder", "pde", "optim", "cli")

# What each subpackage may import, besides itself.
ALLOWED = {
    "core": set(),
    "firstorder": {"core"},
    "secondorder": {"core"},
    "pde": {"core"},
    "optim": {"core", "pde", "secondorder"},  # the room above pde and secondorder
    "cli": {"core", "firstorder", "secondorder", "pde", "optim", "facade"},
}
# 6 for the slides' rooms; the optimisers' room sits above pde (its residual tape) and adds two levels:
# core ... module -> pde.operators -> pde.residual -> optim.least_squares -> optim.engd (or optim.kfac),
# and the pinn command one more above the optimisers.
MAX_CHAIN = 9


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The package modules that module ``name`` imports, anywhere in its source."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def room(name: str) -> str:
    """The subpackage a module lives in, ``facade`` for the top-level modules."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "facade"


def is_hub(name: str) -> bool:
    """A module of only a docstring, imports, ``__all__`` and ``__version__``: a re-export, not a level."""
    tree = ast.parse(MODULES[name].read_text())
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        if targets and all(isinstance(t, ast.Name) and t.id in ("__all__", "__version__")
                           for t in targets):
            continue
        return False
    return True


def test_the_graph_was_read():
    assert "torch_backprop.core.phases" in GRAPH["torch_backprop.core.function"]
    assert "torch_backprop.core.module" in GRAPH["torch_backprop"]
    assert len(MODULES) > 30


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_each_subpackage_imports_only_what_it_may(subpackage):
    bad = [
        f"{name} imports {target}"
        for name, targets in GRAPH.items() if room(name) == subpackage
        for target in sorted(targets)
        if room(target) != subpackage and room(target) not in ALLOWED[subpackage]
    ]
    assert not bad, "\n".join(bad)


def test_nothing_in_the_library_imports_the_command():
    bad = [
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if room(name) != "cli" and name != "torch_backprop.__main__"
        for target in targets if room(target) == "cli"
    ]
    assert not bad, "\n".join(bad)


def test_longest_import_chain():
    """Levels of dependency, counting a re-export hub as the level of what it re-exports."""
    depth: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in depth:
            below = max((level(target) for target in GRAPH[name]), default=0)
            depth[name] = below + (0 if is_hub(name) else 1)
        return depth[name]

    deepest = max(MODULES, key=level)
    assert level(deepest) <= MAX_CHAIN, f"{deepest} sits {level(deepest)} levels deep"


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_each_subpackage_states_its_import_rule(subpackage):
    doc = ast.get_docstring(ast.parse((PACKAGE / subpackage / "__init__.py").read_text()))
    assert doc and "Import rule" in doc


# The public API of the flat layout, as it was, stays importable.
PUBLIC = [
    "Activation", "AdaptiveClipping", "BackpropMLP", "GaussianNoise", "MLPFunction", "activations",
    "available_activations", "curvature", "dp_sgd_step", "functional", "get_activation",
    "ggn_vector_product", "per_sample", "register_activation", "testing",
    "input_derivatives", "laplacian", "pde",
    "ENGD", "KFAC", "residual_jacobian",
]


def test_the_public_names_stay():
    import torch_backprop

    assert sorted(torch_backprop.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(torch_backprop, name) is not None
    assert callable(torch_backprop.curvature) and callable(torch_backprop.per_sample)


@pytest.mark.parametrize(
    "path, names",
    [
        ("torch_backprop.activations", ["Activation", "register_activation", "get_activation"]),
        ("torch_backprop.functional", ["mlp", "mlp_loss"]),
        ("torch_backprop.testing", ["assert_gradients_match", "compare_gradients", "GradientError"]),
        ("torch_backprop.laplace", ["BackpropGGN", "split_last_layer"]),
        ("torch_backprop.pde", ["input_derivatives", "laplacian", "InputDerivatives"]),
    ],
)
def test_the_public_module_paths_stay(path, names):
    import importlib

    if path == "torch_backprop.laplace":
        pytest.importorskip("laplace")
    module = importlib.import_module(path)
    for name in names:
        assert hasattr(module, name), f"{path}.{name}"


def test_the_old_fused_loss_path_warns_and_works():
    import importlib
    import sys

    from torch_backprop.functional import mlp_loss

    sys.modules.pop("torch_backprop.fused_loss", None)
    with pytest.warns(DeprecationWarning, match="torch_backprop.functional"):
        old = importlib.import_module("torch_backprop.fused_loss")
    assert old.mlp_loss is mlp_loss
