"""Equalizing and quantizing a sharded checkpoint layer by layer.

1. The architecture is built from `config.json` on the meta device and its gauge group is
   found from shapes alone (`gaugenet.symmetries`; no weights are read).
2. The factors are grouped into components (factors sharing a tensor). Shards are written
   in order; the first time a shard needs a tensor of a component, the component's tensors
   (and only those) are read, moved, checked on their own module (`_local.py`) and kept
   until their shards are written.
3. Equalization uses only a local objective: the `weight_quantization_error` (relative
   rounding noise per output channel) of the Linear/Conv weights the component touches,
   lowered by closed-form range-balancing sweeps (as `equalize(objective="range")` does;
   the objective is a sum over tensors, so minimizing it per component is minimizing it
   for the whole model). Rescaling and GL factors move; other kinds stay at the identity.
4. A component is applied only when its module's outputs (float64, random inputs of the
   recorded shapes) change by less than `LOCAL_TOL`; otherwise, or when it cannot be
   checked locally, it is left as it was and reported.
5. Quantization rounds every Linear/Conv weight under the scheme (computed in float64, the
   grid checked, then stored in the tensor's own dtype).

Peak memory: about one shard, plus the tensors of the components that reach into shards
not yet written, plus one component's work in float64.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from .._tolerances import param_dtype
from ..apply._equalize import _step, weight_quantization_error
from ..apply._quantize import quantized_params, round_to_range, transposed_params
from ..apply._schemes import QuantScheme, round_weight
from ..discovery import symmetries
from ..groups import GLFactor, RescalingFactor
from ..groups._base import State
from ..io._hf import feature_input, token_call, token_lengths
from ._checkpoint import ShardedCheckpoint
from ._local import LOCAL_TOL, Component, components, local_change, record_inputs
from ._write import ShardWriter, atomic_folder, check_output_folder

__all__ = ["StreamReport", "stream_equalize", "stream_quantize"]

_MOVED = (RescalingFactor, GLFactor)

#: entries rounded at a time
_CHUNK = 1 << 22
#: most entries of one module built in float64 for a local check
_BUDGET = 200_000_000


@dataclass
class StreamReport:
    """What a streamed run did.

    - `factors`: factors of the gauge group (found on the meta device).
    - `applied`: factors moved and checked on their own module.
    - `skipped`: `(factor names, why)` of components left as they were.
    - `local_change`: the largest relative output change of a checked module (float64).
    - `error_before`, `error_after`: the local objective summed over the components.
    - `rounded`: tensors rounded (quantize).
    """

    out: Path
    shards: int
    factors: int
    applied: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    local_change: float = 0.0
    error_before: float = 0.0
    error_after: float = 0.0
    rounded: int = 0
    seconds: float = 0.0


def _meta_call(model: nn.Module) -> dict[str, Tensor]:
    """The meta-device example input of a Hugging Face model: one image of the config's size
    for a vision model, one log-mel spectrogram for a speech encoder (`feature_input`); else
    as many token ids as its config allows up to `TOKENS` (`token_lengths`), and as many
    decoder tokens for an encoder-decoder model (`token_call`)."""
    cfg = getattr(model, "config", None)
    feature = feature_input(cfg, model)
    if feature is not None:
        name, shape = feature
        return {name: torch.zeros(1, *shape, dtype=param_dtype(model), device="meta")}
    ids = torch.zeros(1, token_lengths(cfg)[0], dtype=torch.long, device="meta")
    call = token_call(cfg, ids)
    return call if isinstance(call, dict) else {"input_ids": call}


def _rounded(w: Tensor, sch: QuantScheme, name: str, transposed: bool = False) -> Tensor:
    """`w` rounded under `sch` in float32 (exact for bfloat16 and float16 weights), a block
    of rows at a time (the per-tensor range taken first), each block's grid checked;
    `transposed`: `w` is stored `(in, out)`, rounded as its transpose is."""
    if transposed:
        return _rounded(w.transpose(0, 1).contiguous(), sch, name).transpose(0, 1).contiguous()
    out = torch.empty(w.shape, dtype=torch.float32)
    full = w.abs().max().float() if sch.granularity == "per-tensor" else None
    rows = max(1, _CHUNK // max(1, w[0].numel()))
    for i in range(0, w.shape[0], rows):
        x = w[i : i + rows].float()
        r = round_weight(x, sch) if full is None else round_to_range(x, full, sch.weight_bits)
        again = round_weight(r, sch) if full is None else round_to_range(r, full, sch.weight_bits)
        if not bool(((again - r).abs() <= 1e-6 * r.abs().max().clamp_min(1e-30)).all()):
            raise GaugeError(f"internal error: {name} is not on the {sch} grid after rounding")
        out[i : i + rows] = r
    return out


def _equalized(
    comp: Component,
    start: State,
    q: set[str],
    bits: int,
    gran: str,
    transposed: set[str] | frozenset[str] = frozenset(),
) -> State:
    """Closed-form range-balancing sweeps over the component's factors, each step kept
    only where it lowers the component's weight quantization error (float64)."""
    factors = [f for f in comp.factors if isinstance(f, (RescalingFactor, GLFactor))]
    names = [p for p in comp.params if p in q]
    per_channel = gran == "per-channel"

    def err(s: State) -> float:
        return weight_quantization_error(s, names, bits, gran, transposed)

    best_e, best = err(start), start
    for normalize in (True, False):
        state, e = start, best_e
        for _ in range(20):
            improved = False
            for f in factors:
                trial = f.apply(state, _step(f, state, q, per_channel, normalize, transposed))
                e_trial = err(trial)
                if e_trial < e * (1 - 1e-9):
                    state, e, improved = trial, e_trial, True
            if not improved:
                break
        if e < best_e:
            best_e, best = e, state
    return best


