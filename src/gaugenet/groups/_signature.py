"""What a gauge group knows of the model it was built for, and the checks on models it gets.

A `ModelSignature` records the parameter and buffer names and shapes, and for every
submodule its class, its configuration (the plain attributes: sizes, `eps`, an activation's
`approximate`, functions stored as attributes) and a digest of its `forward` code. Two
models with one signature run the same computation on parameters of the same layout, so a
group found for one acts correctly on the other; a ReLU network's group acting on a GELU
network of the same shapes does not (its rescalings are no symmetry there).

The digest hashes the bytecode, names and constants of `forward`, recursing into nested
code objects, so it is the same for two loads of one architecture file and differs when the
computation differs. Dtypes are not part of the signature: a group acts on any floating
dtype of its model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .._errors import GaugeError

__all__ = ["ModelSignature", "bind_to_model", "check_model", "model_signature"]

_PLAIN = (bool, int, float, str, type(None))


@functools.lru_cache(maxsize=4096)
def _code_digest(code: types.CodeType) -> str:
    h = hashlib.sha256(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for c in code.co_consts:
        h.update((_code_digest(c) if isinstance(c, types.CodeType) else repr(c)).encode())
    return h.hexdigest()[:16]


def _config_value(v: Any) -> str | None:
    if isinstance(v, _PLAIN):
        return repr(v)
    if isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v):
        return repr(tuple(v))
    if isinstance(v, (types.FunctionType, types.BuiltinFunctionType, functools.partial)):
        fn = v.func if isinstance(v, functools.partial) else v
        return f"<{getattr(fn, '__qualname__', type(fn).__name__)}>"
    return None


def _describe(m: nn.Module) -> str:
    cls = type(m)
    config = []
    for k, v in sorted(vars(m).items()):
        if k.startswith("_") or k == "training":
            continue
        text = _config_value(v)
        if text is not None:
            config.append(f"{k}={text}")
    forward = getattr(cls.forward, "__code__", None)
    digest = _code_digest(forward) if forward is not None else "builtin"
    return f"{cls.__qualname__}({', '.join(config)}) forward#{digest[:8]}"


@dataclass(frozen=True)
class ModelSignature:
    """The layout and computation of a model: `tensors` are `(name, shape)` of its parameters
    and buffers, `modules` are `(name, description)` of its submodules."""

    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    modules: tuple[tuple[str, str], ...]

    @property
    def digest(self) -> str:
        """A short hash of the whole signature (for display and comparison)."""
        return hashlib.sha256(repr((self.tensors, self.modules)).encode()).hexdigest()[:16]

    def mismatch(self, other: ModelSignature) -> str | None:
        """The first difference between the group's model (`self`) and `other`, or `None`."""
        mine, theirs = dict(self.tensors), dict(other.tensors)
        if mine.keys() != theirs.keys():
            lost, new = sorted(mine.keys() - theirs.keys()), sorted(theirs.keys() - mine.keys())
            return f"tensor names differ (missing {lost[:3]}, unexpected {new[:3]})"
        for name, shape in self.tensors:
            if theirs[name] != shape:
                return f"{name} has shape {theirs[name]}, the group's model has {shape}"
        mods, other_mods = dict(self.modules), dict(other.modules)
        for name, desc in self.modules:
            got = other_mods.get(name)
            if got != desc:
                where = f"module {name!r}" if name else "the model itself"
                return f"{where} is {got}, in the group's model it is {desc}"
        extra = sorted(other_mods.keys() - mods.keys())
        return f"unexpected modules {extra[:3]}" if extra else None


def model_signature(model: nn.Module) -> ModelSignature:
    """The `ModelSignature` of `model`."""
    tensors = [(n, tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=False)]
    tensors += [(n, tuple(b.shape)) for n, b in model.named_buffers(remove_duplicate=False)]
    modules = tuple((n, _describe(m)) for n, m in model.named_modules())
    return ModelSignature(tuple(tensors), modules)


def check_model(model: Any) -> nn.Module:
    """Raise `GaugeError`, naming the fix, unless `model` is an `nn.Module` with at least one
    parameter, all of them floating point, non-empty and finite."""
    if not isinstance(model, nn.Module):
        raise GaugeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    params = list(model.named_parameters())
    if not params:
        raise GaugeError(
            f"{type(model).__name__} has no parameters, so it has no gauge symmetries to find: "
            "pass the trained network itself (check that the factory builds its layers)"
        )
    for name, p in params:
        if not p.is_floating_point():
            raise GaugeError(
                f"parameter {name} has dtype {p.dtype}: gauge transformations need floating "
                "weights; load the float checkpoint or convert it (model.float())"
            )
        if p.numel() == 0:
            raise GaugeError(
                f"parameter {name} has shape {tuple(p.shape)}, a layer of zero width: give "
                "every layer at least one unit, or remove the empty layer"
            )
    return model


def bind_to_model(
    find: Callable[[nn.Module, Any], Any],
) -> Callable[[nn.Module, Any], Any]:
    """Decorate a group-finding function `find(model, example_inputs) -> GaugeGroup`: check
    the model first (`check_model`) and record its signature and the example inputs in the
    group it returns."""

    @functools.wraps(find)
    def wrapper(model: nn.Module, example_inputs: Any = None) -> Any:
        group = find(check_model(model), example_inputs)
        used = example_inputs if example_inputs is not None else group.example_inputs
        return dataclasses.replace(group, signature=model_signature(model), example_inputs=used)

    return wrapper
