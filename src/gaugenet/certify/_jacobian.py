"""The model as a function of a flat float64 parameter vector (shared by both certifiers),
and its Jacobian."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._float64_kernels import float64_kernels
from .._func import untransformable
from ..discovery._float64 import keep_float64

__all__ = [
    "FlatModel",
    "as_flat_function",
    "as_tuple",
    "flat_model",
    "flatten_out",
    "float64_throughout",
    "jacobian",
    "jacobian_of",
    "measuring",
]


def as_tuple(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def first_samples(inputs: Any, k: int) -> Any | None:
    """The first `k` samples of a batch (every tensor input sliced along its leading axis,
    which all must share); `None` when the batch is no larger or has no common axis."""
    args = as_tuple(inputs)
    sizes = {a.shape[0] for a in args if isinstance(a, Tensor) and a.ndim}
    if len(sizes) != 1 or sizes.pop() <= k:
        return None
    out = tuple(a[:k] if isinstance(a, Tensor) and a.ndim else a for a in args)
    return out if isinstance(inputs, (tuple, list)) else out[0]


def flatten_out(out: Any) -> Tensor:
    """Every tensor in a model's output (a tensor, a tuple, a dict), flattened and joined."""
    if isinstance(out, Tensor):
        return out.reshape(-1)
    if isinstance(out, dict) or hasattr(out, "values"):
        out = [v for v in out.values() if isinstance(v, Tensor)]
    parts = [flatten_out(o) for o in out if o is not None]
    return torch.cat(parts) if parts else torch.zeros(0)


_WIDE: ContextVar[bool] = ContextVar("gaugenet_float64_throughout", default=False)


@contextmanager
def float64_throughout() -> Iterator[None]:
    """Inside, every float64 measurement (`measuring`) also keeps the model's casts to a
    lower precision in float64 (`keep_float64`): for a model whose float64 copy computes the
    same function with them kept, so that float32 rounding (a float32 softmax, ...) does
    not hide exact identities. The model in its own dtype is not affected."""
    token = _WIDE.set(True)
    try:
        yield
    finally:
        _WIDE.reset(token)


@contextmanager
def measuring() -> Iterator[None]:
    """How the float64 copy is evaluated for every measurement: the fused attention kernels
    have no forward-mode derivative, so the composite path; float64 stand-ins where an
    operation has no float64 kernel (`float64_kernels`); and, inside
    `float64_throughout`, the model's casts down kept in float64."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with (
            sdpa_kernel(SDPBackend.MATH),
            float64_kernels(),
            keep_float64() if _WIDE.get() else nullcontext(),
        ):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


@dataclass(frozen=True)
class FlatModel:
    """A float64 copy of a model with its parameters as one flat vector.

    - `model`: the float64 copy (its mode kept); `args`: the inputs, floating ones in float64.
    - `theta`: `(n_params,)` the parameters in `named_parameters()` order.
    - `names`, `shapes`, `sizes`: per parameter tensor, in that order.
    """

    model: nn.Module
    args: tuple
    theta: Tensor
    names: list[str]
    shapes: list[torch.Size]
    sizes: list[int]

    def params(self, th: Tensor) -> dict[str, Tensor]:
        """The parameters by name, as views of the flat `(n_params,)` vector `th`."""
        return {n: t.reshape(s) for n, t, s in zip(self.names, th.split(self.sizes), self.shapes)}

    def call(self, th: Tensor, args: tuple) -> Tensor:
        """Every output of the model with parameters `th` on `args`, flattened."""
        buffers = dict(self.model.named_buffers())
        with measuring():
            out = torch.func.functional_call(self.model, {**self.params(th), **buffers}, args)
        return flatten_out(out)

    def f(self, th: Tensor) -> Tensor:
        """`(n_outputs,)`: every output on the inputs, flattened."""
        return self.call(th, self.args)

    def offsets(self) -> dict[str, int]:
        """Where each parameter tensor starts in the flat vector."""
        starts = torch.tensor([0, *self.sizes]).cumsum(0).tolist()
        return dict(zip(self.names, starts))


def flat_model(model: nn.Module, inputs: Any) -> FlatModel:
    """A `FlatModel` of `model` on `inputs`. Floating inputs and buffers are cast to float64
    so that the Jacobian's rank is meaningful."""
    model = copy.deepcopy(model).double()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            # the forward pass reads a padding row like any other; only its gradient is
            # masked, which would hide that row from the Jacobian
            m.padding_idx = None
    args = tuple(
        a.double() if isinstance(a, Tensor) and a.is_floating_point() else a
        for a in as_tuple(inputs)
    )
    named = list(model.named_parameters())
    theta = torch.cat([p.detach().reshape(-1) for _, p in named]) if named else torch.zeros(0)
    return FlatModel(
        model,
        args,
        theta.double(),
        [n for n, _ in named],
        [p.shape for _, p in named],
        [p.numel() for _, p in named],
    )


def as_flat_function(
    model: nn.Module, inputs: Any
) -> tuple[Callable[[Tensor], Tensor], Tensor, list[str]]:
    """`(f, theta, names)`: `f(theta)` is every output on `inputs`, flattened, with the
    parameters set from the flat float64 vector `theta` (in `named_parameters()` order).
    Floating inputs and buffers are cast to float64 so the Jacobian's rank is meaningful."""
    fm = flat_model(model, inputs)
    return fm.f, fm.theta, fm.names


def _batch_size(args: tuple) -> int | None:
    """The common leading size of the tensor inputs (`None` when there is none)."""
    sizes = {a.shape[0] for a in args if isinstance(a, Tensor) and a.ndim}
    tensors = [a for a in args if isinstance(a, Tensor)]
    if len(sizes) != 1 or any(a.ndim == 0 for a in tensors):
        return None
    return sizes.pop()


