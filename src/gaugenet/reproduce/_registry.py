"""The registry of the paper's claims that `gaugenet reproduce` measures.

A claim is a function that measures one number and returns it as a `Measurement`;
the `claim` decorator registers it with its paper reference and its acceptance test.
Claim modules live in `gaugenet.reproduce.claims` and are imported on demand.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["Claim", "Context", "Measurement", "all_claims", "claim"]

Compare = Literal["max", "min", "near"]
#: Whether a registered item is a claim (pass/fail) or a reported figure with a target.
Kind = Literal["claim", "figure"]


@dataclass(frozen=True)
class Context:
    """What a claim may use: `out_dir` for figures, `seed` for its random numbers, and
    `quick`: measure on the smallest cases that still decide the criterion (no figures drawn),
    as the mutation tests do."""

    out_dir: Path
    seed: int = 0
    quick: bool = False


@dataclass
class Measurement:
    """The measured figure of a claim.

    - `value`: the number compared with the claim's tolerance.
    - `detail`: one line saying what else was seen (counts, other figures).
    - `figures`: image files written under `Context.out_dir`.
    """

    value: float
    detail: str = ""
    figures: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Claim:
    """One registered claim.

    `compare` says how `value` is judged against `tolerance`:
    `"max"`: `value <= tolerance`; `"min"`: `value >= tolerance`;
    `"near"`: `|value - target| <= tolerance`.

    `kind="figure"` marks an engineering target rather than a statement of the paper (a
    speed-up, say): its figure is measured and compared with the target the same way, the
    report says whether the target was met, and a miss does not fail the run.

    `loose` (non-empty) marks a claim that measures a place where the paper is loose: what the
    paper says and what holds instead; the report lists these in a section of their own.
    """

    id: str
    reference: str
    statement: str
    measured: str
    tolerance: float
    compare: Compare
    target: float
    fn: Callable[[Context], Measurement]
    kind: Kind = "claim"
    loose: str = ""

    def passed(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.compare == "max":
            return value <= self.tolerance
        if self.compare == "min":
            return value >= self.tolerance
        return abs(value - self.target) <= self.tolerance

    def criterion(self) -> str:
        if self.compare == "max":
            return f"<= {self.tolerance:.1e}"
        if self.compare == "min":
            return f">= {self.tolerance:g}"
        return f"{self.target:g} ± {self.tolerance:g}"


_REGISTRY: dict[str, Claim] = {}


def claim(
    id: str,
    *,
    reference: str,
    statement: str,
    measured: str,
    tolerance: float,
    compare: Compare = "max",
    target: float = 0.0,
    kind: Kind = "claim",
    loose: str = "",
) -> Callable[[Callable[[Context], Measurement]], Callable[[Context], Measurement]]:
    """Register a claim measured by the decorated function `fn(ctx) -> Measurement`."""

    def register(fn: Callable[[Context], Measurement]) -> Callable[[Context], Measurement]:
        if id in _REGISTRY and _REGISTRY[id].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"claim id {id!r} registered twice")
        _REGISTRY[id] = Claim(
            id, reference, statement, measured, tolerance, compare, target, fn, kind, loose
        )
        return fn

    return register


def all_claims() -> list[Claim]:
    """Import every claim module and return the claims in registration order."""
    from . import claims as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{package.__name__}.{info.name}")
    return list(_REGISTRY.values())
