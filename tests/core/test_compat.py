"""The compatibility table: PyTorch's derivative tools on BackpropMLP and on its twin, side by side.

Each row of ``ROWS`` is one tool, run on ``BackpropMLP`` and on ``model.to_sequential()`` with the
same parameters, inputs and seed; the numbers must agree (float64, 1e-12). Where PyTorch makes a
tool impossible for a Python ``torch.autograd.Function``, the row says so and the test asserts that
BackpropMLP raises an error naming the reason (and that the twin runs). README.md's "What is
supported" table is rendered from ``ROWS`` (:func:`markdown_table`), and a test checks it is there.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import GRAD_TOLERANCE, assert_close
from torch.autograd import functional as AF
from torch.func import (
    functional_call,
    grad,
    hessian,
    jacfwd,
    jacrev,
    jvp,
    linearize,
    stack_module_state,
    vmap,
)
from torch.utils._pytree import tree_leaves

from torch_backprop import BackpropMLP, available_activations, per_sample

README = Path(__file__).resolve().parents[2] / "README.md"
ALL = tuple(available_activations())
FEW = ("tanh", "relu")  # for the slow tools (compilation, export, finite differences)
F64 = GRAD_TOLERANCE[torch.float64]
TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


@dataclass(frozen=True)
class Data:
    x: torch.Tensor  # (4, 3)
    v: torch.Tensor  # a tangent of x, (4, 3)
    cotangents: torch.Tensor  # a batch of 3 cotangents of the output, (3, 4, 2)


@dataclass(frozen=True)
class Row:
    """One tool: ``run(module, data)`` returns tensors to compare (or raises ``raises`` on ours)."""

    name: str
    group: str
    run: Callable[[torch.nn.Module, Data], Any]
    activations: tuple[str, ...] = ALL
    dropout: float = 0.0
    raises: tuple[type[BaseException], str] | None = None  # on BackpropMLP: (type, regex)
    raises_since: tuple[int, int] = (0, 0)  # the torch release that raises it; older ones: same numbers
    twin: bool = True  # whether the tool applies to the twin (per_sample does not)
    note: str = ""


def _requiring(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_()


def _input_and_parameter_grads(module, out, wrt_x, cotangent=None):
    wrt = [wrt_x, *module.parameters()]
    return torch.autograd.grad(out, wrt, cotangent if cotangent is not None else torch.ones_like(out))


def _dual(m, d):
    with fwAD.dual_level():
        return fwAD.unpack_dual(m(fwAD.make_dual(d.x, d.v))).tangent


def _checked(result: bool) -> torch.Tensor:
    return torch.tensor(float(result))


def _is_grads_batched(m, d):
    x = _requiring(d.x)
    out = m(x)
    return torch.autograd.grad(out, [x, *m.parameters()], d.cotangents, is_grads_batched=True)


def _ensemble(m, d):
    # Three members with different parameters, stacked; a vmapped forward, then one backward.
    members = [copy.deepcopy(m) for _ in range(3)]
    with torch.no_grad():
        for k, member in enumerate(members):
            for p in member.parameters():
                p.mul_(1 + 0.1 * k)
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    out = vmap(lambda p, b: functional_call(base, (p, b), (d.x,)))(params, buffers)
    out.square().sum().backward()
    return out, [p.grad for p in params.values()]


def _vmap_dropout(randomness):
    def run(m, d):
        m.train()
        params = dict(m.named_parameters())
        torch.manual_seed(7)
        out = vmap(m, randomness=randomness)(d.x.expand(3, *d.x.shape))
        return out, torch.autograd.grad(out.square().sum(), list(params.values()))

    return run


def _export(strict):
    def run(m, d):
        program = torch.export.export(m, (d.x,), strict=strict)
        x = _requiring(d.x)
        out = program.module()(x)
        return out, torch.autograd.grad(out.square().sum(), x)

    return run


def _vmap_grad(m, d):
    params = {k: p.detach() for k, p in m.named_parameters()}

    def loss(p, xb):
        return functional_call(m, p, (xb,)).square().sum()

    return list(vmap(grad(loss), in_dims=(None, 0))(params, d.x).values())


def _compiled(**options):
    def run(m, d):
        compiled = torch.compile(m, backend="aot_eager", **options)
        outs = []
        for rows in (4, 3):  # a second shape: recompiles, or (dynamic=True) reuses the graph
            x = _requiring(d.x[:rows])
            out = compiled(x)
            outs += [out, *_input_and_parameter_grads(m, out.square().sum(), x)]
        return outs

    return run


def _checkpointed(m, d):
    x = _requiring(d.x)
    out = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False)
    return out, _input_and_parameter_grads(m, out.square().sum(), x)


def _saved_on_cpu(m, d):
    x = _requiring(d.x)
    with torch.autograd.graph.save_on_cpu():
        out = m(x)
    return out, _input_and_parameter_grads(m, out.square().sum(), x)


def _anomaly(m, d):
    x = _requiring(d.x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # detect_anomaly warns that it is slow
        with torch.autograd.detect_anomaly():
            out = m(x)
            return out, _input_and_parameter_grads(m, out.square().sum(), x)


def _per_sample_compiled(m, d):
    with per_sample(m):
        torch.compile(m, backend="aot_eager", fullgraph=True)(d.x)


def _scripted(m, d):
    return torch.jit.script(m)(d.x)


def _compiled_jvp(m, d):
    return torch.compile(lambda u, w: jvp(m, (u,), (w,))[1], backend="aot_eager", fullgraph=True)(d.x, d.v)


ROWS = [
    # Forward mode.
    Row("torch.func.jvp", "forward mode", lambda m, d: jvp(m, (d.x,), (d.v,))),
    Row("torch.func.jacfwd", "forward mode", lambda m, d: jacfwd(m)(d.x)),
    Row("torch.func.linearize", "forward mode", lambda m, d: linearize(m, d.x)[1](d.v)),
    Row(
        "torch.func.hessian (jacfwd(jacrev))",
        "forward mode",
        lambda m, d: hessian(lambda u: m(u).square().sum())(d.x[0]),
    ),
    Row(
        "jacrev(jvp) (reverse over forward)",
        "forward mode",
        lambda m, d: jacrev(lambda u: jvp(m, (u,), (d.v[0],))[1])(d.x[0]),
    ),
    Row("forward_ad dual numbers", "forward mode", _dual),
    Row(
        "gradcheck(check_forward_ad, check_batched_forward_grad)",
        "forward mode",
        lambda m, d: _checked(
            torch.autograd.gradcheck(
                m, (_requiring(d.x),), check_forward_ad=True, check_batched_forward_grad=True
            )
        ),
        activations=FEW,
    ),
    Row(
        "gradgradcheck(check_fwd_over_rev)",
        "forward mode",
        lambda m, d: _checked(torch.autograd.gradgradcheck(m, (_requiring(d.x),), check_fwd_over_rev=True)),
        activations=FEW,
    ),
    Row(
        'autograd.functional.jacobian(strategy="forward-mode", vectorize=True)',
        "forward mode",
        lambda m, d: AF.jacobian(m, d.x, strategy="forward-mode", vectorize=True),
    ),
    Row(
        "jacfwd(jacfwd) (forward over forward)",
        "forward mode",
        lambda m, d: jacfwd(jacfwd(lambda u: m(u).sum()))(d.x[0]),
        activations=FEW,
        raises=(NotImplementedError, r"forward mode over forward mode.*jacfwd\(jacrev"),
        note="autograd turns forward AD off inside a Function's jvp; use jacfwd(jacrev)",
    ),
    Row(
        "torch.compile around jvp",
        "forward mode",
        _compiled_jvp,
        activations=("tanh",),
        raises=(Exception, "You must implement the jvp function"),
        raises_since=(2, 12),  # torch 2.9-2.11 compile it and give the twin's numbers
        note="Dynamo does not trace Functions that define jvp; call jvp eagerly",
    ),
    # Batched backward.
    Row("autograd.grad(is_grads_batched=True)", "batched backward", _is_grads_batched),
    Row(
        "gradcheck(check_batched_grad)",
        "batched backward",
        lambda m, d: _checked(torch.autograd.gradcheck(m, (_requiring(d.x),), check_batched_grad=True)),
        activations=FEW,
    ),
    Row(
        "autograd.functional.jacobian(vectorize=True)",
        "batched backward",
        lambda m, d: AF.jacobian(m, d.x, vectorize=True),
    ),
    Row(
        "autograd.functional.hessian(vectorize=True)",
        "batched backward",
        lambda m, d: AF.hessian(lambda u: m(u).square().sum(), d.x[0], vectorize=True),
    ),
    Row("ensembling: stack_module_state + vmap(functional_call), backward", "batched backward", _ensemble),
    # Reverse mode and transforms that already worked.
    Row("torch.func.jacrev", "reverse mode", lambda m, d: jacrev(m)(d.x)),
    Row("vmap(grad) (per-sample gradients)", "reverse mode", _vmap_grad),
    Row(
        "autograd.functional.hessian",
        "reverse mode",
        lambda m, d: AF.hessian(lambda u: m(u).square().sum(), d.x[0]),
    ),
    Row(
        "autograd.functional.hvp / vhp",
        "reverse mode",
        lambda m, d: [
            AF.hvp(lambda u: m(u).square().sum(), d.x[0], d.v[0]),
            AF.vhp(lambda u: m(u).square().sum(), d.x[0], d.v[0]),
        ],
    ),
    Row('vmap with dropout, randomness="same"', "transforms", _vmap_dropout("same"), dropout=0.3),
    Row('vmap with dropout, randomness="different"', "transforms", _vmap_dropout("different"), dropout=0.3),
    Row("torch.utils.checkpoint", "memory", _checkpointed),
    Row("torch.autograd.graph.save_on_cpu", "memory", _saved_on_cpu),
    Row("torch.autograd.detect_anomaly", "debugging", _anomaly, activations=FEW),
    Row("torch.compile(fullgraph=True)", "compilation", _compiled(fullgraph=True), activations=FEW),
    Row("torch.compile(dynamic=True)", "compilation", _compiled(dynamic=True), activations=FEW),
    Row(
        "torch.export.export(strict=True), backward through ep.module()",
        "export",
        _export(True),
        activations=FEW,
        note="the forward phase is exported; native autograd differentiates it",
    ),
    Row(
        "torch.export.export(strict=False), backward through ep.module()",
        "export",
        _export(False),
        activations=FEW,
        note="the forward phase is exported; native autograd differentiates it",
    ),
    Row(
        "per_sample around torch.compile(fullgraph=True)",
        "compilation",
        _per_sample_compiled,
        activations=("tanh",),
        raises=(RuntimeError, "per_sample cannot run inside torch.func transforms or torch.compile"),
        twin=False,
        note="per-sample results are a side effect of the backward; call the model eagerly in the block",
    ),
    Row(
        "torch.jit.script",
        "compilation",
        _scripted,
        activations=("tanh",),
        raises=(RuntimeError, r"TorchScript does not support.*to_sequential\(\)"),
        note="TorchScript cannot compile a Python autograd.Function; script model.to_sequential()",
    ),
]


def _cases():
    for row in ROWS:
        for activation in row.activations:
            yield pytest.param(row, activation, id=f"{row.name}-{activation}")


def _models(activation: str, dropout: float) -> tuple[BackpropMLP, torch.nn.Module]:
    model = BackpropMLP(
        [3, 5, 4, 2], activation, output_activation="tanh", dropout=dropout, dtype=torch.float64
    )
    return model, model.to_sequential()


def _data() -> Data:
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(4, 3, dtype=torch.float64, generator=generator)
    return Data(x, torch.randn_like(x), torch.randn(3, 4, 2, dtype=torch.float64, generator=generator))


@pytest.mark.parametrize(("row", "activation"), _cases())
def test_tool_on_backprop_mlp_and_twin(row: Row, activation: str) -> None:
    model, twin = _models(activation, row.dropout)
    data = _data()
    if row.twin:
        torch.manual_seed(0)
        expected = tree_leaves(row.run(twin, data))
        assert expected, "the tool returned no tensors"
    if row.raises is not None and TORCH >= row.raises_since:
        kind, pattern = row.raises
        with pytest.raises(kind, match=pattern):
            row.run(model, data)
        return
    torch.manual_seed(0)
    actual = tree_leaves(row.run(model, data))
    assert len(actual) == len(expected)
    for k, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a, b, F64, f"{row.name} [{k}]")


def markdown_table() -> str:
    """The README's compatibility table: per group, the tools with the same numbers, then each error."""
    lines = ["| Tools | On BackpropMLP, against `to_sequential()` |", "|---|---|"]
    groups = dict.fromkeys(row.group for row in ROWS)
    for group in groups:
        rows = [row for row in ROWS if row.group == group]
        same = [row for row in rows if row.raises is None]
        if same:
            notes = "; ".join(dict.fromkeys(row.note for row in same if row.note))
            names = ", ".join(f"`{row.name}`" for row in same)
            lines.append(f"| {group}: {names} | same numbers{f' ({notes})' if notes else ''} |")
        for row in rows:
            if row.raises is not None:
                lines.append(f"| {group}: `{row.name}` | error: {row.note} |")
    return "\n".join(lines)


def test_readme_shows_the_table() -> None:
    text = README.read_text()
    assert markdown_table() in text, (
        "README.md's compatibility table differs from tests/core/test_compat.py:\n" + (markdown_table())
    )


def test_table_names_each_tool_once() -> None:
    names = [row.name for row in ROWS]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[^|\n]+", name) for name in names)
