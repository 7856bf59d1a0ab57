"""What a factor touches, and checking a transformed part of a model where it lives.

Factors that share a tensor are processed together (a *component*). A component's
tensors belong to modules; their deepest common module (e.g. `model.layers.3.mlp`) is
where the component is checked: that module alone is built in float64 from the
checkpoint's tensors, run on random inputs of the shapes it received during a meta-device
forward pass, and its outputs must not change when the component's element is applied.
A component whose common module is the whole model, is larger than the budget, or holds
buffers the checkpoint lacks cannot be checked locally.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .._errors import GaugeError
from ..discovery._inputs import without_cache
from ..groups import AbstractFactor
from ..groups._base import State

__all__ = ["Component", "components", "local_change", "record_inputs"]

#: relative output change (float64) above which a local check fails
LOCAL_TOL = 1e-8


class Component:
    """Factors sharing tensors: `factors`, their `params` and their common `module`."""

    def __init__(self, factors: Sequence[AbstractFactor]) -> None:
        self.factors = list(factors)
        self.params = sorted({p for f in self.factors for p in f.params()})
        mods = [p.rpartition(".")[0].split(".") for p in self.params]
        common: list[str] = []
        for parts in zip(*mods):
            if len(set(parts)) > 1:
                break
            common.append(parts[0])
        self.module = ".".join(common)


def components(factors: Sequence[AbstractFactor]) -> list[Component]:
    """The factors grouped into components (union-find over shared tensor names)."""
    parent = list(range(len(factors)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, f in enumerate(factors):
        for p in f.params():
            if p in owner:
                parent[find(i)] = find(owner[p])
            else:
                owner[p] = i
    groups: dict[int, list[AbstractFactor]] = {}
    for i, f in enumerate(factors):
        groups.setdefault(find(i), []).append(f)
    return [Component(fs) for fs in groups.values()]


def _as_meta(x: Any) -> Any:
    if isinstance(x, Tensor):
        return torch.empty(tuple(int(d) for d in x.shape), dtype=x.dtype, device="meta")
    return x


def record_inputs(model: nn.Module, call: dict[str, Any]) -> dict[str, tuple[tuple, dict]]:
    """The inputs (as meta tensors: shapes and dtypes) every submodule receives when
    `model(**call)` runs. The model is run by `torch.export` (non-strict), which traces
    with fake tensors: a plain meta-device forward fails where a model reads a value (a
    mask's `.all()`, say), without the key-value cache a Hugging Face decoder would return
    (`use_cache=False` where `forward` takes it, as discovery runs it)."""
    _, call = without_cache(model, ((), dict(call)))
    seen: dict[str, tuple[tuple, dict]] = {}
    hooks = []
    for name, m in model.named_modules():

        def hook(_m, args, kwargs, name=name):
            if name not in seen:
                seen[name] = tree_map(_as_meta, (tuple(args), dict(kwargs)))

        hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.export(model, (), call, strict=False)
    except Exception as exc:  # export raises many types; all mean "cannot run it"
        raise GaugeError(
            f"cannot run {type(model).__name__} on the meta device to see its layers' input "
            f"shapes: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for h in hooks:
            h.remove()
    return seen


def _random_like(x: Any, gen: torch.Generator) -> Any:
    if not isinstance(x, Tensor):
        return x
    if x.is_floating_point():
        return torch.randn(x.shape, generator=gen, dtype=torch.float64)
    if x.dtype == torch.bool:
        return torch.ones(x.shape, dtype=torch.bool)
    return torch.zeros(x.shape, dtype=x.dtype)


def local_change(
    meta_model: nn.Module,
    comp: Component,
    inputs: tuple[tuple, dict],
    read: Callable[[str], Tensor],
    new: State,
    *,
    budget: int,
    seed: int = 0,
) -> float | str:
    """Largest relative change of `comp.module`'s float outputs (float64, random inputs of
    the recorded shapes) when the tensors in `new` replace the checkpoint's; or, as a
    string, why it cannot be checked (`budget`: most entries the module may hold)."""
    if not comp.module:
        return "its tensors span the whole model"
    sub = meta_model.get_submodule(comp.module)
    state = sub.state_dict(keep_vars=True)
    size = sum(t.numel() for t in state.values())
    if size > budget:
        return f"{comp.module} holds {size} entries, over the budget of {budget}"
    names = {n for n, _ in sub.named_buffers()} - set(state)
    if names:
        return f"{comp.module} has buffers the checkpoint lacks ({sorted(names)[:2]})"
    local = copy.deepcopy(sub).to_empty(device="cpu").double().eval()
    prefix = comp.module + "."
    before = {k: read(prefix + k).double() for k in state}
    after = dict(before)
    after.update({k[len(prefix) :]: v.double() for k, v in new.items()})
    gen = torch.Generator().manual_seed(seed)
    args, kwargs = tree_map(lambda x: _random_like(x, gen), inputs)
    with torch.no_grad():
        y0 = _floats(torch.func.functional_call(local, before, args, kwargs))
        y1 = _floats(torch.func.functional_call(local, after, args, kwargs))
    if len(y0) != len(y1) or not y0:
        return f"{comp.module} returns no float output"
    scale = max(float(y.abs().max()) for y in y0) or 1.0
    return max(float((a - b).abs().max()) for a, b in zip(y1, y0)) / scale


def _floats(out: Any) -> list[Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]
