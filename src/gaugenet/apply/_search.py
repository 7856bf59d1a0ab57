"""Searching the rescaling orbit for the element whose rounded weights disturb the outputs least.

Closed-form range balancing (`_ranges.balance`) equalizes every channel's range, which is
the optimum only when every channel matters equally to the output. Two searches that use the
data complement it:

- a first-order noise model: rounding a tensor `P` with step `Δ_P` adds noise of variance
  `Δ_P²/12` to each entry, so the expected output noise is `Σ_P Δ_P²/12 · Σ_i S_i`, with
  `S_i = Σ_x ‖∂y(x)/∂p_i‖²` the output sensitivity of entry `i`. A rescaling multiplies an
  entry by `m_i(α)` and, because the function is unchanged, its sensitivity by `1/m_i(α)²`;
  the model is therefore an explicit function of the log-scales, minimized by Adam;
- a local search on the realized objective (the output noise after rounding, on the
  calibration inputs): random moves of one factor's log-scales, kept only when they lower it.
  Rounding noise is deterministic, not independent, which the first-order model ignores.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .._errors import GaugeError
from .._float64_kernels import float64_kernels
from .._func import untransformable
from .._invariance import _as_tuple
from ..groups import RescalingFactor, Scale
from ..groups._base import State
from ..groups._group import parameter_aliases
from ._quantize import feature_axis

__all__ = [
    "column_channels",
    "forward_fn",
    "input_means",
    "input_ranges",
    "local_search",
    "noise_model_scales",
    "sensitivities",
    "smoothing_scales",
]


def forward_fn(
    model: nn.Module, inputs: Any, prefer: Collection[str] = ()
) -> Callable[[State], Tensor]:
    """`state ↦ y`: `model`'s first tensor output under `state` (a functional call), float64.

    A tensor that `model` holds under several names (a language model's head tied to its
    token embedding) stays one tensor: `state`'s value under one of its names is used for
    all of them, the first of its names in `prefer` (the weights a caller rounds or
    differentiates), else the first name the model gives it; the values under its other
    names are not read."""
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else (_as_tuple(inputs), {})
    wanted = set(prefer)
    unread: set[str] = set()
    for names in parameter_aliases(model).values():
        if len(names) > 1:
            keep = next((n for n in names if n in wanted), names[0])
            unread.update(n for n in names if n != keep)

    def run(state: State) -> Tensor:
        if unread:  # `functional_call` ties the kept value to the other names
            state = {k: v for k, v in state.items() if k not in unread}
        with float64_kernels():
            out = functional_call(model, state, args, kwargs)
        while not isinstance(out, Tensor):
            out = out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
        return out.double()

    return run


def sensitivities(
    model: nn.Module, inputs: Any, state: State, names: Sequence[str], *, probes: int = 32
) -> dict[str, Tensor]:
    """`S_i = Σ_x Σ_k (∂y_k(x)/∂p_i)²` for every entry of the named tensors, estimated with
    Rademacher probes `v`: `E_v[(∂(Σ v·y)/∂p_i)²] = S_i` (the cross terms average out).

    **Arguments:** `state` the parameters (float64), `names` the tensors to measure,
    `probes` the number of random probes (the estimate's relative error is about
    `sqrt(2/probes)` per entry).

    **Returns:** a dict name → tensor of that parameter's shape, float64, `>= 0`.
    """
    run = forward_fn(model, inputs, prefer=names)  # a tied tensor: its uses together
    params = {n: state[n].detach() for n in names}
    try:
        y, pullback = vjp(lambda p: run({**state, **p}), params)
    except RuntimeError as e:
        if not untransformable(e):
            raise
        # an `autograd.Function` without `setup_context` (BLOOM's GELU) cannot run under
        # `torch.func`: the same probes, one backward pass each
        return _sensitivities_by_autograd(run, state, params, probes)
    v = _probes(probes, y)
    # probes in chunks whose gradients take at most about 256 MB
    chunk = max(1, min(probes, 2**25 // max(1, sum(p.numel() for p in params.values()))))
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for part in v.split(chunk):
        (grads,) = vmap(pullback)(part)
        for n in names:
            out[n] += (grads[n].detach() ** 2).sum(0) / probes
    return out


def _probes(probes: int, y: Tensor) -> Tensor:
    """The Rademacher probes of `sensitivities`: `(probes, *y.shape)`, ±1, seeded."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 2, (probes, *y.shape), generator=g).to(y.dtype) * 2 - 1


def _sensitivities_by_autograd(
    run: Callable[[State], Tensor], state: State, params: dict[str, Tensor], probes: int
) -> dict[str, Tensor]:
    """`sensitivities` with `torch.autograd`: one forward pass, one backward pass per probe."""
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad():
        y = run({**state, **leaves})
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for k, v in enumerate(_probes(probes, y.detach())):
        grads = torch.autograd.grad(
            y, list(leaves.values()), v, retain_graph=k < probes - 1, allow_unused=True
        )
        for n, gr in zip(leaves, grads):
            if gr is not None:  # a tensor the outputs do not read: no sensitivity
                out[n] += gr.detach() ** 2 / probes
    return out


