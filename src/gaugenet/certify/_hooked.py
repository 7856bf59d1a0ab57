"""Jacobians of a `FlatModel` with a module's inputs watched or changed by hooks: what the
measured causes of a gap (`_eps_cause`, `_table_cause`) are built from."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ._jacobian import FlatModel, flatten_out

__all__ = ["PreHook", "hooked", "hooked_jacobian", "jacobian_on", "module_inputs"]

#: columns pushed through one forward pass (bounds the memory of `jacobian_on`)
_CHUNK = 128
#: `hook(module, call, x) -> x'`: replaces the first input `x` of the `call`-th call
PreHook = Callable[[nn.Module, int, Tensor], Tensor]


@contextmanager
def hooked(root: nn.Module, hooks: dict[nn.Module, PreHook]) -> Iterator[None]:
    """Within the block, each module's first positional tensor input `x` is replaced by
    `hook(module, call, x)` (`call` counts the module's calls since the forward pass of
    `root` began, from 0); calls without one are left alone."""
    handles, calls = [], {}

    def pre(mod: nn.Module, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], Tensor):  # called with keywords only
            return None
        k = calls.get(mod, 0)
        calls[mod] = k + 1
        return (hooks[mod](mod, k, args[0]), *args[1:])

    def reset(mod: nn.Module, args: tuple) -> None:
        calls.clear()

    try:
        handles.append(root.register_forward_pre_hook(reset))
        for m in hooks:
            handles.append(m.register_forward_pre_hook(pre))
        yield
    finally:
        for h in handles:
            h.remove()


def module_inputs(fm: FlatModel, module: nn.Module, th: Tensor) -> Tensor:
    """`(n_in,)`: the first input of every call of `module` (a submodule of `fm.model`) when
    the model runs with parameters `th` on its inputs, flattened and joined."""
    seen: list[Tensor] = []

    def keep(mod: nn.Module, call: int, x: Tensor) -> Tensor:
        seen.append(x.reshape(-1))
        return x

    with hooked(fm.model, {module: keep}):
        fm.call(th, fm.args)
    return torch.cat(seen)


def jacobian_on(fn: Callable[[Tensor], Tensor], theta: Tensor, v: Tensor) -> Tensor:
    """`(n_out, k)`: the Jacobian of `fn` at `theta` `(n,)` times `v` `(n, k)`, by forward
    mode over the `k` columns, `_CHUNK` at a time (reverse mode for the whole Jacobian when
    forward mode cannot run)."""
    try:
        jvp = torch.func.vmap(lambda c: torch.func.jvp(fn, (theta,), (c,))[1], chunk_size=_CHUNK)
        return jvp(v.T).T
    except (NotImplementedError, RuntimeError):
        return torch.func.jacrev(fn)(theta) @ v


class _Hooked(nn.Module):
    """`model` run with `hooks`; returns its outputs, flattened, followed by the first
    inputs of every call of `watch` (as they arrive, before its hook) when one is given."""

    def __init__(
        self, model: nn.Module, hooks: dict[nn.Module, PreHook], watch: nn.Module | None
    ) -> None:
        super().__init__()
        self.model = model
        self._hooks, self._watch = hooks, (watch,)  # a tuple: not registered as a submodule

    def forward(self, *args: object) -> Tensor:
        (watch,) = self._watch
        seen: list[Tensor] = []

        def keep(mod: nn.Module, call: int, x: Tensor) -> Tensor:
            seen.append(x.reshape(-1))
            return self._hooks[mod](mod, call, x) if mod in self._hooks else x

        hooks = self._hooks if watch is None else {**self._hooks, watch: keep}
        with hooked(self.model, hooks):
            out = flatten_out(self.model(*args))
        return torch.cat([out, *seen])


def hooked_jacobian(
    fm: FlatModel,
    hooks: dict[nn.Module, PreHook],
    v: Tensor,
    watch: nn.Module | None = None,
) -> Tensor:
    """`(n_out [+ n_in], k)`: the Jacobian of the model of `fm` run with `hooks`
    (submodules of `fm.model`) times `v` `(n_params, k)`: of its outputs, followed, when
    `watch` is given, by that of the first inputs of every call of `watch`."""
    wrapped = _Hooked(fm.model, hooks, watch)
    names = [f"model.{k}" for k in fm.names]
    flat = FlatModel(wrapped, fm.args, fm.theta, names, fm.shapes, fm.sizes)
    return jacobian_on(flat.f, fm.theta, v)
