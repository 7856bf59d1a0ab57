"""Every rule of discovery on its own example (`gaugenet.discovery.rules`): the dimension
found is the hand-counted one, random elements keep the outputs in float64 and float32, an
element applied to part of its parameters changes them, every orbit tangent lies in ker J,
and `n_params − rank J` is what the rule says. The registry assigns each operation of the
dispatch to exactly one rule."""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaugenet
from gaugenet import GaugeError
from gaugenet._invariance import cast_floats, relative_error
from gaugenet.certify import functional_dimension
from gaugenet.certify._checks import FactorChecks, act_tolerance, check_tangents, sparse_jvp
from gaugenet.certify._jacobian import flat_model, flatten_out, jacobian_of
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery import _ops as ops
from gaugenet.discovery._trace import ATOMIC_MODULES
from gaugenet.discovery.rules import REGISTRY, RULES, Example, Registry, Rule

CASES = [(r, i) for r in RULES for i in range(len(r.examples))]
IDS = [f"{r.family}/{r.name}/{i}" for r, i in CASES]


def _outputs(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return flatten_out(model(**x) if isinstance(x, dict) else model(x))


@pytest.fixture(scope="module")
def found() -> dict:
    """`(model, inputs, group)` per case, discovered once."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r, i in CASES:
            model, x = r.examples[i].build()
            out[r.name, i] = model, x, gaugenet.symmetries(model, x)
    return out


@pytest.mark.parametrize(("rule", "i"), CASES, ids=IDS)
def test_dimension_is_declared(rule: Rule, i: int, found: dict) -> None:
    _, _, group = found[rule.name, i]
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    assert group.dim == rule.examples[i].dim, rule.examples[i].why


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("rule", "i"), CASES, ids=IDS)
def test_random_elements_keep_outputs(rule: Rule, i: int, dtype: torch.dtype, found) -> None:
    model, x, group = found[rule.name, i]
    model, x = copy.deepcopy(model).to(dtype), cast_floats(x, dtype)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        moved = group.act(model, group.sample(gen, dtype=dtype))
        err = relative_error(_outputs(moved, x), _outputs(model, x))
        assert err < act_tolerance(dtype), err


def _off_orbit(model: nn.Module, group, gen: torch.Generator) -> nn.Module:
    """`model` moved by a random step of relative size 0.1 orthogonal to every orbit tangent."""
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    step = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
    if group.dim:
        basis = torch.linalg.qr(group.tangent(model).T).Q  # (n_params, dim)
        step = step - basis @ (basis.T @ step)
    theta = theta + 0.1 * step * theta.norm() / step.norm()
    out = copy.deepcopy(model)
    with torch.no_grad():
        for n, v in zip(names, theta.split([p.numel() for p in model.parameters()])):
            out.get_parameter(n).copy_(v.reshape(out.get_parameter(n).shape))
    return out


@pytest.mark.parametrize(("rule", "i"), CASES, ids=IDS)
def test_unmatched_change_moves_outputs(rule: Rule, i: int, found: dict) -> None:
    """Negative: an element applied to all but one of the parameters it writes (the one it
    changes most) changes the outputs (an unmatched change); where the first factor writes
    one parameter only, or there is none, a random step orthogonal to the orbit does."""
    model, x, group = found[rule.name, i]
    ref = _outputs(model, x)
    gen = torch.Generator().manual_seed(4)
    cont = [f for f in group.factors if not f.discrete and f.dim > 0]
    broken = None
    if cont:
        f = cont[0]
        moved_model = group.act(model, {f.name: f.sample(gen, torch.float64, 0.5)})
        old, new = dict(model.named_parameters()), dict(moved_model.named_parameters())

        def moved(n: str) -> float:
            return float((new[n] - old[n]).detach().norm() / old[n].detach().norm())

        written = [n for n in f.params() if n in old and moved(n) > 0]
        assert written and max(moved(n) for n in written) > 1e-3
        if len(written) > 1:
            broken = moved_model
            with torch.no_grad():
                new[max(written, key=moved)].copy_(old[max(written, key=moved)])
    if broken is None:
        broken = _off_orbit(model, group, gen)
    assert relative_error(_outputs(broken, x), ref) > 1e3 * act_tolerance(torch.float64)


@pytest.mark.parametrize(("rule", "i"), CASES, ids=IDS)
def test_tangents_in_kernel_and_jacobian_count(rule: Rule, i: int, found: dict) -> None:
    model, x, group = found[rule.name, i]
    ex: Example = rule.examples[i]
    inputs = (x,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = flat_model(model, inputs)
        sigma = float(torch.linalg.matrix_norm(jacobian_of(fm), 2))
        out = FactorChecks()
        check_tangents(
            fm, group, sparse_jvp(fm), sigma, 1e-9, out, torch.Generator().manual_seed(5)
        )
        assert not out.wrong, out.wrong
        assert all(math.isfinite(v) for v in out.residuals.values())
        if ex.jacobian:
            fd = functional_dimension(model, inputs)
            want = ex.dim if ex.jacobian_dim is None else ex.jacobian_dim
            assert fd.n_params - fd.rank == want, ex.why


#: every operation the dispatch knew before the registry (the `_ops.py` tables and the
#: operations written into the dispatch itself)
_DISPATCHED = (
    *ATOMIC_MODULES,
    nn.InstanceNorm1d,
    nn.LSTM,
    nn.GRU,
    nn.RNN,
    *ops.HOMOGENEOUS_FUNCS,
    *ops.NONHOMOGENEOUS_FUNCS,
    *ops.POOL_FUNCS,
    *ops.VIEW_FUNCS,
    *ops.CASTS,
    *ops.METADATA_OPS,
    *ops.ADD_OPS,
    *ops.MUL_OPS,
    operator.getitem,
    F.pad,
    torch.cat,
    torch.matmul,
    operator.matmul,
    torch.mean,
    torch.sum,
    torch.ops.aten.addmm.default,
    torch.ops.aten.mm.default,
    getattr,
    torch.numel,
    *ops.VIEW_METHODS,
    *ops.NONHOMOGENEOUS_METHODS,
    "relu",
    "relu_",
    "__getitem__",
    "mean",
    "sum",
    "size",
    "dim",
    "numel",
    "type",
    "get_device",
)


def _op_key(op: object) -> str:
    """A name that is the same in every process (xdist workers must collect one order)."""
    if isinstance(op, str):
        return f"method:{op}"
    mod = getattr(op, "__module__", None) or ""
    name = getattr(op, "__qualname__", None) or getattr(op, "__name__", None) or repr(op)
    return f"{mod}.{name}:{op if 'OpOverload' in type(op).__name__ else ''}"


_DISPATCHED = tuple(sorted(dict.fromkeys(_DISPATCHED), key=_op_key))


@pytest.mark.parametrize("op", _DISPATCHED, ids=lambda op: getattr(op, "__name__", str(op)))
def test_every_dispatched_op_has_exactly_one_rule(op) -> None:
    owners = [r.name for r in RULES if op in r.ops()]
    assert len(owners) == 1, owners
    if isinstance(op, type):
        assert REGISTRY.for_type(op).name == owners[0]
    elif isinstance(op, str):
        assert REGISTRY.for_method(op).name == owners[0]
    else:
        assert REGISTRY.for_function(op).name == owners[0]


def test_rules_are_well_formed() -> None:
    families = {"linear", "norms", "activations", "pooling", "views", "arithmetic"}
    families |= {"attention", "recurrent", "patterns", "offset_gains", "soft_capping"}
    assert {r.family for r in RULES} == families
    for r in RULES:
        assert r.examples, r.name
        assert r.pattern == (not r.ops()), r.name
        assert all(e.why and e.dim >= 0 for e in r.examples), r.name
    assert REGISTRY.for_module(nn.LazyLinear(3)).name == "linear"  # subclasses included
    assert REGISTRY.for_type(nn.PixelShuffle) is None
    assert REGISTRY.for_function(torch.erfinv) is None


def test_registry_refuses_an_op_in_two_rules() -> None:
    linear = next(r for r in RULES if r.name == "linear")
    twin = Rule("twin", "linear", linear.handler, linear.examples, modules=(nn.Linear,))
    with pytest.raises(GaugeError, match="declared by the rules 'linear' and 'twin'"):
        Registry((*RULES, twin))
    with pytest.raises(GaugeError, match="unique"):
        Registry((*RULES, linear))


def test_discovery_dispatches_through_the_registry(monkeypatch) -> None:
    """Without ReLU in the registry, discovery refuses it: the registry is what it uses."""
    from gaugenet.discovery import _propagate

    model, x = next(r for r in RULES if r.name == "linear").examples[0].build()
    assert gaugenet.symmetries(model, x).dim == 4
    rules = tuple(
        dataclasses.replace(r, modules=tuple(m for m in r.modules if m is not nn.ReLU))
        for r in RULES
    )
    monkeypatch.setattr(_propagate, "REGISTRY", Registry(rules))
    group = gaugenet.symmetries(model, x)
    assert group.dim == 0
    assert any("module ReLU is not analyzed" in b.reason for b in group.breakers)