def _slices(x: Tensor, per_channel: bool, group_size: int | None) -> Tensor:
    """`x` as `(slices, entries)`, one row per quantization step: the whole tensor, each
    output channel (axis 0), or each group of `group_size` consecutive input entries of an
    output channel (zero-padded at the end, as `quantize_grouped` rounds)."""
    flat = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
    if group_size is not None:
        flat = nn.functional.pad(flat, (0, -flat.shape[1] % group_size))
        return flat.reshape(-1, group_size)
    return flat if per_channel else flat.reshape(1, -1)


def noise_model_scales(
    factors: Sequence[RescalingFactor],
    state: State,
    names: Sequence[str],
    sens: dict[str, Tensor],
    *,
    bits: int,
    per_channel: bool,
    group_size: int | None = None,
    iters: int = 300,
) -> list[Tensor]:
    """The scales `α` (one tensor per factor) that minimize the first-order output noise
    `Σ_P Σ_o Δ_{P,o}²/12 · Σ_{i ∈ o} S_i / m_i(α)²` of rounding the named tensors, where
    `m_i(α)` is the factor's multiplier of entry `i` and `Δ_{P,o}` the step of slice `o`
    after rescaling: the tensor, each output channel (`per_channel`) or, with
    `group_size`, each group of that many input entries of an output channel (the
    group-wise quantizer's own steps). Found by Adam on the log-scales from the identity.

    **Returns:** a list of `(factor.n,)` positive tensors, float64.
    """
    qmax = 2 ** (bits - 1) - 1
    ones = {k: (torch.ones_like(v) if k in names else v) for k, v in state.items()}
    logs = [torch.zeros(f.n, dtype=torch.float64, requires_grad=True) for f in factors]

    def loss() -> Tensor:
        m = dict(ones)
        for f, log in zip(factors, logs):
            m = f.apply(m, torch.exp(log))
        total = torch.zeros((), dtype=torch.float64)
        for n in names:
            step = _slices((state[n] * m[n]).abs(), per_channel, group_size).amax(1) / qmax
            s = _slices(sens[n] / m[n] ** 2, per_channel, group_size).sum(1)
            total = total + (step**2 * s).sum()
        return total

    if factors:
        opt = torch.optim.Adam(logs, lr=0.05)
        for _ in range(iters):
            opt.zero_grad()
            loss().backward()
            opt.step()
    return [torch.exp(log.detach()) for log in logs]


def local_search(
    factors: Sequence[RescalingFactor],
    state: State,
    err: Callable[[State], float],
    *,
    budget: int,
    seed: int = 0,
) -> tuple[list[Tensor], State, float]:
    """Random moves of one factor's log-scales at a time, cycling through the factors, each
    kept only where `err` drops: a (1+1) evolution strategy per factor, whose step grows by
    1.5 after a success and shrinks by 0.9 after a failure (the one-fifth success rule).

    **Returns:** `(scales, state, err)`: one `(factor.n,)` tensor per factor (relative to
    `state` as given), the moved state and its objective; the identity if nothing helped.
    """
    g = torch.Generator().manual_seed(seed)
    logs = [torch.zeros(f.n, dtype=torch.float64) for f in factors]
    sigma = [0.1] * len(factors)
    best = err(state)
    for it in range(budget if factors else 0):
        i = it % len(factors)
        move = sigma[i] * torch.randn(factors[i].n, generator=g, dtype=torch.float64)
        trial = factors[i].apply(state, torch.exp(move))
        e = err(trial)
        if e < best:
            best, state = e, trial
            logs[i] = logs[i] + move
            sigma[i] = min(sigma[i] * 1.5, 0.5)
        else:
            sigma[i] = max(sigma[i] * 0.9, 1e-3)
    return [torch.exp(log) for log in logs], state, best


def _each_input(
    model: nn.Module,
    inputs: Any,
    names: Sequence[str],
    take: Callable[[str, Tensor], None],
    magnitude: bool = True,
) -> None:
    """Run `model` on `inputs` and hand `take(name, |X|)` the input magnitudes of every layer
    whose weight is named in `names`, as `(tokens, features)` float64 (features on the last
    axis for Linear and for Linear layers stored `(in, out)`, GPT-2's `Conv1D`; axis 1 for
    Conv; a layer called twice is handed both); `magnitude=False`: the signed inputs `X`."""
    handles = []
    for n in names:
        layer = model.get_submodule(n.rsplit(".", 1)[0]) if "." in n else model
        dim = feature_axis(layer)

        def hook(_m, args, n=n, dim=dim):
            x = args[0].detach().double().movedim(dim, -1)
            x = x.abs() if magnitude else x
            take(n, x.reshape(-1, x.shape[-1]))

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            forward_fn(model, inputs)(dict(model.state_dict()))
    finally:
        for h in handles:
            h.remove()


