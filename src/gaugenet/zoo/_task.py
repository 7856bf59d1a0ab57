"""What a sweep does to each checkpoint: the abstract task and its outcome."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..groups import GaugeGroup

__all__ = ["AbstractTask", "Outcome", "Sampler", "drift_tolerance"]

#: `sampler(model, n)`: a batch of `n` inputs for `model` (its dtype, its input shape).
Sampler = Callable[[nn.Module, int], Any]

_TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def drift_tolerance(model: nn.Module) -> float:
    """The largest relative output change a gauge transformation may cause in `model`'s
    dtype (rounding of the transformed weights), above which the verdict is `"drift"`."""
    dtype = next((p.dtype for p in model.parameters()), torch.float64)
    return _TOLERANCES.get(dtype, 1e-5)


@dataclass(frozen=True)
class Outcome:
    """A task's result for one checkpoint: the table columns it fills (`verdict` always)
    and, for tasks that transform the weights, the new state dict to write."""

    columns: dict[str, Any]
    state: dict[str, Tensor] | None = field(default=None)


class AbstractTask(ABC):
    """One operation applied to every checkpoint of a zoo. Subclasses are frozen
    dataclasses whose fields are the task's options; `signature` names the task with its
    options, and finished rows are reused on a rerun only for an equal signature."""

    name: ClassVar[str]
    #: whether the task writes new weights (then `Outcome.state` is set)
    writes: ClassVar[bool] = False

    @property
    def signature(self) -> str:
        opts = ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))  # type: ignore[arg-type]
        return f"{self.name}({opts})"

    @abstractmethod
    def __call__(self, model: nn.Module, group: GaugeGroup, sample: Sampler) -> Outcome:
        """Apply the task to `model`, whose gauge group is `group`."""
