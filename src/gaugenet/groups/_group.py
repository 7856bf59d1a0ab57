"""`GaugeGroup`: the gauge group of one model, a product of factors.

An element is a `dict[str, Tensor]` from factor names to factor elements; a missing factor
means its identity. The action applies every continuous factor, then every discrete one.
Permutations may re-index continuous factors (a semidirect product); `compose` and
`inverse` account for that, so that `act(act(m, g), h) == act(m, compose(g, h))`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ._base import AbstractFactor, Breaker, State
from ._matrix import _mode_matrix
from ._monomial import MonomialScaleFactor
from ._permutation import PermutationFactor
from ._rescaling import RescalingFactor
from ._signature import ModelSignature, model_signature
from ._translation import TranslationFactor

__all__ = ["Element", "GaugeGroup", "model_state", "parameter_aliases"]

Element = dict[str, Tensor]


def model_state(model: nn.Module) -> State:
    """Parameters and buffers of `model` by name (detached)."""
    state = {k: v.detach() for k, v in model.named_parameters(remove_duplicate=False)}
    state.update({k: v.detach() for k, v in model.named_buffers(remove_duplicate=False)})
    return state


def parameter_aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter of `model`, by the parameter's `id` (a tied parameter,
    a language model's head that is its token embedding, has several)."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    return aliases


def load_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Write `state` into `model`'s parameters and buffers in place (same shapes)."""
    with torch.no_grad():
        for name, value in state.items():
            owner, _, attr = name.rpartition(".")
            mod = model.get_submodule(owner) if owner else model
            target = getattr(mod, attr)
            if target.shape != value.shape:
                raise GaugeError(f"{name}: shape {tuple(value.shape)} != {tuple(target.shape)}")
            target.copy_(value)


def _acts_last(f: AbstractFactor) -> bool:
    """Translations, and factors that say so (`acts_last`), act after the matrix factors."""
    return isinstance(f, TranslationFactor) or bool(getattr(f, "acts_last", False))


def _declares(f: AbstractFactor) -> bool:
    """`f` acts last and declares factors it does not commute with (`scaled_by`,
    `moved_by`): the group moves it past them when composing and inverting."""
    return _acts_last(f) and bool(getattr(f, "scaled_by", ()) or getattr(f, "moved_by", ()))


