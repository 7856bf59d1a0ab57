"""The four sweep tasks: inspect, canonicalize, certify, equalize."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from torch import nn

from .._canonical import canonicalize
from .._errors import GaugeError
from .._invariance import invariance_error
from ..groups import GaugeGroup
from ._task import AbstractTask, Outcome, Sampler, drift_tolerance

__all__ = ["TASKS", "Canonicalize", "Certify", "Equalize", "Inspect", "as_task"]

#: Inputs on which a transformed model is compared with the original.
_DRIFT_INPUTS = 16


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Inspect(AbstractTask):
    """The gauge group: its dimension, its factors by kind and the symmetry breakers."""

    name = "inspect"

    def __call__(self, model: nn.Module, group: GaugeGroup, sample: Sampler) -> Outcome:
        kinds: dict[str, int] = {}
        for _, kind, _, _ in group.summary():
            kinds[kind] = kinds.get(kind, 0) + 1
        return Outcome(
            {
                "n_params": _n_params(model),
                "symmetry_dim": group.dim,
                "n_factors": len(group.factors),
                "n_breakers": len(group.breakers),
                "factors": ",".join(f"{k}:{v}" for k, v in sorted(kinds.items())),
                "verdict": "ok",
            }
        )


@dataclass(frozen=True)
class Canonicalize(AbstractTask):
    """Canonical (gauge-fixed) weights, written; `drift` is the relative output change."""

    gauge: str = "balanced"
    name = "canonicalize"
    writes = True

    def __post_init__(self) -> None:
        if self.gauge not in ("balanced", "unit_in"):
            raise GaugeError(f"gauge must be 'balanced' or 'unit_in', not {self.gauge!r}")

    def __call__(self, model: nn.Module, group: GaugeGroup, sample: Sampler) -> Outcome:
        x = sample(model, _DRIFT_INPUTS)
        new = canonicalize(model, self.gauge, example_inputs=x, group=group)  # type: ignore[arg-type]
        drift = invariance_error(model, new, x)
        ok = drift <= drift_tolerance(model)
        return Outcome(
            {
                "n_params": _n_params(model),
                "symmetry_dim": group.dim,
                "drift": drift,
                "verdict": "ok" if ok else "drift",
            },
            new.state_dict(),
        )


@dataclass(frozen=True)
class Certify(AbstractTask):
    """The Jacobian-rank certificate (float64): is every redundancy a discovered symmetry?

    `n_inputs = 0` picks enough inputs for the outputs to outnumber the parameters 3×
    (ReLU networks need varied activation patterns, not just as many outputs)."""

    n_inputs: int = 0
    method: str = "auto"
    name = "certify"

    def __post_init__(self) -> None:
        if self.n_inputs < 0:
            raise GaugeError(f"n_inputs must be 0 (automatic) or positive, not {self.n_inputs}")
        if self.method not in ("auto", "exact", "matrix-free"):
            raise GaugeError(f"method must be auto, exact or matrix-free, not {self.method!r}")

    def __call__(self, model: nn.Module, group: GaugeGroup, sample: Sampler) -> Outcome:
        from ..apply._metrics import first_tensor
        from ..certify import certify

        m64 = copy.deepcopy(model).double()
        n = self.n_inputs
        if n <= 0:
            per_sample = first_tensor(m64, sample(m64, 2))[0].numel()
            n = max(8, math.ceil(3 * _n_params(model) / max(per_sample, 1)))
        report = certify(m64, sample(m64, n), group=group, method=self.method)  # type: ignore[arg-type]
        verdict = "certified" if report.ok else "inconclusive"
        if report.converged and report.unexplained != 0:
            verdict = "unexplained"
        return Outcome(
            {
                "n_params": report.n_params,
                "symmetry_dim": report.symmetry_dim,
                "functional_dim": report.functional_dimension,
                "unexplained": report.unexplained,
                "gap": report.gap,
                "factors": "; ".join(report.causes),
                "verdict": verdict,
            }
        )


@dataclass(frozen=True)
class Equalize(AbstractTask):
    """Weights equalized for `bits`-bit round-to-nearest quantization, written, with the
    output SQNR of the quantized model before and after."""

    bits: int = 4
    granularity: str = "per-tensor"
    name = "equalize"
    writes = True

    def __post_init__(self) -> None:
        if self.bits < 2:
            raise GaugeError(f"bits must be at least 2, not {self.bits}")
        if self.granularity not in ("per-tensor", "per-channel"):
            raise GaugeError(
                f"granularity must be 'per-tensor' or 'per-channel', not {self.granularity!r}"
            )

    def __call__(self, model: nn.Module, group: GaugeGroup, sample: Sampler) -> Outcome:
        from ..apply import equalize, quantize_weights, sqnr_db
        from ..apply._metrics import first_tensor

        x = sample(model, _DRIFT_INPUTS)
        new = equalize(model, x, bits=self.bits, granularity=self.granularity, group=group)
        y = first_tensor(model, x)

        def sqnr(m: nn.Module) -> float:
            return sqnr_db(y, first_tensor(quantize_weights(m, self.bits, self.granularity), x))

        drift = invariance_error(model, new, x)
        return Outcome(
            {
                "n_params": _n_params(model),
                "symmetry_dim": group.dim,
                "drift": drift,
                "sqnr_before_db": sqnr(model),
                "sqnr_after_db": sqnr(new),
                "verdict": "ok" if drift <= drift_tolerance(model) else "drift",
            },
            new.state_dict(),
        )


#: The tasks by name (the CLI's subcommands).
TASKS: dict[str, type[AbstractTask]] = {
    t.name: t for t in (Inspect, Canonicalize, Certify, Equalize)
}


def as_task(task: str | AbstractTask) -> AbstractTask:
    """A task object from a task or its name (default options)."""
    if isinstance(task, AbstractTask):
        return task
    if task not in TASKS:
        raise GaugeError(f"unknown zoo task {task!r}; expected one of {', '.join(TASKS)}")
    return TASKS[task]()