def input_ranges(model: nn.Module, inputs: Any, names: Sequence[str]) -> dict[str, Tensor]:
    """`max |X_j|` over all tokens of the input features `j` of every layer whose weight is
    named in `names` (features on the last axis for Linear, axis 1 for Conv), float64,
    `(in_features,)` each."""
    out: dict[str, Tensor] = {}

    def take(n: str, x: Tensor) -> None:
        r = x.amax(0)
        out[n] = torch.maximum(out[n], r) if n in out else r

    _each_input(model, inputs, names, take)
    return out


def input_means(model: nn.Module, inputs: Any, names: Sequence[str]) -> dict[str, Tensor]:
    """`mean |X_j|` over all tokens (and positions) of the input features `j` of every layer
    whose weight is named in `names`, float64, `(in_features,)` each."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def take(n: str, x: Tensor) -> None:
        sums[n] = sums[n] + x.sum(0) if n in sums else x.sum(0)
        counts[n] = counts.get(n, 0) + x.shape[0]

    _each_input(model, inputs, names, take)
    return {n: v / counts[n] for n, v in sums.items()}


def smoothing_scales(
    factors: Sequence[RescalingFactor],
    state: State,
    act: dict[str, Tensor],
    *,
    strength: float = 0.5,
    transposed: Collection[str] = frozenset(),
) -> list[Tensor]:
    """SmoothQuant's balance for every rescaling factor that scales the input columns of a
    quantized layer: channel `k` acting on columns `J_k` of weight `W` by `α_k^p` scales
    those input features by `α_k^−p`, so `α_k^p = max_{J_k}|X|^s / max_{J_k}|W|^(1−s)`
    moves the share `s` (`strength`) of the input's range into the weights; `s = 1/2`
    gives both the same range. Channels that scale no such column keep 1.

    **Arguments:** `act` the input ranges of the quantized layers (`input_ranges`);
    `strength` the migration strength `s` in `[0, 1]` (SmoothQuant's α); `transposed` the
    weights stored `(in, out)` (`transposed_params`), whose input columns are on axis 0.

    **Returns:** one `(factor.n,)` positive tensor per factor, float64.
    """
    if not 0 <= strength <= 1:
        raise GaugeError(f"smoothing strength must be in [0, 1], got {strength}")
    out = []
    for f in factors:
        log_a = torch.zeros(f.n, dtype=torch.float64)
        found = column_channels(f, state, act, transposed)
        if found is not None:
            power, wk, xk = found
            ok = (wk > 0) & (xk > 0)
            log_a[ok] = (strength * xk[ok].log() - (1 - strength) * wk[ok].log()) / power
        out.append(torch.exp(log_a))
    return out


def column_channels(
    factor: RescalingFactor,
    state: State,
    act: dict[str, Tensor],
    transposed: Collection[str] = frozenset(),
) -> tuple[int, Tensor, Tensor] | None:
    """The input columns of quantized layers that `factor` scales, per channel: channel `k`
    scales columns `J_k` of a weight `W` by `α_k^p`. `act` holds a statistic of each
    quantized layer's input features (`input_ranges`, `input_means`). A weight's inputs are
    on its axis 1 (Linear `(out, in)`, Conv `(out, in, ...)`), on axis 0 for the names in
    `transposed` (stored `(in, out)`, `transposed_params`).

    **Returns:** `(p, max_{J_k} |W|, max_{J_k} act)`, each `(factor.n,)` (0 where channel
    `k` scales no column), for the power `p` that scales the most channels (all readers of
    a stream share it); `None` when the factor scales no input column of a layer in `act`.
    """
    ranges: dict[int, tuple[Tensor, Tensor]] = {}  # power -> (max |W|, max act) per channel
    for term in getattr(factor, "terms", ()):
        if not isinstance(term, Scale) or term.param not in act or term.power == 0:
            continue
        w = state[term.param].double()
        axis = 0 if term.param in transposed else 1
        if w.dim() < 2 or w.shape[axis] != act[term.param].numel():
            continue
        idx = term.index.expand(w.shape).movedim(axis, -1).reshape(-1, w.shape[axis])
        if not bool((idx == idx[:1]).all()):
            continue  # not a column scaling
        live = idx[0] < factor.n
        k = idx[0][live]
        wmax = w.abs().movedim(axis, -1).reshape(-1, w.shape[axis]).amax(0)[live]
        zero = torch.zeros(factor.n, dtype=torch.float64)
        wk, xk = ranges.get(term.power, (zero, zero))
        ranges[term.power] = (
            wk.scatter_reduce(0, k, wmax, "amax"),
            xk.scatter_reduce(0, k, act[term.param][live], "amax"),
        )
    if not ranges:
        return None
    power, (wk, xk) = max(ranges.items(), key=lambda kv: int((kv[1][0] > 0).sum()))
    return power, wk, xk
