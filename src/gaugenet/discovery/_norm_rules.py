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
from ._embeddings import (
    CenteredRowsFactor,
    IntoRows,
    MoveFromTied,
    RowMoveFactor,
    RowsAlongOne,
    TiedTableShiftFactor,
    embedding_sum_factors,
)
from ._kernel import ReaderSlot, ill_conditioned, kernel_factor
from ._labels import Labels
from ._linear import Linear, keeps_last_axis, linear_reading, linear_writing, param_name
from ._offset_layernorm import effective_gain
from ._ops import ADD_OPS, CASTS, expand_to, graph_users, is_token_pick, picks_tokens
from ._scaled import constant_factor, scaled_by_constant, times_one
from ._shifts import layernorm_shift
from ._unread import Unread

__all__ = ["NormRules"]


class NormRules:
    """LayerNorm rules for `Propagator` (needs `root` and `L`)."""

    root: nn.Module
    L: Labels
    #: layers already given their centering factor (reachable from several LayerNorms)
    centered_layers: set[str]
    #: the calls whose output `centered_inputs` centered, per layer (a shared layer is
    #: called once per application, each gets its copy of the factor)
    centered_calls: dict[str, set[fx.Node]]
    #: `_removed` results per node
    removed_memo: dict[fx.Node, bool]
    #: every node's value on the example inputs
    values: dict[fx.Node, Any]
    #: the parameter entries the graph never reads
    unread: Unread

    def layernorm_shift(self, n: fx.Node, ln: nn.LayerNorm) -> None:
        """A LayerNorm whose output only affine layers read: its `β` may move into their
        biases. Readers: linear maps with a bias, or `nn.MultiheadAttention` reading it as
        any of query, key and value through a packed, biased input projection (self- or
        cross-attention). There only the query and value biases compensate: a shift of
        every key changes no softmax, and leaving the key bias alone keeps this factor
        commuting with the query-key GL."""
        if ln.bias is None or len(ln.normalized_shape) != 1 or not n.users:
            return
        consumers, residual, transposed, pending = [], [], [], []
        for u, via in self._readers(n):
            if u.op == "call_function" and u.target in ADD_OPS:
                bias = self._residual_bias(u, via, ln.normalized_shape[0])
                if bias is None:
                    return
                residual.append(bias)
                continue
            found = linear_reading(u, via, self.root, self.values)
            if found is not None:
                lin = found[0]
                if lin.bias is None:
                    pending.append(lin.weight)  # only a softmax key may leave it (see there)
                    continue
                consumers.append((lin.weight, lin.bias, None))
                if lin.out_axis == 1:
                    transposed.append(lin.weight)
                continue
            if u.op != "call_module":
                return
            mod, t = self.root.get_submodule(str(u.target)), str(u.target)
            if (
                isinstance(mod, nn.MultiheadAttention)
                and mod._qkv_same_embed_dim
                and mod.in_proj_bias is not None
                and mod.bias_k is None
                and any(a is via for a in u.args[:3])
            ):
                # the query and value rows that read it take the shift back; keys need not
                E = mod.embed_dim
                consumers += [
                    (f"{t}.in_proj_weight", f"{t}.in_proj_bias", (i * E, (i + 1) * E))
                    for i, a in enumerate(u.args[:3])
                    if a is via and i != 1
                ]
            else:
                return
        if consumers:
            E = ln.normalized_shape[0]
            self.L.extra.append(
                layernorm_shift(
                    str(n.target), E, consumers, residual, tuple(transposed), tuple(pending)
                )
            )

    def _residual_bias(self, add: fx.Node, n: fx.Node, E: int) -> str | None:
        """In `n + other` (`add`), the bias of a linear layer among `other`'s summands that
        can take back a shift of `n`: it must have `E` outputs and nothing else reads it."""
        if len(add.args) != 2 or add.kwargs or add.args.count(n) != 1:
            return None
        other = add.args[1] if add.args[0] is n else add.args[0]
        for s in self._summands(other):
            found = self._output_layer(s, E)
            if found is not None and found.bias is not None:
                return found.bias
        return None

    def layernorm_kernel(self, n: fx.Node, ln: nn.LayerNorm) -> None:
        """The direction `1/γ` no linear reader of a LayerNorm sees (see `_kernel.py`):
        every `nn.Linear` reading it, and each of the query, key and value inputs of a
        packed `nn.MultiheadAttention` that it is, contributes its rows."""
        if len(ln.normalized_shape) != 1:
            return
        reason = ill_conditioned(effective_gain(ln))
        if reason is not None:
            self.L.breakers.append(Breaker(str(n.target), reason))
            return
        E = ln.normalized_shape[0]
        slots = []
        for u, via in self._readers(n):
            found = linear_reading(u, via, self.root, self.values)
            if found is not None:
                lin = found[0]
                rows, cols = lin.shape(self.root)
                if cols != E:
                    continue
                # without a bias, the row change adds `a Σ β/γ` that nothing takes back
                # unless the rows are softmax keys (settled once attention is known)
                pending = lin.bias is None and ln.bias is not None
                slots.append(ReaderSlot(lin.weight, lin.bias, 0, rows, lin.out_axis, pending))
                continue
            if u.op != "call_module":
                continue
            mod, t = self.root.get_submodule(str(u.target)), str(u.target)
            if (
                isinstance(mod, nn.MultiheadAttention)
                and mod._qkv_same_embed_dim
                and mod.embed_dim == E
                and mod.bias_k is None
            ):
                # Keys need no bias compensation: `W_k += a uᵀ` adds the same vector
                # `a Σ β/γ` to every key, which softmax ignores; leaving `b_k` alone keeps
                # the factor commuting with the query-key GL and the LayerNorm shift.
                # Without a bias, the query and value rows add `a Σ β/γ` that nothing takes
                # back: pending, as a bias-free `nn.Linear` (kept only inside key rows).
                b = f"{t}.in_proj_bias" if mod.in_proj_bias is not None else None
                pending = b is None and ln.bias is not None
                slots += [
                    ReaderSlot(
                        f"{t}.in_proj_weight",
                        None if i == 1 else b,
                        i * E,
                        (i + 1) * E,
                        pending=pending and i != 1,
                    )
                    for i, a in enumerate(u.args[:3])
                    if a is via
                ]
        if slots:
            self.L.extra.append(kernel_factor(str(n.target), ln, slots))

    def _readers(self, n: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
        """`(reader, node it reads)` for the users of `n`, looking through eval-mode dropouts,
        identities, casts and products with constant ones (which pass the LayerNorm's output
        on unchanged)."""
        out = []
        # nodes after `n` have not run yet: a token pick is recognized right after `n` only
        ran = self.values.get(n)
        ndim = ran.ndim if isinstance(ran, torch.Tensor) else 0
        for u in n.users:
            mod = self.root.get_submodule(str(u.target)) if u.op == "call_module" else None
            passes = (
                isinstance(mod, nn.Identity)
                or (isinstance(mod, nn.Dropout) and not mod.training)
                or (u.op == "call_function" and u.target in CASTS)
            ) and u.args[:1] == (n,)
            if is_token_pick(u):
                passes = picks_tokens(u, ndim) and u.args[:1] == (n,)
            if passes or times_one(u, n, self.root, self.values):
                out += self._readers(u)
            else:
                out.append((u, n))
        return out

    def embedding_sum(self, n: fx.Node) -> None:
        """Embedding tables whose lookups reach only LayerNorms like `n`, found from the sum
        `n` normalizes (see `_embeddings.py`); each table once."""
        ln = self.root.get_submodule(str(n.target))
        src = n.args[0] if n.args else None
        if len(ln.normalized_shape) != 1 or not isinstance(src, fx.Node):
            return
        E = ln.normalized_shape[0]
        tables, sums, scales, tied = [], [], {}, []
        for look, scale in self._lookups(src):
            t = str(look.target)
            m = self.root.get_submodule(t)
            if t in self.centered_layers or m.max_norm is not None or m.embedding_dim != E:
                continue
            if not self._removed(look, E, self.removed_memo):
                continue
            if self._shared(f"{t}.weight"):  # settled once every lookup is seen
                tied.append((look, scale, self._sum_root(look)))
                continue
            self.centered_layers.add(t)
            tables.append((t, m))
            sums.append(self._sum_root(look))
            scales[t] = scale
        for look, scale, root in tied:
            # the first LayerNorm reached lists the partners (a pre-LN stream reaches more,
            # once the partners are centered)
            partners = [(t, scales[t]) for (t, _), r in zip(tables, sums) if r is root]
            self.tied_lookups.setdefault(look, (scale, partners))
        if tables:
            read = {
                t: rows
                for t, m in tables
                if (rows := self.unread.read_rows(f"{t}.weight", m.num_embeddings)) is not None
            }
            self.L.extra += embedding_sum_factors(tables, [id(r) for r in sums], read, scales)
        if self._removed(src, E, self.removed_memo):
            self._stream_sources(src, E)

    def tied_table_factors(self) -> None:
        """A table tied under several modules (an encoder's and a decoder's token table, as
        BART's `shared`): its rows move along `1` when every lookup of it, under any module,
        reaches only LayerNorms (`embedding_sum` records them) and nothing else reads the
        parameter (a tied output head). The factor moves every name of the parameter alike
        (the first, as `named_parameters()` names it, carries its tangents). Run after
        propagation."""
        graph = self.module.graph
        held: dict[int, list[str]] = {}
        for name, m in self.root.named_modules(remove_duplicate=False):
            if isinstance(m, nn.Embedding):
                held.setdefault(id(m.weight), []).append(name)
        for name, p in self.root.named_parameters():
            mods = held.get(id(p), [])
            if len(mods) < 2 or any(m in self.centered_layers for m in mods):
                continue
            lookups = [n for n in graph.nodes if n.op == "call_module" and str(n.target) in mods]
            elsewhere = [
                n
                for n in graph.nodes
                if ((a := param_name(n, self.root)) and self.root.get_parameter(a) is p)
                or (
                    n.op == "call_module"
                    and str(n.target) not in mods
                    and any(q is p for q in self.root.get_submodule(str(n.target)).parameters())
                )
            ]
            if not lookups or elsewhere or not all(n in self.tied_lookups for n in lookups):
                continue
            m = self.root.get_submodule(mods[0])
            if m.max_norm is not None:
                continue
            self.centered_layers.update(mods)
            rows = self.unread.read_rows(name, m.num_embeddings)
            names = [k for k, q in self.root.named_parameters(remove_duplicate=False) if q is p]
            names = [name] + [k for k in names if k != name]
            self.L.extra.append(
                CenteredRowsFactor(
                    f"center:{name.rpartition('.')[0]}",
                    m.num_embeddings if rows is None else len(rows),
                    terms=tuple(RowsAlongOne(k, rows) for k in names),
                    modules=tuple(mods),
                )
            )
            move = self._tied_move(names, [self.tied_lookups[n] for n in lookups], m)
            if move is not None:
                self.L.extra.append(move)

    def _tied_move(self, names: list[str], parts: list, m: nn.Embedding) -> Any:
        """A vector `⊥ 1` moved out of a tied table into the table each of its lookups is
        summed with (one each, all distinct), or `None`."""
        if not all(len(partners) == 1 for _, partners in parts):
            return None
        to = [partners[0] for _, partners in parts]
        if len({t for t, _ in to}) != len(to):
            return None
        coef = tuple(s / sp for (s, _), (_, sp) in zip(parts, to))
        first = self.root.get_submodule(to[0][0])
        rows = self.unread.read_rows(f"{to[0][0]}.weight", first.num_embeddings)
        d = m.embedding_dim
        term = MoveFromTied(tuple(names), tuple(f"{t}.weight" for t, _ in to), coef, d, rows)
        tied = names[0].rpartition(".")[0]
        return TiedTableShiftFactor(
            f"move:{tied}->{','.join(t for t, _ in to)}",
            d - 1,
            terms=(term,),
            modules=(tied, *(t for t, _ in to)),
        )

    def _stream_sources(self, src: fx.Node, E: int) -> None:
        """Parameters added or concatenated into a stream that only LayerNorms read (a class
        token, a position table), and a convolution read channels-last (ViT's patch
        projection), each reaching `src` through nodes nothing else reads: the parameter's
        rows move along `1` (`CenteredRowsFactor`), the convolution's output along `1`
        (`CenteredOutputFactor` over its flattened inputs)."""
        for kind, node in self._leaves(src, E, top=True):
            name = str(node.target)
            if name in self.centered_layers:
                continue
            if kind == "param":
                if self._shared(name):
                    continue
                p = self.root.get_parameter(name)
                self.centered_layers.add(name)
                self.L.extra.append(
                    CenteredRowsFactor(
                        f"center:{name}",
                        p.numel() // E,
                        terms=(RowsAlongOne(name),),
                        modules=(name.rpartition(".")[0],),
                    )
                )
            else:
                m = self.root.get_submodule(name)
                if self._shared(f"{name}.weight"):
                    continue
                b = f"{name}.bias" if m.bias is not None else None
                self.centered_layers.add(name)
                self.L.extra.append(
                    centered_output(Linear(node, f"{name}.weight", b, 0), self.root)
                )
        self._position_moves(src, E)

    def _position_moves(self, src: fx.Node, E: int) -> None:
        """`cat([segments], tokens) + table` (ViT: class token, then patches, plus positions),
        the sum reaching `src` through nodes nothing else reads: each segment's tokens read
        their rows of the table and one carrier (a class-token parameter, or the bias of the
        patch projection), so a vector `⊥ 1` moves between them (`RowMoveFactor`)."""
        node = src
        while self._kept(node):
            node = node.args[0]
            if not isinstance(node, fx.Node) or len(node.users) != 1:
                return
        if node.target not in (operator.add, torch.add) or node.kwargs or len(node.args) != 2:
            return
        a, b = node.args
        cat, table = (a, b) if param_name(b, self.root) else (b, a)
        name = param_name(table, self.root)
        v = self.values.get(cat)
        if name is None or not isinstance(cat, fx.Node) or cat.target is not torch.cat:
            return
        p = self.root.get_parameter(name)
        if not isinstance(v, torch.Tensor) or v.ndim != 3 or p.shape[-2:] != v.shape[-2:]:
            return
        if p.numel() != v.shape[1] * E or self._shared(name) or len(cat.users) != 1:
            return
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if dim % 3 != 1:
            return
        start = 0
        for seg in cat.args[0]:
            n = self.values[seg].shape[1]
            carrier = self._carrier(seg, E)
            if carrier is not None:
                term = IntoRows(carrier, name, start, start + n, E)
                self.L.extra.append(
                    RowMoveFactor(
                        f"move:{name}[{start}:{start + n}]->{carrier}",
                        E - 1,
                        terms=(term,),
                        modules=(carrier.rpartition(".")[0], name.rpartition(".")[0]),
                    )
                )
            start += n

    def _carrier(self, seg: Any, E: int) -> str | None:
        """What every token of a concatenated segment carries once: an expanded parameter
        of one row, or the bias of a channels-last convolution."""
        if not isinstance(seg, fx.Node) or len(seg.users) != 1:
            return None
        if seg.target is expand_to:
            name = param_name(seg.args[0], self.root)
            ok = name is not None and self.root.get_parameter(name).numel() == E
            return name if ok and not self._shared(name) else None
        conv = self._channels_last_conv(seg, E)
        if conv is None or self.root.get_submodule(str(conv.target)).bias is None:
            return None
        return f"{conv.target}.bias"

    def _leaves(self, node: Any, E: int, top: bool = False) -> list[tuple[str, fx.Node]]:
        """`("param", get_attr)` and `("conv", conv node)` leaves of the sums and token
        concatenations that make `node`; every node below `node` read by its parent only."""
        if not isinstance(node, fx.Node):
            return []
        users = graph_users(node)
        if not top and len(users) != 1:
            return []
        v = self.values.get(node)
        if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[-1] != E:
            return []
        if node.op == "get_attr":
            return [("param", node)] if param_name(node, self.root) else []
        if self._kept(node) or node.target is expand_to:
            return self._leaves(node.args[0], E)
        if node.op != "call_function":
            return []
        t, args = node.target, node.args
        if t in (operator.add, torch.add) and not node.kwargs:
            return [x for a in args[:2] for x in self._leaves(a, E)]
        if t is torch.cat:
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            if dim % v.ndim == v.ndim - 1:
                return []
            return [x for a in args[0] for x in self._leaves(a, E)]
        conv = self._channels_last_conv(node, E)
        return [("conv", conv)] if conv is not None else []

    def _channels_last_conv(self, node: fx.Node, E: int) -> fx.Node | None:
        """The `nn.Conv2d` node when `node` is `transpose(flatten(conv(x), 2), 1, 2)`: its
        `E` output channels on the last axis, one token per position."""
        if node.target is not torch.transpose or tuple(node.args[1:]) not in ((1, 2), (2, 1)):
            return None
        flat = node.args[0]
        if not (
            isinstance(flat, fx.Node)
            and flat.target is torch.flatten
            and tuple(flat.args[1:]) in ((2,), (2, -1))
            and len(flat.users) == 1
        ):
            return None
        conv = flat.args[0]
        if not (isinstance(conv, fx.Node) and conv.op == "call_module" and len(conv.users) == 1):
            return None
        m = self.root.get_submodule(str(conv.target))
        ok = isinstance(m, nn.Conv2d) and m.out_channels == E and m.groups == 1
        return conv if ok else None

    def _lookups(self, node: Any, scale: float = 1.0) -> list[tuple[fx.Node, float]]:
        """The embedding lookups summed into `node` (through additions, casts, eval-mode
        dropouts and products with one constant number, whoever else reads the partial
        sums), each with the number its rows are multiplied by on the way."""
        if not isinstance(node, fx.Node):
            return []
        if node.op == "call_function" and node.target in (operator.add, torch.add):
            return [t for a in node.args[:2] for t in self._lookups(a, scale)]
        if self._kept(node):
            return self._lookups(node.args[0], scale)
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        if inputs and scaled_by_constant(node, inputs[0], self.root, self.values):
            # a lookup times one number (Pegasus's `√d`): its rows still move along `1`
            c = constant_factor(node, inputs[0], self.values)
            return self._lookups(inputs[0], scale * c)
        if node.op == "call_module" and isinstance(
            self.root.get_submodule(str(node.target)), nn.Embedding
        ):
            return [(node, scale)]
        return []

    def _sum_root(self, node: fx.Node) -> fx.Node:
        """The last node reached from `node` through sole readers that are additions, casts
        or eval-mode dropouts: lookups with the same root are summed and read nowhere else."""
        while True:
            users = graph_users(node)
            if len(users) != 1:
                return node
            (u,) = users
            added = u.op == "call_function" and u.target in (operator.add, torch.add)
            scaled = scaled_by_constant(u, node, self.root, self.values)
            if not (added or scaled or self._kept(u)):
                return node
            node = u

    def _kept(self, node: fx.Node) -> bool:
        """`node` passes its first input on unchanged: a cast, or a dropout outside
        training."""
        if node.op == "call_function":
            return node.target in CASTS
        if node.op == "call_module":
            mod = self.root.get_submodule(str(node.target))
            return isinstance(mod, nn.Dropout) and not mod.training
        return False

    def _shared(self, param: str) -> bool:
        """Whether the parameter `param` is also reachable under another name (tied)."""
        p = self.root.get_parameter(param)
        return sum(q is p for _, q in self.root.named_parameters(remove_duplicate=False)) > 1

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

    def _output_layer(self, s: Any, E: int) -> Linear | None:
        """The linear map of width `E` whose output `s` is, when only one node reads it (an
        `nn.Linear`, an `addmm` viewed back to tokens, or an `nn.MultiheadAttention`'s
        output projection)."""
        if not isinstance(s, fx.Node) or len(s.users) != 1:
            return None
        lin = linear_writing(s, self.root, self.values)
        if lin is not None:
            return lin if lin.shape(self.root)[0] == E else None
        if s.op == "call_function" and s.target is operator.getitem and s.args[1] == 0:
            att = s.args[0]
            if not (isinstance(att, fx.Node) and att.op == "call_module") or len(att.users) != 1:
                return None
            mod = self.root.get_submodule(str(att.target))
            if isinstance(mod, nn.MultiheadAttention) and mod.embed_dim == E:
                t = f"{att.target}.out_proj"
                b = f"{t}.bias" if mod.out_proj.bias is not None else None
                return Linear(s, f"{t}.weight", b, 0)
        return None

    def _upstream(self, node: Any) -> list[Any]:
        """The terms summed into `node` through additions, casts, reshapes of the token axes
        and eval-mode dropouts, whoever else reads the partial sums (a residual stream)."""
        if not isinstance(node, fx.Node):
            return [node]
        if node.op == "call_function" and node.target in ADD_OPS:
            return [t for a in node.args[:2] for t in self._upstream(a)]
        if self._kept(node):
            return self._upstream(node.args[0])
        src = node.args[0] if node.args else None
        before = self.values.get(src) if isinstance(src, fx.Node) else None
        if (
            isinstance(before, torch.Tensor)
            and before.ndim > 0
            and keeps_last_axis(node, before.shape[-1], self.values)
        ):
            return self._upstream(src)
        return [node]

    def _removed(self, node: fx.Node, E: int, memo: dict) -> bool:
        """Whether every path from `node` ends in a LayerNorm over its `E` last features,
        through additions, casts, reshapes of the token axes and eval-mode dropouts only:
        then anything `node` carries along `1` changes no output."""
        if node in memo:
            return memo[node]
        memo[node] = False  # no cycles in a graph, but stay safe
        users = graph_users(node)
        ok = bool(users)
        for u in users:
            if self._kept(u) or (keeps_last_axis(u, E, self.values) and u.args[0] is node):
                ok = ok and self._removed(u, E, memo)
                continue
            if scaled_by_constant(u, node, self.root, self.values):
                ok = ok and self._removed(u, E, memo)
                continue
            if u.op == "call_module":
                mod = self.root.get_submodule(str(u.target))
                if isinstance(mod, nn.LayerNorm) and tuple(mod.normalized_shape) == (E,):
                    ok = ok and u.args[0] is node
                    continue
            elif u.op == "call_function" and u.target in ADD_OPS:
                ok = ok and self._removed(u, E, memo)
                continue
            ok = False
        memo[node] = ok
        return ok

    def softmax_inputs(self, n: fx.Node, dim: Any) -> None:
        """A softmax (or log-softmax) over the last axis of a linear layer's output that
        nothing else reads: `softmax(z + c 1) = softmax(z)`, so what the layer adds along
        `1` changes no output (`W += 1 aᵀ`, `b += t 1`; a classifier's logits, say)."""
        src = n.args[0] if n.args else None
        val = self.values.get(src) if isinstance(src, fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.ndim == 0 or not isinstance(dim, int):
            return
        if dim % val.ndim != val.ndim - 1:
            return
        found = self._output_layer(src, val.shape[-1])
        if found is None or found.out_axis != 0 or found.name in self.centered_layers:
            return
        if not isinstance(self.root.get_submodule(found.name), nn.Linear):
            return
        self.centered_layers.add(found.name)
        self.L.extra.append(centered_output(found, self.root))

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
            if found is None or not self._removed(s, E, memo):
                continue
            calls = self.centered_calls.get(found.name)
            if found.name in done and (calls is None or s in calls):
                continue  # centered by another rule, or at this call already
            # a further call of a layer centered at another call (a shared layer): a copy,
            # derived for this application too (`_build._applied_alike` keeps one)
            self.centered_calls.setdefault(found.name, set()).add(s)
            done.add(found.name)
            self.L.extra.append(centered_output(found, self.root))
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
            if found is None or found.bias is None:
                continue
            t, value = found.name, None
            att = self.root.get_submodule(t.rpartition(".")[0]) if "." in t else None
            if isinstance(att, nn.MultiheadAttention) and att.in_proj_bias is not None:
                value = (f"{t}.weight", f"{t.rpartition('.')[0]}.in_proj_bias", 2 * E)
            term = BiasAlongOne(found.bias, tuple(compensate), value)
            self.L.extra.append(
                CenteredBiasFactor(
                    f"center_bias:{t}",
                    1,
                    terms=(term,),
                    modules=(t, *(c.rpartition(".")[0] for c in compensate)),
                )
            )