@dataclass(eq=False)
class GaugeGroup:
    """The gauge group of a model.

    - `factors`: the named parts, continuous and discrete.
    - `breakers`: operations that break would-be symmetries, with reasons.
    - `param_names`: the model's parameter names in `model.parameters()` order (for `tangent`).
    - `signature`: the layout and computation of the model the group was found for (set by
      `gaugenet.symmetries`); `act` and the functions built on it refuse other models.
    - `example_inputs`: the inputs the group was found with (set by `gaugenet.symmetries`);
      what `canonicalize` checks its result on when given no inputs.
    - `unchecked`: `None` when the factors were checked numerically on the example inputs
      (or the group was built by hand); otherwise why they were not (a group found on the
      meta device, which has shapes but no values; see `gaugenet.discovery.check_on`).
    """

    factors: tuple[AbstractFactor, ...]
    breakers: tuple[Breaker, ...] = ()
    param_names: tuple[str, ...] = field(default=(), repr=False)
    signature: ModelSignature | None = field(default=None, repr=False)
    example_inputs: Any = field(default=None, repr=False)
    unchecked: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.factors]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise GaugeError(f"factor names must be unique, repeated: {sorted(dup)}")
        self._by_name = {f.name: f for f in self.factors}

    # -- description --------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Dimension of the Lie algebra (discrete factors count 0)."""
        return sum(f.dim for f in self.factors)

    @property
    def checked(self) -> bool:
        """Whether the factors were checked numerically (see `unchecked`)."""
        return self.unchecked is None

    def factor(self, name: str) -> AbstractFactor:
        try:
            return self._by_name[name]
        except KeyError:
            raise GaugeError(f"no factor named {name!r}; factors: {list(self._by_name)}") from None

    def of_kind(self, kind: str) -> list[AbstractFactor]:
        return [f for f in self.factors if f.kind == kind]

    @property
    def continuous(self) -> list[AbstractFactor]:
        """Continuous factors in the order they act: rescalings first, translations (and
        other factors that act last, a LayerNorm offset) last."""
        cont = [f for f in self.factors if not f.discrete]
        first = [f for f in cont if isinstance(f, RescalingFactor)]
        last = [f for f in cont if _acts_last(f)]
        return first + [f for f in cont if f not in first and f not in last] + last

    @property
    def discrete(self) -> list[AbstractFactor]:
        return [f for f in self.factors if f.discrete]

    def summary(self) -> list[tuple[str, str, int, tuple[str, ...]]]:
        """Rows `(name, kind, dim, modules)`; permutations show their size in the name."""
        return [(f.name, f.kind, f.dim, f.modules) for f in self.factors]

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for f in self.factors:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        tail = ", unchecked" if self.unchecked else ""
        return f"GaugeGroup(dim={self.dim}, factors={kinds}, breakers={len(self.breakers)}{tail})"

    # -- group structure ----------------------------------------------------------
    def _full(self, g: Mapping[str, Tensor], dtype: torch.dtype) -> Element:
        unknown = set(g) - set(self._by_name)
        if unknown:
            raise GaugeError(f"element names unknown factors {sorted(unknown)}")
        return {f.name: g[f.name] if f.name in g else f.identity(dtype) for f in self.factors}

    def identity(self, dtype: torch.dtype = torch.float64) -> Element:
        return {f.name: f.identity(dtype) for f in self.factors}

    def sample(
        self,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float64,
        scale: float = 0.5,
        discrete: bool = True,
    ) -> Element:
        """A random element; `discrete=False` leaves permutations at the identity."""
        return {
            f.name: f.sample(generator, dtype, scale)
            if discrete or not f.discrete
            else f.identity()
            for f in self.factors
        }

    def validate(self, g: Mapping[str, Tensor]) -> None:
        """Raise `GaugeError` naming the factor and entry of the first invalid part."""
        for name, a in g.items():
            self.factor(name).validate(a)

    def _conjugate(self, cont: Element, perms: Element, inverse: bool = False) -> Element:
        """Move the permutations `perms` past the continuous parts `cont`: returns `cont'`
        with `perm ∘ cont == cont' ∘ perm` (read as actions applied left to right)."""
        out = dict(cont)
        for f in self.discrete:
            if not isinstance(f, PermutationFactor) or f.name not in perms:
                continue
            p = perms[f.name]
            for target, m in f.conjugates:
                src = out[target]
                new = src.clone()
                new[m[p]] = src[m]
                out[target] = new
        return out

    def compose(self, g: Mapping[str, Tensor], h: Mapping[str, Tensor]) -> Element:
        """The element acting as `g` first, then `h`."""
        dtype = next((v.dtype for v in g.values() if v.is_floating_point()), torch.float64)
        g, h = self._full(g, dtype), self._full(h, dtype)
        self.validate(g)
        self.validate(h)
        perms_g = {f.name: g[f.name] for f in self.discrete}
        h_cont = self._conjugate({f.name: h[f.name] for f in self.continuous}, perms_g)
        out = {f.name: f.compose(g[f.name], h_cont[f.name]) for f in self.continuous}
        for f in self.continuous:  # a shift of g moved past the rescalings of h is rescaled
            if _declares(f):
                out[f.name] = f.compose(self._rescale_shift(f, g[f.name], h_cont), h_cont[f.name])
        out.update({f.name: f.compose(g[f.name], h[f.name]) for f in self.discrete})
        return {f.name: out[f.name] for f in self.factors}

    def inverse(self, g: Mapping[str, Tensor]) -> Element:
        dtype = next((v.dtype for v in g.values() if v.is_floating_point()), torch.float64)
        g = self._full(g, dtype)
        self.validate(g)
        perms_inv = {f.name: f.inverse(g[f.name]) for f in self.discrete}
        cont_inv = {f.name: f.inverse(g[f.name]) for f in self.continuous}
        for f in self.continuous:
            if _declares(f):
                cont_inv[f.name] = self._rescale_shift(f, cont_inv[f.name], cont_inv)
        out = self._conjugate(cont_inv, perms_inv)
        out.update(perms_inv)
        return {f.name: out[f.name] for f in self.factors}

    def _rescale_shift(
        self,
        f: AbstractFactor,
        v: Tensor,
        scales: Mapping[str, Tensor],
        *,
        scaled: bool = True,
        moved: bool = True,
    ) -> Tensor:
        """The shift `v'` with `shift(v) ∘ others == others ∘ shift(v')` (read as actions,
        left first), for the rescalings (`scaled`) and matrix factors (`moved`) in `scales`."""
        for name, m, *power in getattr(f, "scaled_by", ()) if scaled else ():
            a = scales[name]
            if isinstance(self._by_name.get(name), MonomialScaleFactor):
                a = self._by_name[name].scales(a)  # its element is `z`, `α = exp(B z)`
            ext = torch.cat([a, torch.ones(1, dtype=a.dtype)])
            v = v * ext[m].to(v.dtype) ** (power[0] if power else 1)
        for name, mode, *where in getattr(f, "moved_by", ()) if moved else ():
            g = scales[name]
            if g.ndim == 2:  # an orthogonal factor's element: one block
                g = g.unsqueeze(0)
            mat = _mode_matrix(g.to(v.dtype), mode)
            if len(where) > 2:  # the shift holds coordinates `sel` of each block, which
                sel = where[2]  # the element maps to themselves: its `sel` rows and columns
                mat = mat[:, sel][:, :, sel]
            b, d = mat.shape[0], mat.shape[-1]
            o = where[0] if where else 0
            if isinstance(o, Tensor):  # explicit entries of every block: `(b, d)`
                idx = o
            else:
                step = where[1] if len(where) > 1 else d  # blocks `step` apart (repeated heads)
                idx = o + step * torch.arange(b)[:, None] + torch.arange(d)[None, :]
            moved = (mat @ v[idx].unsqueeze(-1)).squeeze(-1)
            v = v.clone()
            v[idx] = moved
        return v

    def exp(self, xi: Tensor) -> Element:
        """Algebra coordinates `(dim,)`, factors in order, to an element (permutations: id)."""
        if xi.shape != (self.dim,):
            raise GaugeError(
                f"expected algebra coordinates of shape ({self.dim},), got {tuple(xi.shape)}"
            )
        out, k = {}, 0
        for f in self.factors:
            if f.discrete:
                out[f.name] = f.identity(xi.dtype)
            else:
                out[f.name] = f.exp(xi[k : k + f.dim])
                k += f.dim
        return out

    # -- actions ------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise `GaugeError` unless `model` is the kind of model the group was found for
        (same parameter names and shapes, same modules and computation; see
        `ModelSignature`). Groups built by hand carry no signature and accept any model."""
        if self.signature is None:
            return
        diff = self.signature.mismatch(model_signature(model))
        if diff is not None:
            raise GaugeError(
                f"this gauge group was found for another model ({diff}); its transformations "
                f"need not be symmetries of {type(model).__name__}: build its own group with "
                "gaugenet.symmetries(model, example_inputs)"
            )

    def act_state(
        self, state: Mapping[str, Tensor], g: Mapping[str, Tensor], *, validate: bool = True
    ) -> State:
        """The pure action on a state dict (parameters and buffers by name)."""
        if validate:
            self.validate(g)
        new = dict(state)
        for f in self.continuous + self.discrete:
            if f.name in g:
                new = f.apply(new, g[f.name])
        return new

    def act(self, model: nn.Module, g: Mapping[str, Tensor], *, check: bool = True) -> nn.Module:
        """A new model transformed by `g`; `model` itself is never modified. Raises
        `GaugeError` when `model` is not the group's model (`check_model`), unless
        `check=False` (for negative tests: what the transformation does to another model)."""
        if check:
            self.check_model(model)
        new_state = self.act_state(model_state(model), g)
        out = copy.deepcopy(model)
        load_state(out, {k: v for k, v in new_state.items() if k in self._touched()})
        return out

    def _touched(self) -> set[str]:
        return {p for f in self.factors for p in f.params()}

    def tangent(self, model: nn.Module) -> Tensor:
        """Orbit tangent vectors at `model`'s parameters: `(dim, n_params)`.

        Row `k` is `d/ds act(model, exp(s e_k))|_{s=0}` flattened in `model.parameters()`
        order (computed with `torch.func.jacfwd`).
        """
        state = model_state(model)
        names = [n for n, _ in model.named_parameters()]
        dtype = next(iter(state.values())).dtype if state else torch.float64

        def flat(xi: Tensor) -> Tensor:
            new = self.act_state(state, self.exp(xi), validate=False)
            return torch.cat([new[n].reshape(-1) for n in names])

        if self.dim == 0:
            return torch.zeros(0, sum(state[n].numel() for n in names), dtype=dtype)
        jac = torch.func.jacfwd(flat)(torch.zeros(self.dim, dtype=dtype))
        return jac.T.contiguous()

    # -- combining -----------------------------------------------------------------
    @staticmethod
    def product(groups: Iterable[GaugeGroup], param_names: tuple[str, ...] = ()) -> GaugeGroup:
        groups = list(groups)
        return GaugeGroup(
            tuple(f for g in groups for f in g.factors),
            tuple(b for g in groups for b in g.breakers),
            param_names,
        )