def _per_sample_jacobian(fm: FlatModel) -> Tensor | None:
    """The Jacobian assembled from per-sample Jacobians, when the model treats the samples
    (the leading axis of the inputs) independently; `None` when it cannot be computed so.

    Each sample's rows come from reverse mode on that sample alone (`vmap` over samples), so
    the work is that of one backward pass per output instead of one per output *and*
    sample. The result is checked against the whole-batch function with a random
    vector-Jacobian product; any difference (batch statistics, outputs not ordered by
    sample, a leading axis that is not the batch) means `None`, and the caller falls back
    to the whole-batch Jacobian.
    """
    n_batch = _batch_size(fm.args)
    if n_batch is None or n_batch < 2:
        return None
    dims = tuple(0 if isinstance(a, Tensor) else None for a in fm.args)

    def one(th: Tensor, *sample: Any) -> Tensor:
        return fm.call(th, tuple(a.unsqueeze(0) if isinstance(a, Tensor) else a for a in sample))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = torch.func.vmap(torch.func.jacrev(one), in_dims=(None, *dims))(
                fm.theta, *fm.args
            )
            jac = rows.reshape(-1, fm.theta.numel())
            out, vjp_fn = torch.func.vjp(fm.f, fm.theta)
    except Exception:  # an operation vmap cannot batch, data-dependent control flow, ...
        return None
    if jac.shape[0] != out.numel():
        return None
    u = _probe(out)
    return jac if _agrees(jac, u, vjp_fn(u)[0]) else None


def _probe(out: Tensor) -> Tensor:
    """The seeded random cotangent that checks a Jacobian assembled in pieces."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)


def _agrees(jac: Tensor, u: Tensor, ref: Tensor) -> bool:
    """Whether `jac` `(n_outputs, n_params)`, assembled in pieces, gives the whole batch's
    vector-Jacobian product `ref = Jᵀ u` (flattened `u`) to `1e-8` relative."""
    err = float((jac.T @ u.reshape(-1) - ref).norm())
    scale = max(float(ref.norm()), float(jac.abs().max()), 1e-300)
    return err <= 1e-8 * scale


def jacobian(model: nn.Module, inputs: Any) -> Tensor:
    """`(n_outputs, n_params)` Jacobian of all outputs on `inputs`, in float64.

    Per sample when the model treats the samples independently (checked, see
    `_per_sample_jacobian`); otherwise reverse mode vectorized with `vmap`, or forward mode
    when parameters are fewer than outputs."""
    return jacobian_of(flat_model(model, inputs))


def jacobian_of(fm: FlatModel) -> Tensor:
    """`jacobian` of a `FlatModel`."""
    jac = _per_sample_jacobian(fm)
    if jac is not None:
        return jac
    with torch.no_grad():
        n_out = fm.f(fm.theta).numel()
    # forward mode when parameters are fewer than outputs, reverse mode otherwise or after
    transforms = [torch.func.jacrev]
    if fm.theta.numel() < n_out:
        transforms.insert(0, torch.func.jacfwd)
    for transform in transforms:
        try:
            return transform(fm.f)(fm.theta)
        except NotImplementedError:  # an operation without forward-mode derivative
            continue
        except RuntimeError as exc:  # an operation torch.func cannot transform
            if not untransformable(exc):
                raise
            break
    return _looped_jacobian(fm)


def _looped_jacobian(fm: FlatModel) -> Tensor:
    """The Jacobian one output at a time by plain reverse mode: for models that `torch.func`
    cannot transform (an `autograd.Function` without `setup_context`, as in BLOOM's GELU).
    One backward pass per output, so slower, but the same matrix. Sample by sample where the
    model treats the samples independently (checked as `_per_sample_jacobian` checks): each
    pass then runs through one sample's graph, not the whole batch's."""
    jac = _looped_per_sample(fm)
    return jac if jac is not None else _looped_rows(fm, fm.args)


def _looped_rows(fm: FlatModel, args: tuple) -> Tensor:
    """`(n_outputs, n_params)`: every output on `args`, one backward pass each."""
    theta = fm.theta.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fm.call(theta, args).reshape(-1)
        rows = [
            torch.autograd.grad(out[i], theta, retain_graph=True, allow_unused=True)[0]
            for i in range(out.numel())
        ]
    if not rows:
        return torch.zeros(0, theta.numel(), dtype=theta.dtype)
    return torch.stack([torch.zeros_like(theta) if r is None else r for r in rows]).detach()


def _looped_per_sample(fm: FlatModel) -> Tensor | None:
    """`_looped_rows` of each sample alone, stacked; `None` where the samples are not
    independent (a random vector-Jacobian product of the whole batch disagrees) or the
    model does not run on one sample. A loop over samples: this is the fallback for models
    that cannot be vectorized."""
    n_batch = _batch_size(fm.args)
    if n_batch is None or n_batch < 2:
        return None
    try:
        blocks = [
            _looped_rows(fm, tuple(a[i : i + 1] if isinstance(a, Tensor) else a for a in fm.args))
            for i in range(n_batch)
        ]
    except Exception:  # the model does not run on one sample: the whole batch instead
        return None
    jac = torch.cat(blocks)
    theta = fm.theta.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fm.f(theta)
        if out.numel() != jac.shape[0]:
            return None
        u = _probe(out)
        (ref,) = torch.autograd.grad(out, theta, u, allow_unused=True)
    ref = torch.zeros_like(fm.theta) if ref is None else ref
    return jac if _agrees(jac, u, ref) else None
