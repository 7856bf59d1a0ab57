"""The `--certify` part of `gaugenet inspect`: certification with a progress line on stderr,
its report, and the exit code that carries the verdict."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from torch import Tensor, nn

from .._errors import GaugeError
from ..groups import GaugeGroup
from ._model_args import parse_shape, sample_inputs, spinner

__all__ = ["CERTIFY_HELP", "EXIT_CODES", "certify_and_report"]

#: exit code of `gaugenet inspect --certify` per verdict (2: an error, as for every command)
EXIT_CODES = {"complete": 0, "incomplete": 3, "right": 3, "wrong": 4}

CERTIFY_HELP = (
    "Check every factor (tangents in ker J, the action keeps the outputs) and compare with "
    "the Jacobian's rank. Exit code: 0 complete, 3 incomplete or not proven complete "
    "(a bound), 4 wrong factors, 2 error."
)


def _double(x: Any) -> Any:
    """Floating tensors (alone or in a tuple) in float64, like the model."""
    if isinstance(x, (tuple, list)):
        return type(x)(_double(v) for v in x)
    return x.double() if isinstance(x, Tensor) and x.is_floating_point() else x


def certify_and_report(
    console: Console,
    net: nn.Module,
    group: GaugeGroup,
    *,
    n_inputs: int,
    input_shape: str | None,
    memory_budget_gb: float,
) -> int:
    """Certify `group` on `net` (in float64, on `n_inputs` sample inputs), print the report
    to `console` and return the exit code (`EXIT_CODES`, 2 for a `GaugeError`)."""
    from .. import certify

    err = Console(stderr=True)
    try:
        with spinner(err) as progress:
            task = progress.add_task("certifying", total=None)

            def step(text: str) -> None:
                progress.update(task, description=f"certifying: {text}")

            net = net.double()
            x = sample_inputs(net, n_inputs, shape=parse_shape(input_shape))
            x = _double(x)
            report = certify(
                net, x, group=group, memory_budget=memory_budget_gb * 1e9, progress=step
            )
    except GaugeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    console.print("certification:")
    for line in report.lines():
        console.print(f"  {line}", markup=False)
    code = EXIT_CODES[report.verdict.value]
    console.print(f"exit code {code} ({report.verdict.value})")
    return code
