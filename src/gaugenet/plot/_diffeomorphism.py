"""The deformed spacetime grid of a diffeomorphism, in the style of the paper's Figures 1 and 3."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display: figures are written to files

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..ode import AbstractDiffeo, NeuralODE

__all__ = ["diffeomorphism"]


def _old_grid(
    diffeo: AbstractDiffeo | None, T: float, xs: Tensor, d: int, coord: int, n_t: int
) -> tuple[Tensor, Tensor]:
    """Old `(t, x_coord)` of the new grid points, each of shape `(n_t, len(xs))`."""
    ts = torch.linspace(0.0, T, n_t, dtype=xs.dtype)
    points = torch.zeros(len(xs), d, dtype=xs.dtype)
    points[:, coord] = xs
    old_t, old_x = [], []
    with torch.no_grad():
        for t in ts:  # a loop over grid times; each call maps all grid points at once
            if diffeo is None:
                s, y = t.expand(len(xs)), points
            else:
                s, y = diffeo.spacetime(t, points)
            old_t.append(s.expand(len(xs)))
            old_x.append(y[:, coord])
    return torch.stack(old_t), torch.stack(old_x)


def diffeomorphism(
    diffeos: AbstractDiffeo | Sequence[AbstractDiffeo | None] | None,
    *,
    titles: Sequence[str] | None = None,
    node: NeuralODE | None = None,
    x0: Tensor | None = None,
    T: float | None = None,
    d: int = 1,
    coord: int = 0,
    x_range: tuple[float, float] = (-2.0, 2.0),
    n_lines: int = 13,
    resolution: int = 121,
) -> Figure:
    """Draw the new coordinate grid of each diffeomorphism in old spacetime coordinates.

    Lines of constant new time `t'` and of constant new state `x'` are mapped to the old
    spacetime by `diffeo.spacetime`; `None` draws the undeformed grid. The trajectories
    of `node` from `x0` (the same curves in every panel, in red) show that a gauge
    transformation changes the coordinates, not the solution (Figures 1 and 3).

    **Arguments:**

    - `diffeos`: one diffeomorphism (or `None`), or a sequence of them, one per panel.
    - `titles`: one title per panel.
    - `node`, `x0`: a neural ODE and initial states `(batch, d)` whose trajectories are drawn.
    - `T`: final time when no diffeomorphism or node gives it; `d`: state dimension of
        the grid points (when `d > 1`, the grid varies coordinate `coord`, others zero).
    - `x_range`, `n_lines`, `resolution`: extent and density of the grid.

    **Returns:** the matplotlib `Figure`, one panel per diffeomorphism, time horizontal.
    """
    panels = list(diffeos) if isinstance(diffeos, Sequence) else [diffeos]
    if T is None:
        known = [p.T for p in panels if p is not None] + ([node.T] if node is not None else [])
        T = known[0] if known else 1.0
    if x0 is not None:
        d = x0.shape[-1]
    xs = torch.linspace(*x_range, resolution, dtype=torch.float64)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    traj = None
    if node is not None and x0 is not None:
        ts = torch.linspace(0.0, T, resolution, dtype=x0.dtype)
        with torch.no_grad():
            traj = (ts, node.trajectory(x0, ts)[..., coord])
    stride_t = max(1, (resolution - 1) // (n_lines - 1))
    stride_x = max(1, (resolution - 1) // (n_lines - 1))
    for k, (ax, diffeo) in enumerate(zip(axes[0], panels)):
        old_t, old_x = _old_grid(diffeo, T, xs, d, coord, resolution)
        for i in range(0, resolution, stride_t):  # lines of constant new time
            ax.plot(old_t[i], old_x[i], color="0.55", lw=0.7)
        for j in range(0, resolution, stride_x):  # lines of constant new state
            ax.plot(old_t[:, j], old_x[:, j], color="0.55", lw=0.7)
        if traj is not None:
            ax.plot(traj[0], traj[1], color="red", lw=1.8)
        ax.set_xlim(-0.02 * T, 1.02 * T)
        ax.set_ylim(*x_range)
        ax.set_xlabel("t")
        ax.set_ylabel(f"x{coord + 1}" if d > 1 else "x")
        ax.set_title(titles[k] if titles is not None else f"({chr(ord('a') + k)})")
    fig.tight_layout()
    return fig
