"""Graph rules around LayerNorms: the shifts, kernels and centerings they allow.

A mixin of `Propagator` (it uses the traced graph, the root module and the `Labels`); each
rule appends the factors it finds to `Labels.extra`. The factors themselves, and why they
are exact, are in `_shifts.py`, `_kernel.py` and `_centering.py`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from ..groups import Breaker
from ._centering import BiasAlongOne, CenteredBiasFactor, centered_output
from ._embeddings import embedding_sum_factors
from ._kernel import ReaderSlot, ill_conditioned, kernel_factor
from ._labels import Labels
from ._ops import ADD_OPS
from ._shifts import layernorm_shift

__all__ = ["NormRules"]

#: picking tokens (not features): a reader of the picked rows still reads the LayerNorm
_TOKEN_PICKS = {torch.ops.aten.select.int, torch.ops.aten.slice.Tensor}


class NormRules:
    """LayerNorm rules for `Propagator` (needs `root` and `L`)."""

    root: nn.Module
    L: Labels
    #: layers already given their centering factor (reachable from several LayerNorms)
    centered_layers: set[str]
    #: `_removed` results per node
    removed_memo: dict[fx.Node, bool]
    #: every node's value on the example inputs
    values: dict[fx.Node, Any]

    def layernorm_shift(self, n: fx.Node, ln: nn.LayerNorm) -> None:
        """A LayerNorm whose output only affine layers read: its `β` may move into their
        biases. Readers: `nn.Linear` with a bias, or `nn.MultiheadAttention` reading it as
        query, key and value through a packed, biased input projection. There only the
        query and value biases compensate: a shift of every key changes no softmax, and
        leaving the key bias alone keeps this factor commuting with the query-key GL."""
        if ln.bias is None or len(ln.normalized_shape) != 1 or not n.users:
            return
        ln_node = n
        consumers, residual = [], []
        for u, via in self._readers(ln_node):
            if u.op == "call_function" and u.target in (operator.add, torch.add):
                bias = self._residual_bias(u, via, ln.normalized_shape[0])
                if bias is None:
                    return
                residual.append(bias)
                continue
            if u.op != "call_module":
                return
            mod, t = self.root.get_submodule(str(u.target)), str(u.target)
            if isinstance(mod, nn.Linear) and mod.bias is not None and u.args[:1] == (via,):
                consumers.append((f"{t}.weight", f"{t}.bias", None))
            elif (
                isinstance(mod, nn.MultiheadAttention)
                and mod._qkv_same_embed_dim
                and mod.in_proj_bias is not None
                and mod.bias_k is None
                and tuple(u.args[:3]) == (via, via, via)
            ):
                E = mod.embed_dim
                consumers.append((f"{t}.in_proj_weight", f"{t}.in_proj_bias", (0, E)))
                consumers.append((f"{t}.in_proj_weight", f"{t}.in_proj_bias", (2 * E, 3 * E)))
            else:
                return
        if consumers:
            E = ln.normalized_shape[0]
            self.L.extra.append(layernorm_shift(str(ln_node.target), E, consumers, residual))

    def _residual_bias(self, add: fx.Node, n: fx.Node, E: int) -> str | None:
        """In `n + other` (`add`), the bias of a linear layer among `other`'s summands that
        can take back a shift of `n`: it must have `E` outputs and nothing else reads it."""
        if len(add.args) != 2 or add.kwargs or add.args.count(n) != 1:
            return None
        other = add.args[1] if add.args[0] is n else add.args[0]
        for s in self._summands(other):
            found = self._output_layer(s, E)
            if found is not None and found[1].bias is not None:
                return f"{found[0]}.bias"
        return None

    def layernorm_kernel(self, n: fx.Node, ln: nn.LayerNorm) -> None:
        """The direction `1/γ` no linear reader of a LayerNorm sees (see `_kernel.py`):
        every `nn.Linear` reading it, and each of the query, key and value inputs of a
        packed `nn.MultiheadAttention` that it is, contributes its rows."""
        if len(ln.normalized_shape) != 1:
            return
        reason = ill_conditioned(ln.weight)
        if reason is not None:
            self.L.breakers.append(Breaker(str(n.target), reason))
            return
        E = ln.normalized_shape[0]
        slots = []
        for u, via in self._readers(n):
            if u.op != "call_module":
                continue
            mod, t = self.root.get_submodule(str(u.target)), str(u.target)
            if isinstance(mod, nn.Linear) and u.args[:1] == (via,) and mod.in_features == E:
                if mod.bias is None and ln.bias is not None:
                    # the row change adds `a Σ β/γ` to the output, which only a bias takes back
                    continue
                b = f"{t}.bias" if mod.bias is not None else None
                slots.append(ReaderSlot(f"{t}.weight", b, 0, mod.out_features))
            elif (
                isinstance(mod, nn.MultiheadAttention)
                and mod._qkv_same_embed_dim
                and mod.embed_dim == E
                and mod.bias_k is None
            ):
                # Keys need no bias compensation: `W_k += a uᵀ` adds the same vector
                # `a Σ β/γ` to every key, which softmax ignores; leaving `b_k` alone keeps
                # the factor commuting with the query-key GL and the LayerNorm shift.
                b = f"{t}.in_proj_bias" if mod.in_proj_bias is not None else None
                slots += [
                    ReaderSlot(f"{t}.in_proj_weight", None if i == 1 else b, i * E, (i + 1) * E)
                    for i, a in enumerate(u.args[:3])
                    if a is via
                ]
        if slots:
            self.L.extra.append(kernel_factor(str(n.target), ln, slots))

    def _readers(self, n: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
        """`(reader, node it reads)` for the users of `n`, looking through eval-mode dropouts
        and identities (which pass the LayerNorm's output on unchanged)."""
        out = []
        # nodes after `n` have not run yet: a token pick is recognized right after `n` only
        ran = self.values.get(n)
        ndim = ran.ndim if isinstance(ran, torch.Tensor) else 0
        for u in n.users:
            mod = self.root.get_submodule(str(u.target)) if u.op == "call_module" else None
            passes = isinstance(mod, nn.Identity) or (
                isinstance(mod, nn.Dropout) and not mod.training
            )
            if u.op == "call_function" and u.target in _TOKEN_PICKS and len(u.args) > 1:
                dim = u.args[1]
                passes = isinstance(dim, int) and ndim > 1 and dim % ndim != ndim - 1
            if passes and u.args[:1] == (n,):
                out += self._readers(u)
            else:
                out.append((u, n))
        return out

    def embedding_sum(self, n: fx.Node) -> None:
        """Embedding tables whose sum only this LayerNorm reads (see `_embeddings.py`)."""
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node) or len(src.users) != 1:
            return
        summands = self._summands(src)
        if all(isinstance(x, fx.Node) and len(x.users) == 1 for x in summands):
            self.L.extra += embedding_sum_factors(n, summands, self.root)

    def _summands(self, node: Any) -> list[Any]:
        """The terms of a sum that only its parent reads, through additions, subtractions
        and dropouts (identity in eval mode)."""
        if not isinstance(node, fx.Node) or len(node.users) != 1:
            return [node]
        if node.op == "call_function" and node.target in ADD_OPS:
            return [t for a in node.args[:2] for t in self._summands(a)]
        if node.op == "call_module":
            mod = self.root.get_submodule(str(node.target))
            if isinstance(mod, nn.Dropout) and not mod.training:
                return self._summands(node.args[0])
        return [node]

    def _output_layer(self, s: Any, E: int) -> tuple[str, nn.Linear] | None:
        """`(name, layer)` when `s` is the output of a width-`E` linear layer (or of an
        `nn.MultiheadAttention`'s output projection) that only one node reads."""
        if not isinstance(s, fx.Node) or len(s.users) != 1:
            return None
        if s.op == "call_module":
            mod = self.root.get_submodule(str(s.target))
            ok = isinstance(mod, nn.Linear) and mod.out_features == E
            return (str(s.target), mod) if ok else None
        if s.op == "call_function" and s.target is operator.getitem and s.args[1] == 0:
            att = s.args[0]
            if not (isinstance(att, fx.Node) and att.op == "call_module") or len(att.users) != 1:
                return None
            mod = self.root.get_submodule(str(att.target))
            if isinstance(mod, nn.MultiheadAttention) and mod.embed_dim == E:
                return f"{att.target}.out_proj", mod.out_proj
        return None

    def _upstream(self, node: Any) -> list[Any]:
        """The terms summed into `node` through additions and eval-mode dropouts, whoever
        else reads the partial sums (a residual stream)."""
        if not isinstance(node, fx.Node):
            return [node]
        if node.op == "call_function" and node.target in ADD_OPS:
            return [t for a in node.args[:2] for t in self._upstream(a)]
        if node.op == "call_module":
            mod = self.root.get_submodule(str(node.target))
            if isinstance(mod, nn.Dropout) and not mod.training:
                return self._upstream(node.args[0])
        return [node]

    def _removed(self, node: fx.Node, E: int, memo: dict) -> bool:
        """Whether every path from `node` ends in a LayerNorm over its `E` last features,
        through additions and eval-mode dropouts only: then anything `node` carries along
        `1` changes no output."""
        if node in memo:
            return memo[node]
        memo[node] = False  # no cycles in a graph, but stay safe
        ok = bool(node.users)
        for u in node.users:
            if u.op == "call_module":
                mod = self.root.get_submodule(str(u.target))
                if isinstance(mod, nn.LayerNorm) and tuple(mod.normalized_shape) == (E,):
                    ok = ok and u.args[0] is node
                    continue
                if isinstance(mod, nn.Dropout) and not mod.training:
                    ok = ok and self._removed(u, E, memo)
                    continue
            elif u.op == "call_function" and u.target in ADD_OPS:
                ok = ok and self._removed(u, E, memo)
                continue
            ok = False
        memo[node] = ok
        return ok

    def centered_inputs(self, n: fx.Node, ln: nn.LayerNorm) -> None:
        """Linear layers whose output a LayerNorm reads through additions: what they add
        along `1` is removed (see `_centering.py`). When every path from the layer ends in a
        LayerNorm (a residual stream read only by LayerNorms), its whole output along `1` is
        free (`W += 1 aᵀ`, `b += t 1`); when residual sums that reach the output read it
        too, a bias shift `t 1` is, if a linear layer in each of them takes it back."""
        src = n.args[0] if n.args else None
        if len(ln.normalized_shape) != 1 or not isinstance(src, fx.Node):
            return
        E = ln.normalized_shape[0]
        done, memo = self.centered_layers, self.removed_memo
        if ln.bias is not None and self._removed(n, E, memo):
            # this LayerNorm's own output only reaches LayerNorms: β along 1 is free
            term = BiasAlongOne(f"{n.target}.bias", ())
            self.L.extra.append(
                CenteredBiasFactor(
                    f"center_bias:{n.target}", 1, terms=(term,), modules=(str(n.target),)
                )
            )
        for s in self._upstream(src):
            found = self._output_layer(s, E)
            if found is None or found[0] in done or not self._removed(s, E, memo):
                continue
            done.add(found[0])
            self.L.extra.append(centered_output(*found))
        if self._removed(src, E, memo):
            return
        # several readers: once per sum (at its first LayerNorm reader)
        if next(iter(src.users)) is not n or not (
            src.op == "call_function" and src.target in ADD_OPS
        ):
            return
        compensate = []
        for u in src.users:
            if u.op == "call_module" and isinstance(
                self.root.get_submodule(str(u.target)), nn.LayerNorm
            ):
                if self.root.get_submodule(str(u.target)).normalized_shape != ln.normalized_shape:
                    return
                continue
            if u.op == "call_function" and u.target in ADD_OPS and self._removed(u, E, memo):
                continue  # that sum only reaches LayerNorms: nothing to take back
            bias = self._residual_bias(u, src, E) if u.op == "call_function" else None
            if bias is None:
                return
            compensate.append(bias)
        for s in (t for a in src.args[:2] for t in self._summands(a)):
            found = self._output_layer(s, E)
            if found is None or found[1].bias is None:
                continue
            t, value = found[0], None
            att = self.root.get_submodule(t.rpartition(".")[0]) if "." in t else None
            if isinstance(att, nn.MultiheadAttention) and att.in_proj_bias is not None:
                value = (f"{t}.weight", f"{t.rpartition('.')[0]}.in_proj_bias", 2 * E)
            term = BiasAlongOne(f"{t}.bias", tuple(compensate), value)
            self.L.extra.append(
                CenteredBiasFactor(
                    f"center_bias:{t}",
                    1,
                    terms=(term,),
                    modules=(t, *(c.rpartition(".")[0] for c in compensate)),
                )
            )
