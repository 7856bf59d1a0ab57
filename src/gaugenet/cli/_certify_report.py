"""The `--certify` part of `gaugenet inspect`: certification with a progress line on stderr,
and the exit code that carries the verdict."""

from __future__ import annotations

import torch
from torch import nn

from .._invariance import cast_floats
from ..certify import CertifyReport
from ..groups import GaugeGroup
from ._model_args import parse_shape, sample_inputs
from ._output import progress

__all__ = ["CERTIFY_HELP", "EXIT_CODES", "run_certify"]

#: exit code of `gaugenet inspect --certify` per verdict (2: an error, as for every command)
EXIT_CODES = {"complete": 0, "incomplete": 3, "right": 3, "wrong": 4}

CERTIFY_HELP = (
    "Check every factor (tangents in ker J, the action keeps the outputs) and compare with "
    "the Jacobian's rank. Exit code: 0 complete, 3 incomplete or not proven complete "
    "(a bound), 4 wrong factors, 2 error."
)


def run_certify(
    net: nn.Module,
    group: GaugeGroup,
    *,
    n_inputs: int,
    input_shape: str | None,
    memory_budget_gb: float,
) -> CertifyReport:
    """Certify `group` on `net` (in float64, on `n_inputs` sample inputs) with a progress
    line on stderr; returns the `Certificate`. Raises `GaugeError` (budget, inputs)."""
    from .. import certify

    with progress() as bar:
        task = bar.add_task("certifying", total=None)

        def step(text: str) -> None:
            bar.update(task, description=f"certifying: {text}")

        net = net.double()
        x = cast_floats(sample_inputs(net, n_inputs, shape=parse_shape(input_shape)), torch.float64)
        return certify(net, x, group=group, memory_budget=memory_budget_gb * 1e9, progress=step)
