"""Modules with parameters that discovery treats as opaque (recurrent layers such as
`nn.LSTM`, `nn.GRU`, `nn.RNN`, and any other leaf module without a rule): their symmetries
are not searched, so each is named as a breaker instead of silently adding nothing."""

from __future__ import annotations

from torch import nn

from ..groups import Breaker
from ._trace import _Tracer, is_atomic

__all__ = ["unanalyzed_breakers", "unanalyzed_modules"]

#: holders of modules or parameters, never called themselves
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def unanalyzed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(name, module)` for each module that `torch.fx` keeps whole (a leaf) although no
    rule or analyzer knows it, and that holds parameters (its own or its children's). The
    parts of an atomic module are its rule's (`nn.MultiheadAttention`'s `out_proj`, which
    its own `forward` never calls)."""
    tracer, found, atoms = _Tracer(), [], []
    for name, m in model.named_modules():
        if not name or any(name.startswith(f"{p}.") for p in [*(p for p, _ in found), *atoms]):
            continue
        if is_atomic(m):
            atoms.append(name)
            continue
        if (
            not isinstance(m, _CONTAINERS)
            and tracer.is_leaf_module(m, name)
            and next(m.parameters(), None) is not None
        ):
            found.append((name, m))
    return found


def unanalyzed_breakers(model: nn.Module) -> list[Breaker]:
    """One `Breaker` per `unanalyzed_modules` entry, naming the parameters left out."""
    out = []
    for name, m in unanalyzed_modules(model):
        params = [f"{name}.{p}" for p, _ in m.named_parameters()]
        shown = ", ".join(params[:4]) + (f", ... ({len(params)} in all)" if len(params) > 4 else "")
        beyond = (
            " beyond the difference of its input and hidden biases"
            if isinstance(m, (nn.LSTM, nn.GRU, nn.RNN))
            else ""
        )
        out.append(
            Breaker(
                name,
                f"unsupported module {type(m).__name__}: the symmetries of its parameters "
                f"({shown}) are not analysed{beyond}",
            )
        )
    return out
