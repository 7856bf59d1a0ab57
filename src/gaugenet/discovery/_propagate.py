"""Propagating scale and channel labels through a traced graph (the rules of discovery).

The interpreter runs the graph on example inputs, so every shape is concrete, and beside
each value computes its two label maps (see `_labels.py`). Each rule says how one kind of
operation maps input labels to output labels and which parameters transform how.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..groups import AffineFactor, AffineTerm, GLFactor, MatTerm
from ._labels import FIXED, ZERO, Labels, unique_pairs
from ._norm_rules import NormRules
from ._ops import (
    ADD_OPS,
    CASTS,
    HOMOGENEOUS_FUNCS,
    HOMOGENEOUS_MODULES,
    METADATA_OPS,
    MUL_OPS,
    NONHOMOGENEOUS_FUNCS,
    NONHOMOGENEOUS_METHODS,
    POOL_FUNCS,
    POOL_MODULES,
    VIEW_FUNCS,
    VIEW_METHODS,
    nonhomogeneous_reason,
)
from ._shifts import AbsorbedShiftFactor, GroupShiftFactor, IntoBatchNorm, RemovedByNorm

__all__ = ["Propagator"]

Pair = tuple[Tensor, Tensor]  # (scale labels, perm labels)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_IN = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _fixed(v: Tensor) -> Pair:
    z = torch.zeros(v.shape, dtype=torch.long)
    return z, z.clone()


def _is_float(v: Any) -> bool:
    return isinstance(v, Tensor) and v.is_floating_point()


class Propagator(NormRules, fx.Interpreter):
    """Runs `gm` on example inputs and fills `self.labels` (a `Labels`)."""

    def __init__(self, gm: fx.GraphModule, root: nn.Module) -> None:
        super().__init__(gm)
        self.root = root
        self.L = Labels()
        self.env_labels: dict[fx.Node, Any] = {}
        self.param_ids = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
        self.centered_layers: set[str] = set()
        self.removed_memo: dict[fx.Node, bool] = {}
        #: every node's value on the example inputs (the attention pass probes paths with them)
        self.values: dict[fx.Node, Any] = {}

    # -- plumbing -------------------------------------------------------------------------
    def lab(self, a: Any) -> Pair | None:
        if isinstance(a, fx.Node):
            return self.env_labels.get(a)
        return None

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out
        try:
            self.env_labels[n] = self.rule(n, out)
        except _Unsupported as exc:
            self.env_labels[n] = self.break_all(n, out, str(exc))
        return out

    def _labeled_input(self, n: fx.Node) -> bool:
        labs = (self.env_labels.get(a) for a in n.all_input_nodes)
        return any(isinstance(lab, tuple) and isinstance(lab[0], Tensor) for lab in labs)

    def break_all(self, n: fx.Node, out: Any, reason: str) -> Pair | None:
        for a in n.all_input_nodes:
            lab = self.env_labels.get(a)
            if isinstance(lab, tuple) and isinstance(lab[0], Tensor):
                self.L.fix_scales(lab[0], n.name, reason)
                self.L.fix_perms(lab[1], n.name, reason)
        return _fixed(out) if _is_float(out) else None

    def use_param(self, name: str, node: str) -> None:
        p = self.root.get_parameter(name)
        self.L.param_users.setdefault(id(p), []).append((name, node))

    # -- dispatch -------------------------------------------------------------------------
    def rule(self, n: fx.Node, out: Any) -> Any:
        if n.op == "placeholder" or n.op == "get_attr":
            return _fixed(out) if _is_float(out) else None
        if n.op == "output":
            for lab in _flatten_labels(self.lab_tree(n.args[0])):
                self.L.fix_scales(lab[0], "output", "the output is fixed", quiet=True)
                self.L.fix_perms(
                    lab[1], "output", "the output is not allowed to change", quiet=True
                )
            return None
        if n.op == "call_module" and isinstance(
            self.root.get_submodule(n.target), nn.MultiheadAttention
        ):
            return self.attention_inputs(n, self.root.get_submodule(n.target), out)
        if not _is_float(out):
            if isinstance(out, (tuple, list)) and n.op == "call_module":
                raise _Unsupported(
                    f"module {type(self.root.get_submodule(n.target)).__name__} "
                    "returns several tensors"
                )
            if n.op != "call_module" and not _label_free(n) and self._labeled_input(n):
                # a result the rules do not follow (a tuple of chunks, a comparison, ...):
                # whatever its inputs carry must be fixed, or it would pass unseen
                name = getattr(n.target, "__name__", n.target)
                raise _Unsupported(f"{name}: its result is not one float tensor")
            return None
        if n.op == "call_module":
            return self.module_rule(n, self.root.get_submodule(n.target), out)
        if n.op == "call_method":
            return self.method_rule(n, out)
        return self.function_rule(n, out)

    def lab_tree(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.env_labels.get(a)
        if isinstance(a, (tuple, list)):
            return [self.lab_tree(x) for x in a]
        if isinstance(a, dict):
            return [self.lab_tree(x) for x in a.values()]
        return None

    def first(self, n: fx.Node) -> tuple[fx.Node, Pair]:
        a = n.args[0]
        lab = self.lab(a)
        if lab is None:
            raise _Unsupported(f"{n.target}: input carries no labels")
        return a, lab

    # -- modules --------------------------------------------------------------------------
    def module_rule(self, n: fx.Node, m: nn.Module, out: Tensor) -> Pair:
        name = str(n.target)
        if isinstance(m, nn.Embedding):
            # its rows are not analyzed here; recording the use lets a tied table be seen
            self.use_param(f"{name}.weight", name)
            return _fixed(out)
        _, (s, p) = self.first(n)
        if isinstance(m, (nn.Linear, *_CONV)):
            lab = self.affine_layer(name, m, s, p, out)
            if isinstance(m, nn.Linear):
                self.consecutive_linear(n, m)
            return lab
        if isinstance(m, _BN):
            lab = self.batchnorm(name, m, s, p, out)
            self.bias_before_bn(n, m)
            return lab
        if isinstance(m, nn.LayerNorm):
            self.layernorm_shift(n, m)
            self.layernorm_kernel(n, m)
            self.centered_inputs(n, m)
            self.embedding_sum(n)
            return self.layernorm(name, m, s, p, out)
        if isinstance(m, (nn.GroupNorm, *_IN)):
            self.bias_before_mean_removal(n, m)
        if isinstance(m, nn.Embedding):
            raise _Unsupported("embedding input is not a float tensor")
        if isinstance(m, HOMOGENEOUS_MODULES):
            if isinstance(m, nn.PReLU) and m.num_parameters > 1:
                self.carrier(name, [f"{name}.weight"], p, axis=1)
            return s, p
        if isinstance(m, POOL_MODULES):
            return self.pool(name, s, p, out)
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return m(s), m(p)
        reason = nonhomogeneous_reason(type(m))
        if reason is not None:
            self.L.fix_scales(s, name, reason)
            return torch.zeros_like(s), p
        raise _Unsupported(f"module {type(m).__name__} is not analyzed")

    def affine_layer(self, name: str, m: nn.Module, s: Tensor, p: Tensor, out: Tensor) -> Pair:
        conv = isinstance(m, _CONV)
        axis = 1 if conv else -1
        groups = m.groups if conv else 1
        self.use_param(f"{name}.weight", name)
        # sink: each input channel's scale divides its weight column
        cols = self.L.per_channel(s, axis)
        reps = torch.tensor([self.L.union_all(c) if len(c) else ZERO for c in cols])
        w = m.weight
        ipg, opg = w.shape[1], w.shape[0] // groups
        # (1, in) broadcast over the output rows when ungrouped: a weight-sized index would
        # cost 8 bytes per weight entry (gigabytes for a large model analyzed on meta)
        col_index = (
            reps.reshape(1, ipg)
            if groups == 1
            else reps.reshape(groups, ipg).repeat_interleave(opg, 0)
        )  # (out or 1, in/groups)
        col_index = col_index.reshape(*col_index.shape, *([1] * (w.ndim - 2)))
        self.L.scale_terms.append((f"{name}.weight", col_index, -1))
        pcols = self.L.per_channel(p, axis)
        if groups == 1 and all(len(c) <= 1 for c in pcols):
            ids = torch.tensor([int(c[0]) if len(c) else ZERO for c in pcols])
            self.L.perm_terms.append((f"{name}.weight", 1, ids))
        else:
            self.L.fix_perms(p, name, "grouped convolution or mixed channels")
        # source: fresh ids per output channel
        fresh = self.L.fresh(w.shape[0], name)
        self.L.scale_terms.append((f"{name}.weight", fresh.reshape(-1, *([1] * (w.ndim - 1))), 1))
        self.L.perm_terms.append((f"{name}.weight", 0, fresh))
        self.L.links.append((fresh, fresh))
        if groups > 1:
            # output channel c reads only the inputs of its group: a permutation across
            # groups changes what it reads (and the input side is fixed above)
            self.L.fix_perms(fresh, name, "grouped convolution: outputs read their group only")
        if m.bias is not None:
            self.use_param(f"{name}.bias", name)
            self.L.scale_terms.append((f"{name}.bias", fresh, 1))
            self.L.perm_terms.append((f"{name}.bias", 0, fresh))
        lab = _broadcast_channels(fresh, out.shape, axis)
        return lab, lab.clone()

    def matmul_param(self, n: fx.Node, out: Tensor) -> Pair:
        """`addmm(b, x, W)` / `mm(x, W)` with parameters `W` (`(in, out)`, as GPT-2's Conv1D)
        and `b`: a linear layer in the paper's orientation."""
        addmm = n.target is torch.ops.aten.addmm.default
        bias_node, x, w_node = n.args if addmm else (None, *n.args)
        wname = self._param_name(w_node)
        bname = self._param_name(bias_node) if addmm else None
        if n.kwargs or wname is None or (addmm and bname is None):
            raise _Unsupported("matrix product with computed operands or coefficients")
        lab = self.lab(x)
        if lab is None:
            raise _Unsupported("matrix product of an unlabeled input")
        s, p = lab
        module = wname.rpartition(".")[0]
        self.use_param(wname, n.name)
        reps = torch.tensor(
            [self.L.union_all(c) if len(c) else ZERO for c in self.L.per_channel(s, -1)]
        )
        self.L.scale_terms.append((wname, reps.reshape(-1, 1), -1))
        pcols = self.L.per_channel(p, -1)
        if all(len(c) <= 1 for c in pcols):
            ids = torch.tensor([int(c[0]) if len(c) else ZERO for c in pcols])
            self.L.perm_terms.append((wname, 0, ids))
        else:
            self.L.fix_perms(p, module, "mixed channels into a matrix product")
        fresh = self.L.fresh(out.shape[-1], module)
        self.L.scale_terms.append((wname, fresh.reshape(1, -1), 1))
        self.L.perm_terms.append((wname, 1, fresh))
        self.L.links.append((fresh, fresh))
        if bname is not None:
            self.use_param(bname, n.name)
            self.L.scale_terms.append((bname, fresh, 1))
            self.L.perm_terms.append((bname, 0, fresh))
        lab = _broadcast_channels(fresh, out.shape, -1)
        return lab, lab.clone()

    def _sole_producer(self, n: fx.Node, types: tuple[type, ...]) -> tuple[str, nn.Module] | None:
        """The layer of one of `types` whose output only `n` reads, if `n`'s input is one."""
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            return None
        m = self.root.get_submodule(str(src.target))
        return (str(src.target), m) if isinstance(m, types) else None

    def bias_before_bn(self, n: fx.Node, bn: nn.Module) -> None:
        """A bias right before eval-mode affine BatchNorm is absorbed by its shift `β`."""
        prod = self._sole_producer(n, (nn.Linear, *_CONV))
        if prod is None or bn.training or not bn.track_running_stats or not bn.affine:
            return
        name, m = prod
        if m.bias is None or (isinstance(m, _CONV) and m.weight.shape[0] != bn.num_features):
            return
        term = IntoBatchNorm(f"{name}.bias", str(n.target), float(bn.eps))
        self.L.extra.append(
            AbsorbedShiftFactor(
                f"shift:{name}", bn.num_features, terms=(term,), modules=(name, str(n.target))
            )
        )

    def bias_before_mean_removal(self, n: fx.Node, norm: nn.Module) -> None:
        """A convolution's bias right before an InstanceNorm (per channel) or a GroupNorm
        (per group, equal over its channels) that normalizes with the sample's own statistics:
        the mean subtraction removes the shift."""
        prod = self._sole_producer(n, _CONV)
        if prod is None:
            return
        if isinstance(norm, nn.GroupNorm):
            channels, groups = norm.num_channels, norm.num_groups
        else:
            if norm.track_running_stats and not norm.training:
                return  # eval mode with running statistics: the mean is not the sample's
            channels = groups = norm.num_features
        name, m = prod
        if m.bias is None or m.weight.shape[0] != channels:
            return
        term = RemovedByNorm(f"{name}.bias", channels // groups)
        cls = GroupShiftFactor if groups != channels else AbsorbedShiftFactor
        self.L.extra.append(cls(f"shift:{name}", groups, terms=(term,), modules=(name,)))

    def attention_inputs(self, n: fx.Node, m: nn.MultiheadAttention, out: Any) -> Pair:
        """`nn.MultiheadAttention` (its own factors come from its analyzer): a per-feature
        scale of the query, key or value input passes into the matching columns of the
        packed input projection (`in_proj_weight[:, j] ↦ in_proj_weight[:, j] / s_j`), which
        commutes with the attention's own factors (they act on rows). The output is fixed.
        Returns labels for `(attn_output, attn_weights)`."""
        if not m._qkv_same_embed_dim or len(n.args) < 3 or m.bias_k is not None:
            raise _Unsupported("attention without a packed input projection")
        E = m.embed_dim
        idx = torch.full((3 * E, E), FIXED, dtype=torch.long)
        for i, a in enumerate(n.args[:3]):
            lab = self.lab(a)
            if lab is None:
                continue
            s, p = lab
            self.L.fix_perms(p, n.name, "attention mixes its input features")
            cols = self.L.per_channel(s, -1)
            if s.shape[-1] != E or any(len(c) != 1 for c in cols):
                self.L.fix_scales(s, n.name, "attention input scales vary across tokens")
                continue
            idx[i * E : (i + 1) * E] = torch.tensor([int(c[0]) for c in cols])[None, :]
        name = str(n.target)
        self.use_param(f"{name}.in_proj_weight", name)
        self.L.scale_terms.append((f"{name}.in_proj_weight", idx, -1))
        first = _fixed(out[0]) if _is_float(out[0]) else None
        second = _fixed(out[1]) if len(out) > 1 and _is_float(out[1]) else None
        return [first[0] if first else None, second[0] if second else None], [
            first[1] if first else None,
            second[1] if second else None,
        ]

    def consecutive_linear(self, n: fx.Node, m: nn.Linear) -> None:
        """`B(A x)` with nothing between: `A ↦ G⁻¹A`, `B ↦ B G` for any invertible `G`. This
        contains the rescaling and permutations of `A`'s outputs, which are dropped."""
        prod = self._sole_producer(n, (nn.Linear,))
        if prod is None:
            return
        a_name, a = prod
        b_name = str(n.target)
        r = a.out_features
        ids = [
            v
            for v, blk in enumerate(self.L.block_of)
            if blk >= 0 and self.L.blocks[blk][2] == a_name
        ]
        self.L.fix_scales(torch.tensor(ids), b_name, "", quiet=True)
        self.L.fix_perms(torch.tensor(ids), b_name, "", quiet=True)
        if a.bias is not None and m.bias is not None:
            # with both biases the states may also be shifted: the affine group GA(r)
            terms = (
                AffineTerm(f"{a_name}.weight", f"{a_name}.bias", "left"),
                AffineTerm(f"{b_name}.weight", f"{b_name}.bias", "right"),
            )
            self.L.extra.append(
                AffineFactor(f"affine:{a_name}+{b_name}", r, terms=terms, modules=(a_name, b_name))
            )
            return
        terms = [MatTerm(f"{a_name}.weight", 0, 0, "inv"), MatTerm(f"{b_name}.weight", 1, 0, "T")]
        if a.bias is not None:
            terms.insert(1, MatTerm(f"{a_name}.bias", 0, 0, "inv"))
        self.L.extra.append(
            GLFactor(f"gl:{a_name}+{b_name}", r, 1, terms=tuple(terms), modules=(a_name, b_name))
        )

    def batchnorm(self, name: str, m: nn.Module, s: Tensor, p: Tensor, out: Tensor) -> Pair:
        uses_batch_stats = m.training or not m.track_running_stats
        reps = torch.tensor(
            [self.L.union_all(c) if len(c) else ZERO for c in self.L.per_channel(s, 1)]
        )
        if uses_batch_stats:
            self.L.fix_scales(
                s, name, "BatchNorm in training mode normalizes with batch statistics"
            )
        elif not m.affine:
            self.L.fix_scales(s, name, "BatchNorm without affine parameters cannot absorb a scale")
        else:
            self.L.scale_terms.append(("bnshift", name, float(m.eps), reps))
        pcols = self.L.per_channel(p, 1)
        perm_ok = all(len(c) <= 1 for c in pcols)
        pids = torch.tensor([int(c[0]) if len(c) else ZERO for c in pcols])
        if not perm_ok:
            self.L.fix_perms(p, name, "channels mixed before BatchNorm")
        else:
            names = [f"{name}.running_mean", f"{name}.running_var"] if m.track_running_stats else []
            if m.affine:
                names += [f"{name}.weight", f"{name}.bias"]
            for q in names:
                self.L.perm_terms.append((q, 0, pids))
        if not m.affine:
            return torch.zeros_like(s), p
        self.use_param(f"{name}.weight", name)
        self.use_param(f"{name}.bias", name)
        fresh = self.L.fresh(m.num_features, name + ":out")
        self.L.scale_terms.append((f"{name}.weight", fresh, 1))
        self.L.scale_terms.append((f"{name}.bias", fresh, 1))
        if perm_ok:
            self.L.links.append((fresh, pids))
        return _broadcast_channels(fresh, out.shape, 1), p

    def layernorm(self, name: str, m: nn.LayerNorm, s: Tensor, p: Tensor, out: Tensor) -> Pair:
        self.L.fix_scales(s, name, "LayerNorm subtracts the mean over its features")
        k = len(m.normalized_shape)
        if k == 1:
            pcols = self.L.per_channel(p, -1)
            pids = torch.tensor([int(c[0]) if len(c) == 1 else ZERO for c in pcols])
            if any(len(c) > 1 for c in pcols):
                self.L.fix_perms(p, name, "channels mixed before LayerNorm")
        else:
            self.L.fix_perms(p, name, "LayerNorm over several dimensions")
            pids = None
        if not m.elementwise_affine:
            return torch.zeros_like(s), p
        self.use_param(f"{name}.weight", name)
        fresh = self.L.fresh(m.weight.numel(), name + ":out").reshape(m.weight.shape)
        self.L.scale_terms.append((f"{name}.weight", fresh, 1))
        if m.bias is not None:
            self.use_param(f"{name}.bias", name)
            self.L.scale_terms.append((f"{name}.bias", fresh, 1))
        if pids is not None:
            for q in [f"{name}.weight"] + ([f"{name}.bias"] if m.bias is not None else []):
                self.L.perm_terms.append((q, 0, pids))
            self.L.links.append((fresh.reshape(-1), pids))
        return fresh.expand(out.shape).clone(), p

    def carrier(self, node: str, names: list[str], p: Tensor, axis: int) -> None:
        """Per-channel parameters that must be permuted along with their channels."""
        pcols = self.L.per_channel(p, axis)
        if any(len(c) > 1 for c in pcols):
            self.L.fix_perms(p, node, "channels mixed before a per-channel layer")
            return
        pids = torch.tensor([int(c[0]) if len(c) else ZERO for c in pcols])
        for q in names:
            self.L.perm_terms.append((q, 0, pids))

    def pool(self, node: str, s: Tensor, p: Tensor, out: Tensor) -> Pair:
        """Pooling mixes positions within a channel: their scales must agree."""
        reps = torch.tensor(
            [self.L.union_all(c) if len(c) else ZERO for c in self.L.per_channel(s, 1)]
        )
        pcols = self.L.per_channel(p, 1)
        if any(len(c) > 1 for c in pcols):
            self.L.fix_perms(p, node, "pooling over mixed channels")
        pids = torch.tensor([int(c[0]) if len(c) == 1 else FIXED for c in pcols])
        return _broadcast_channels(reps, out.shape, 1), _broadcast_channels(pids, out.shape, 1)

    # -- functions and methods -----------------------------------------------------------
    def method_rule(self, n: fx.Node, out: Tensor) -> Pair:
        _, (s, p) = self.first(n)
        if n.target in VIEW_METHODS:
            args = [self.env[a] if isinstance(a, fx.Node) else a for a in n.args[1:]]
            kwargs = {k: self.env[v] if isinstance(v, fx.Node) else v for k, v in n.kwargs.items()}
            return getattr(s, n.target)(*args, **kwargs), getattr(p, n.target)(*args, **kwargs)
        if n.target in ("relu", "relu_"):
            return s, p
        if n.target in NONHOMOGENEOUS_METHODS:
            self.L.fix_scales(s, n.name, NONHOMOGENEOUS_METHODS[n.target])
            return torch.zeros_like(s), p
        if n.target in ("__getitem__",):
            return self.getitem(n, s, p)
        if n.target in ("mean", "sum"):
            return self.reduce(n, s, p, out)
        raise _Unsupported(f"method .{n.target}() is not analyzed")

    def function_rule(self, n: fx.Node, out: Tensor) -> Pair:
        f = n.target
        if f in HOMOGENEOUS_FUNCS or f in CASTS:
            _, (s, p) = self.first(n)
            return s, p
        if f in NONHOMOGENEOUS_FUNCS:
            _, (s, p) = self.first(n)
            self.L.fix_scales(s, n.name, nonhomogeneous_reason(f))
            return torch.zeros_like(s), p
        if f in POOL_FUNCS:
            _, (s, p) = self.first(n)
            return self.pool(n.name, s, p, out)
        if f in VIEW_FUNCS:
            _, (s, p) = self.first(n)
            args = [self.env[a] if isinstance(a, fx.Node) else a for a in n.args[1:]]
            return f(s, *args, **n.kwargs), f(p, *args, **n.kwargs)
        if f is operator.getitem:
            _, (s, p) = self.first(n)
            return self.getitem(n, s, p)
        if f is F.pad:
            return self.pad(n)
        if f in ADD_OPS:
            return self.add(n, out)
        if f in MUL_OPS:
            return self.mul(n, out)
        if f is torch.cat:
            return self.cat(n, out)
        if f in (torch.matmul, operator.matmul):
            return self.matmul(n, out)
        if f in (torch.mean, torch.sum):
            _, (s, p) = self.first(n)
            return self.reduce(n, s, p, out)
        if f in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
            return self.matmul_param(n, out)
        raise _Unsupported(f"operation {getattr(f, '__name__', f)} is not analyzed")

    def getitem(self, n: fx.Node, s: Tensor, p: Tensor) -> Pair:
        idx = n.args[1]
        idx = self.env[idx] if isinstance(idx, fx.Node) else idx
        return s[idx], p[idx]

    def pad(self, n: fx.Node) -> Pair:
        _, (s, p) = self.first(n)
        pad = n.args[1] if len(n.args) > 1 else n.kwargs["pad"]
        mode = n.kwargs.get("mode", n.args[2] if len(n.args) > 2 else "constant")
        value = n.kwargs.get("value", n.args[3] if len(n.args) > 3 else None)
        if mode != "constant":
            raise _Unsupported(f"padding mode {mode!r} is not analyzed")
        if value not in (None, 0, 0.0):
            self.L.fix_scales(s, n.name, f"padding with the constant {value} is not homogeneous")
        return F.pad(s, pad, value=ZERO), F.pad(p, pad, value=ZERO)

    def reduce(self, n: fx.Node, s: Tensor, p: Tensor, out: Tensor) -> Pair:
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if dims is None:
            raise _Unsupported("reduction over all dimensions")
        dims = [dims] if isinstance(dims, int) else list(dims)
        keep = n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)
        dims = sorted(d % s.ndim for d in dims)
        rest = [d for d in range(s.ndim) if d not in dims]
        sm = s.permute(*rest, *dims).reshape(*[s.shape[d] for d in rest], -1)
        pm = p.permute(*rest, *dims).reshape(*[s.shape[d] for d in rest], -1)
        s_out = torch.tensor([self.L.union_all(r) for r in sm.reshape(-1, sm.shape[-1])])
        p_uniq = [torch.unique(r[r != ZERO]) for r in pm.reshape(-1, pm.shape[-1])]
        p_out = torch.tensor([int(u[0]) if len(u) == 1 else FIXED for u in p_uniq])
        s_out, p_out = s_out.reshape(sm.shape[:-1]), p_out.reshape(sm.shape[:-1])
        if keep:
            for d in dims:
                s_out, p_out = s_out.unsqueeze(d), p_out.unsqueeze(d)
        return s_out.reshape(out.shape), p_out.reshape(out.shape)

    def _param_name(self, a: Any) -> str | None:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            v = self.env[a]
            return self.param_ids.get(id(v))
        return None

    def add(self, n: fx.Node, out: Tensor) -> Pair:
        a, b = n.args[0], n.args[1]
        la, lb = self.lab(a), self.lab(b)
        pa, pb = self._param_name(a), self._param_name(b)
        if la is not None and lb is not None and pa is None and pb is None:
            sa, sb = (x.expand(out.shape) for x in (la[0], lb[0]))
            qa, qb = (x.expand(out.shape) for x in (la[1], lb[1]))
            both = (sa != ZERO) & (sb != ZERO)
            for x, y in unique_pairs(sa[both], sb[both]).tolist():
                self.L.union(x, y)
            self.L.align(qa, qb, n.name)
            return torch.where(sa != ZERO, sa, sb).clone(), torch.where(qa != ZERO, qa, qb).clone()
        if (la is not None) and (pb is not None or pa is not None):
            (s, p), pname = (la, pb) if pb is not None else (lb, pa)
            return self.bias_add(n, s, p, pname, out)
        lab = la if la is not None else lb
        other = b if la is not None else a
        if lab is None:
            raise _Unsupported("addition of unlabeled values")
        if isinstance(other, (int, float)) and other == 0:
            return lab
        self.L.fix_scales(lab[0], n.name, "adding a constant is not homogeneous")
        if isinstance(other, (int, float)):
            return torch.zeros_like(lab[0]), lab[1]
        self.L.fix_perms(lab[1], n.name, "adding a constant tensor")
        return _fixed(out)

    def bias_add(self, n: fx.Node, s: Tensor, p: Tensor, pname: str, out: Tensor) -> Pair:
        """`x + b` with `b` a parameter: `b` is scaled and permuted with `x`'s channels."""
        self.use_param(pname, n.name)
        b = self.root.get_parameter(pname)
        if b.ndim != 1:
            raise _Unsupported(f"adding the {b.ndim}-d parameter {pname}")
        reps = torch.tensor(
            [
                self.L.union_all(c) if len(c) else ZERO
                for c in self.L.per_channel(s.expand(out.shape), -1)
            ]
        )
        self.L.scale_terms.append((pname, reps, 1))
        self.carrier(n.name, [pname], p.expand(out.shape), axis=-1)
        return _broadcast_channels(reps, out.shape, -1), p.expand(out.shape).clone()

    def mul(self, n: fx.Node, out: Tensor) -> Pair:
        a, b = n.args[0], n.args[1]
        div = n.target in (operator.truediv, torch.div, operator.itruediv)
        if not div and self._param_name(a) is not None and self._param_name(b) is None:
            a, b = b, a  # a parameter gain on the left: `γ * x`
        la, lb = self.lab(a), self.lab(b)
        if not div and la is not None and self._param_name(b) is not None:
            gained = self.gain(n, la, self._param_name(b), out)
            if gained is not None:
                return gained
        if (
            la is not None
            and lb is not None
            and not div
            and _per_token(self.env_or(b), out)
            and not bool((lb[0] > 0).any() or (lb[1] > 0).any())
            and self._param_name(b) is None
        ):
            # `x * r` with `r` one unlabeled number per token (a norm's `1/rms(x)`): channels
            # keep their labels
            return la[0].expand(out.shape).clone(), la[1].expand(out.shape).clone()
        if la is not None and lb is None and isinstance(b, (int, float)):
            return la
        if la is None and lb is not None and isinstance(a, (int, float)) and not div:
            return lb
        if la is not None and lb is not None:
            pa, pb = self._param_name(a), self._param_name(b)
            if pb is not None and not div:
                self.use_param(pb, n.name)
                self.carrier(n.name, [pb], la[1].expand(out.shape), axis=-1)
                return la[0].expand(out.shape).clone(), la[1].expand(out.shape).clone()
            a_fixed = not bool((la[0] > 0).any()) and pa is None
            b_fixed = not bool((lb[0] > 0).any()) and pb is None
            if b_fixed and not bool((lb[1] > 0).any()):
                self.L.fix_perms(la[1], n.name, "multiplied by an unpermuted tensor")
                return la[0].expand(out.shape).clone(), torch.zeros(out.shape, dtype=torch.long)
            if a_fixed and not div and not bool((la[1] > 0).any()):
                self.L.fix_perms(lb[1], n.name, "multiplied by an unpermuted tensor")
                return lb[0].expand(out.shape).clone(), torch.zeros(out.shape, dtype=torch.long)
            if not div and pa is None and pb is None:
                return self.product(n, la, lb, out)
        raise _Unsupported("product of two tensors that both carry scales")

    def env_or(self, a: Any) -> Any:
        return self.values.get(a) if isinstance(a, fx.Node) else a

    def gain(self, n: fx.Node, la: Pair, pname: str, out: Tensor) -> Pair | None:
        """`x * γ` with `γ` a per-feature parameter and `x` carrying no free scale (a
        normalized stream, as in RMSNorm): `γ` is a source of one fresh scale per feature,
        which its readers take back."""
        g = self.root.get_parameter(pname)
        s, p = la
        if g.ndim != 1 or out.shape[-1] != g.shape[0]:
            return None
        if any(self.L.find(int(v)) != FIXED for v in torch.unique(s) if int(v) > 0):
            return None
        self.use_param(pname, n.name)
        self.carrier(n.name, [pname], p.expand(out.shape), axis=-1)
        fresh = self.L.fresh(g.shape[0], pname.rpartition(".")[0] or pname)
        self.L.scale_terms.append((pname, fresh, 1))
        pcols = self.L.per_channel(p.expand(out.shape), -1)
        if all(len(c) == 1 for c in pcols):
            self.L.links.append((fresh, torch.tensor([int(c[0]) for c in pcols])))
        return _broadcast_channels(fresh, out.shape, -1), p.expand(out.shape).clone()

    def product(self, n: fx.Node, la: Pair, lb: Pair, out: Tensor) -> Pair:
        """`a * b` of two computed tensors (a gated MLP's `act(gate(x)) * up(x)`): the product
        takes the scale of the factor whose scale is free, so at most one factor may carry
        one (one positive scale per entry cannot hold a product of two: the first factor's
        scales are fixed then, a sound subset), and the channels of both move together."""
        sa, sb = (x.expand(out.shape) for x in (la[0], lb[0]))
        qa, qb = (x.expand(out.shape) for x in (la[1], lb[1]))

        def fixed(ids: Tensor) -> bool:
            return all(self.L.find(int(v)) == FIXED for v in torch.unique(ids) if int(v) > 0)

        if not fixed(sa) and not fixed(sb):
            self.L.fix_scales(sa, n.name, "a product of two rescaled tensors keeps one scale")
        s = sb if fixed(sa) else sa
        zero = (sa == ZERO) | (sb == ZERO)
        self.L.align(qa, qb, n.name)
        scale = torch.where(zero, torch.full_like(s, ZERO), s)
        return scale.clone(), torch.where(qa != ZERO, qa, qb).clone()

    def cat(self, n: fx.Node, out: Tensor) -> Pair:
        parts = n.args[0]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        labs = []
        for a in parts:
            lab = self.lab(a)
            if lab is None:
                lab = _fixed(self.env[a])
            labs.append(lab)
        return torch.cat([x[0] for x in labs], dim), torch.cat([x[1] for x in labs], dim)

    def matmul(self, n: fx.Node, out: Tensor) -> Pair:
        a, b = n.args[0], n.args[1]
        la, lb = self.lab(a), self.lab(b)
        const_a = la is not None and not bool((la[0] > 0).any() or (la[1] > 0).any())
        if const_a and lb is not None and self._param_name(a) is None and lb[0].ndim >= 2:
            # A @ X with A constant mixes rows of X: each column keeps one scale and channel
            s, p = lb
            reps = torch.tensor(
                [self.L.union_all(c) if len(c) else ZERO for c in self.L.per_channel(s, -1)]
            )
            pcols = self.L.per_channel(p, -1)
            if any(len(c) > 1 for c in pcols):
                self.L.fix_perms(p, n.name, "matmul over mixed channels")
            pids = torch.tensor([int(c[0]) if len(c) == 1 else FIXED for c in pcols])
            return _broadcast_channels(reps, out.shape, -1), _broadcast_channels(
                pids, out.shape, -1
            )
        raise _Unsupported("matmul of two tensors that carry scales or channels")


#: operations whose non-tensor result says nothing about the values (shapes, metadata)
_SHAPE_METHODS = {"size", "dim", "numel", "type", "get_device"}
_SHAPE_FUNCS = {
    getattr,
    torch.numel,
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_numel,
    *METADATA_OPS,
}


def _label_free(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _SHAPE_METHODS
    return n.op != "call_function" or n.target in _SHAPE_FUNCS


class _Unsupported(Exception):
    pass


def _per_token(other: Any, out: Tensor) -> bool:
    """`other` is one number per token: a tensor of `out`'s rank, size 1 on the last axis."""
    return (
        isinstance(other, Tensor)
        and other.ndim == out.ndim
        and other.shape[-1] == 1
        and out.shape[-1] > 1
    )


def _broadcast_channels(ids: Tensor, shape: torch.Size, axis: int) -> Tensor:
    view = [1] * len(shape)
    view[axis] = -1
    return ids.reshape(view).expand(shape).clone()


def _flatten_labels(tree: Any) -> list[Pair]:
    if tree is None:
        return []
    if isinstance(tree, tuple) and len(tree) == 2 and isinstance(tree[0], Tensor):
        return [tree]
    out = []
    for t in tree:
        out += _flatten_labels(t)
    return out
