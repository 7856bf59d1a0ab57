"""A slice of the parameters: a subset `S` of parameter entries, the others frozen.

The measured side is `|S| − rank J_S`, with `J_S` the columns of the Jacobian for the
entries of `S`: the dimension of `ker J ∩ ℝ^S`, the redundancy of the model that moves only
entries of `S`. It is formed exactly (dense, float64), by forward mode over the columns of
`S` or, when the outputs are fewer than `|S|` times the samples, by reverse mode sample by
sample; the frozen entries cost nothing but the forward pass they take part in. So a slice
of a large model is certified at the price of `|S|` (or `n_outputs`) passes, not `n_params`.

Entries are given as `{parameter name: mask or indices}`: a boolean tensor of the
parameter's shape, or an integer tensor of flat indices into it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ._jacobian import FlatModel, as_tuple, flatten_out, measuring

__all__ = ["Slice", "slice_entries", "slice_jacobian"]

#: the columns of `J_S` formed at once in forward mode
_CHUNK = 64
#: the samples whose rows are formed at once in reverse mode
_SAMPLES = 16


@dataclass(frozen=True)
class Slice:
    """The entries of a slice, in the model's parameter order.

    - `names`: the parameters with entries in the slice; `index`: per name, the sorted flat
      indices `(k,)` of its entries.
    - `columns`: `(|S|,)` their positions in the flat parameter vector of the model.
    """

    names: tuple[str, ...]
    index: tuple[Tensor, ...]
    columns: Tensor

    @property
    def size(self) -> int:
        return int(self.columns.numel())

    @property
    def sizes(self) -> list[int]:
        return [int(i.numel()) for i in self.index]


def _as_index(name: str, spec: object, shape: torch.Size) -> Tensor:
    """The sorted distinct flat indices of a mask or an index tensor for parameter `name`."""
    if not isinstance(spec, Tensor):
        raise GaugeError(
            f"params[{name!r}] must be a boolean mask or an integer index tensor, "
            f"got {type(spec).__name__}"
        )
    numel = int(torch.Size(shape).numel())
    if spec.dtype == torch.bool:
        if spec.shape != shape:
            raise GaugeError(
                f"params[{name!r}]: the mask has shape {tuple(spec.shape)}, the parameter "
                f"{tuple(shape)}"
            )
        return spec.reshape(-1).nonzero().flatten()
    if spec.is_floating_point() or spec.is_complex():
        raise GaugeError(
            f"params[{name!r}] must be a boolean mask or integer flat indices, got {spec.dtype}"
        )
    idx = spec.reshape(-1).long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise GaugeError(
            f"params[{name!r}]: flat indices must lie in [0, {numel}), got "
            f"{int(idx.min())}..{int(idx.max())}"
        )
    return torch.unique(idx)


def slice_entries(fm: FlatModel, params: Mapping[str, object]) -> Slice:
    """The `Slice` of `fm` named by `params` (`{name: boolean mask | flat indices}`);
    `GaugeError` for an unknown name, a mask of the wrong shape, indices out of range or an
    empty slice."""
    if not isinstance(params, Mapping):
        raise GaugeError(
            f"params must map parameter names to masks or indices, got {type(params).__name__}"
        )
    shapes = dict(zip(fm.names, fm.shapes))
    unknown = [k for k in params if k not in shapes]
    if unknown:
        raise GaugeError(
            f"params names no parameter of the model: {unknown}; parameters are "
            f"{fm.names[:6]}{' ...' if len(fm.names) > 6 else ''}"
        )
    starts = fm.offsets()
    names, index, columns = [], [], []
    for name in fm.names:  # model order
        if name not in params:
            continue
        idx = _as_index(name, params[name], shapes[name])
        if idx.numel():
            names.append(name)
            index.append(idx)
            columns.append(idx + starts[name])
    if not names:
        raise GaugeError("the slice is empty: params selects no parameter entry")
    return Slice(tuple(names), tuple(index), torch.cat(columns))


def _part_sizes(out: object) -> list[int]:
    """The sizes of the tensors `flatten_out` joins, in its order."""
    if isinstance(out, Tensor):
        return [out.numel()]
    if isinstance(out, dict) or hasattr(out, "values"):
        out = [v for v in out.values() if isinstance(v, Tensor)]
    return [k for o in out if o is not None for k in _part_sizes(o)]


def slice_function(
    fm: FlatModel, sl: Slice, *, parts: bool = False
) -> Callable[[tuple[Tensor, ...], tuple], object]:
    """`f(values, args)`: every output on `args`, flattened, with the slice's entries set to
    `values` (one `(k,)` tensor per slice parameter) and every other entry frozen; with
    `parts`, the model's output as it is."""
    base = fm.params(fm.theta)
    buffers = dict(fm.model.named_buffers())

    def f(values: tuple[Tensor, ...], args: tuple) -> Tensor:
        params = dict(base)
        for name, idx, v in zip(sl.names, sl.index, values):
            flat = base[name].reshape(-1).index_put((idx,), v)
            params[name] = flat.reshape(base[name].shape)
        with measuring():
            out = torch.func.functional_call(fm.model, {**params, **buffers}, args)
        return out if parts else flatten_out(out)

    return f


def _split(rows: Tensor, sizes: list[int]) -> tuple[Tensor, ...]:
    return tuple(rows.split(sizes, dim=-1))