class _Stream:
    """One streamed run: the checkpoint, its meta model and group, the objective's
    `bits` and `gran` (granularity)."""

    def __init__(self, src: Path, out: Path, force: bool, bits: int, gran: str) -> None:
        self.src, self.out, self.bits, self.gran = Path(src), Path(out), bits, gran
        self.ckpt = ShardedCheckpoint(self.src)
        check_output_folder(self.out, self.src, force=force)
        self.meta = self.ckpt.meta_model()
        self.q = set(quantized_params(self.meta))
        self.transposed = transposed_params(self.meta)
        # tied names stored once: read through the stored name
        state = self.meta.state_dict(keep_vars=True)
        stored = {id(state[k]): k for k in self.ckpt.weight_map if k in state}
        self.alias = {k: stored.get(id(v), k) for k, v in state.items()}

    def read(self, name: str) -> Tensor:
        return self.ckpt.tensor(self.alias.get(name, name))

    def run(
        self,
        report: StreamReport,
        move: Callable[[Component, State], State] | None,
        finish: Callable[[str, Tensor], Tensor],
    ) -> StreamReport:
        start = time.perf_counter()
        comps = []
        if move is not None:  # discovery on meta, and each layer's input shapes
            call = _meta_call(self.meta)
            group = symmetries(self.meta, call)
            self.inputs = record_inputs(self.meta, call)
            report.factors = len(group.factors)
            # only the kinds that move: an orthogonal factor of the residual stream touches
            # nearly every tensor and would make one component of the whole model
            comps = components([f for f in group.factors if isinstance(f, _MOVED)])
        comp_of = {p: c for c in comps for p in c.params}
        pending: dict[str, Tensor] = {}
        done: set[int] = set()
        with atomic_folder(self.out) as tmp:
            writer = ShardWriter(self.ckpt, tmp)
            for shard, names in self.ckpt.shards.items():
                tensors = {}
                for name in names:
                    comp = comp_of.get(name)
                    if comp is not None and id(comp) not in done:
                        done.add(id(comp))
                        pending.update(self._component(comp, move, report))
                    value = pending.pop(name) if name in pending else self.ckpt.tensor(name)
                    tensors[name] = finish(name, value)
                writer.write(shard, tensors)
                del tensors
            writer.finish()
        report.seconds = time.perf_counter() - start
        return report

    def _component(
        self, comp: Component, move: Callable[[Component, State], State], report: StreamReport
    ) -> dict[str, Tensor]:
        """The component's stored tensors, moved when the move passes its local check."""
        stored = [p for p in comp.params if p in self.ckpt.weight_map]
        if len(stored) != len(comp.params):
            return self._skip(comp, "some of its tensors are stored under another name", report)
        orig = {p: self.ckpt.tensor(p) for p in stored}
        start = {p: v.double() for p, v in orig.items()}
        names = [p for p in comp.params if p in self.q]
        before = weight_quantization_error(start, names, self.bits, self.gran, self.transposed)
        new = move(comp, start)
        changed = {p: new[p] for p in stored if not torch.equal(new[p], start[p])}
        if not changed:
            return {}
        inputs = self.inputs.get(comp.module)
        if inputs is None:
            return self._skip(comp, f"{comp.module or 'the model'} did not run", report)
        change = local_change(self.meta, comp, inputs, self.read, changed, budget=_BUDGET)
        if isinstance(change, str):
            return self._skip(comp, f"not checked locally: {change}", report)
        if not change < LOCAL_TOL:
            return self._skip(comp, f"changes {comp.module}'s outputs by {change:.1e}", report)
        after = weight_quantization_error(new, names, self.bits, self.gran, self.transposed)
        report.applied += len(comp.factors)
        report.local_change = max(report.local_change, change)
        report.error_before += before
        report.error_after += after
        return {p: new[p].to(orig[p].dtype) for p in changed}

    @staticmethod
    def _skip(comp: Component, why: str, report: StreamReport) -> dict[str, Tensor]:
        report.skipped.append((", ".join(f.name for f in comp.factors), why))
        return {}