def _forward(fm: FlatModel, sl: Slice) -> Tensor:
    """`J_S` by forward mode, `_CHUNK` columns at a time."""
    f = slice_function(fm, sl)
    primals = tuple(fm.theta[c] for c in sl.columns.split(sl.sizes))

    def column(t: tuple[Tensor, ...]) -> Tensor:
        return torch.func.jvp(lambda *v: f(v, fm.args), primals, t)[1]

    eye = torch.eye(sl.size, dtype=fm.theta.dtype)
    cols = [
        torch.func.vmap(column)(_split(eye[a : a + _CHUNK], sl.sizes))
        for a in range(0, sl.size, _CHUNK)
    ]
    return torch.cat(cols).T.contiguous()


def _reverse(fm: FlatModel, sl: Slice) -> Tensor | None:
    """`J_S` by reverse mode on a few samples at a time: `vmap` over single samples when the
    model's operations allow it (one backward pass of one sample per output), else plain
    `jacrev` on `_SAMPLES // 4` samples together (some backward formulas, PReLU's, cannot be
    batched over samples). Checked against a vector-Jacobian product of the whole batch;
    `None` when the model does not treat the samples independently or cannot be
    transformed so."""
    args = as_tuple(fm.args)
    sizes = {a.shape[0] for a in args if isinstance(a, Tensor) and a.ndim}
    if len(sizes) != 1 or any(isinstance(a, Tensor) and a.ndim == 0 for a in args):
        return None
    batch = sizes.pop()
    f = slice_function(fm, sl)
    primals = tuple(fm.theta[c] for c in sl.columns.split(sl.sizes))
    dims = tuple(0 if isinstance(a, Tensor) else None for a in args)
    every = tuple(range(len(primals)))

    def take(a: int, b: int) -> tuple:
        return tuple(x[a:b] if isinstance(x, Tensor) else x for x in args)

    def one(values: tuple[Tensor, ...], *sample: object) -> Tensor:
        return f(values, tuple(a.unsqueeze(0) if isinstance(a, Tensor) else a for a in sample))

    def by_sample(a: int, b: int) -> Tensor:  # (b − a, outputs of one sample, |S|)
        jac = torch.func.vmap(torch.func.jacrev(one), in_dims=(None, *dims))(primals, *take(a, b))
        return torch.cat([j.reshape(*j.shape[:2], -1) for j in jac], -1)

    def together(a: int, b: int) -> Tensor:  # the same, from the samples' joint Jacobian
        jac = torch.func.jacrev(lambda *v: f(v, take(a, b)), argnums=every)(*primals)
        rows = torch.cat([j.reshape(j.shape[0], -1) for j in jac], -1)
        # each output tensor of the samples flattened in turn: regroup by sample
        split = [r.reshape(b - a, -1, sl.size) for r in rows.split([k * (b - a) for k in parts])]
        return torch.cat(split, 1)

    try:
        # the whole batch's outputs are each output tensor flattened in turn: the same rows
        # in that order are each tensor's rows of every sample in turn
        with torch.no_grad():
            parts = _part_sizes(slice_function(fm, sl, parts=True)(primals, take(0, 1)))
        try:
            blocks = [by_sample(a, a + _SAMPLES) for a in range(0, batch, _SAMPLES)]
        except RuntimeError:  # a backward formula vmap cannot batch over samples
            step = max(1, _SAMPLES // 4)
            blocks = [together(a, min(a + step, batch)) for a in range(0, batch, step)]
        per = torch.cat(blocks)  # (batch, outputs of one sample, |S|)
        rows = torch.cat([p.reshape(-1, sl.size) for p in per.split(parts, dim=1)])
        out, vjp_fn = torch.func.vjp(lambda *v: f(v, args), *primals)
    except Exception:  # an operation torch.func cannot transform, data-dependent flow, ...
        return None
    if rows.shape[0] != out.numel():
        return None
    u = torch.randn(out.numel(), generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    ref = torch.cat(vjp_fn(u))
    err = float((rows.T @ u - ref).norm())
    scale = max(float(ref.norm()), float(rows.abs().max()), 1e-300)
    return rows if err <= 1e-8 * scale else None


def _prelu(self: nn.PReLU, x: Tensor) -> Tensor:
    """PReLU by its formula, `x` where positive, else `a x` (`a` per channel, axis 1)."""
    a = self.weight.view(1, -1, *([1] * (x.ndim - 2))) if x.ndim > 1 else self.weight
    return torch.where(x > 0, x, a * x)


def composite_prelu(model: nn.Module) -> None:
    """Evaluate every `nn.PReLU` of `model` (in place) by its formula: the same function
    and derivatives (but at `x = 0`), and a backward pass `vmap` can batch over samples,
    which the fused kernel's cannot."""
    for mod in model.modules():
        if isinstance(mod, nn.PReLU):
            mod.forward = types.MethodType(_prelu, mod)


def slice_jacobian(fm: FlatModel, sl: Slice, n_out: int) -> Tensor:
    """`J_S` `(n_outputs, |S|)`: the Jacobian's columns for the slice's entries, float64.
    Reverse mode sample by sample when the outputs are fewer than `|S|` times the samples
    (and the samples are independent, checked), else forward mode. `fm.model`'s PReLUs
    are evaluated by their formula (`composite_prelu`)."""
    composite_prelu(fm.model)
    args = as_tuple(fm.args)
    batch = next((a.shape[0] for a in args if isinstance(a, Tensor) and a.ndim), 1)
    if n_out < sl.size * batch:
        jac = _reverse(fm, sl)
        if jac is not None:
            return jac
    return _forward(fm, sl)