def stream_equalize(
    src: str | Path,
    out: str | Path,
    *,
    bits: int = 4,
    granularity: str = "per-tensor",
    force: bool = False,
) -> StreamReport:
    """Equalize the sharded checkpoint in `src` for `bits`-bit weights with the local range
    objective, writing a checkpoint of the same layout to the folder `out` (atomically; never
    over `src`). See the module docstring. Raises `GaugeError` for a bad checkpoint or
    output."""
    if granularity not in ("per-tensor", "per-channel"):
        raise GaugeError(f"granularity must be per-tensor or per-channel, got {granularity!r}")
    s = _Stream(Path(src), Path(out), force, bits, granularity)
    report = StreamReport(s.out, len(s.ckpt.shards), 0)

    def move(comp: Component, start: State) -> State:
        return _equalized(comp, start, s.q, s.bits, s.gran, s.transposed)

    return s.run(report, move, lambda name, v: v)


def stream_quantize(
    src: str | Path,
    out: str | Path,
    *,
    scheme: QuantScheme | str,
    equalize: bool = False,
    force: bool = False,
) -> StreamReport:
    """Round every Linear/Conv weight of the sharded checkpoint in `src` under `scheme`
    (after streamed equalization with `equalize`, per-tensor or per-channel schemes only),
    writing the folder `out` (atomically; never over `src`)."""
    sch = QuantScheme.of(scheme)
    if equalize and sch.granularity == "per-group":
        raise GaugeError("--equalize aims at per-tensor or per-channel weights")
    s = _Stream(Path(src), Path(out), force, sch.weight_bits, sch.granularity)
    report = StreamReport(s.out, len(s.ckpt.shards), 0)
    stored_q = {s.alias.get(n, n) for n in s.q}
    stored_t = {s.alias.get(n, n) for n in s.transposed}

    def move(comp: Component, start: State) -> State:
        return _equalized(comp, start, s.q, s.bits, s.gran, s.transposed)

    def finish(name: str, value: Tensor) -> Tensor:
        if name not in stored_q:
            return value
        report.rounded += 1
        return _rounded(value, sch, name, name in stored_t).to(value.dtype)

    return s.run(report, move if equalize else None, finish)
