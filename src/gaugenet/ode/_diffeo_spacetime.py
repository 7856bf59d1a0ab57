"""General spacetime diffeomorphisms, as a time change followed by a spatial map (ADM split)."""

from __future__ import annotations

from torch import Tensor

from .._errors import GaugeError
from ._diffeo import AbstractDiffeo, SpatialDiffeo
from ._diffeo_time import TimeReparam, TimeShift
from ._diffeo_tools import rowwise
from ._neural_ode import Field

__all__ = ["SpacetimeDiffeo"]


class SpacetimeDiffeo(AbstractDiffeo):
    """The composition: old `(t, x) = (s, φ_s(x))` with `s` the old time of `time`.

    A general diffeomorphism of spacetime splits as a change of the time coordinate
    (the lapse: `TimeReparam` or the space-dependent `TimeShift`) and a time-dependent
    spatial diffeomorphism (the shift), the split of Figure 3. The pulled-back field is
    `time^* (spatial^* F)`: first the spatial map, then the time change.

    **Arguments:**

    - `spatial`: the spatial part `φ_t`, a `SpatialDiffeo`.
    - `time`: the time part, a `TimeReparam` or `TimeShift`, with the same `T`.
    """

    def __init__(self, spatial: SpatialDiffeo, time: TimeReparam | TimeShift) -> None:
        super().__init__()
        if abs(spatial.T - time.T) > 1e-12 * max(1.0, spatial.T):
            raise GaugeError(f"SpacetimeDiffeo: spatial T = {spatial.T}, time T = {time.T}")
        self.spatial = spatial
        self.time = time
        self.T = spatial.T

    def pullback_field(self, field: Field):
        return self.time.pullback_field(self.spatial.pullback_field(field))

    def _pull(self, field: Field, t: Tensor, x: Tensor) -> Tensor:
        return self.pullback_field(field)(t, x)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """The old state of the new point `(t, x)`, shape `(batch, d)`."""
        return self.spacetime(t, x)[1]

    def inverse(self, t: Tensor, x: Tensor) -> Tensor:
        """The new state of the old point `(t, x)`, shape `(batch, d)`."""
        return self.spacetime_inverse(t, x)[1]

    def spacetime(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        s, _ = self.time.spacetime(t, x)
        if s.ndim == 0:
            return s, self.spatial(s, x)
        return s, rowwise(self.spatial)(s, x)

    def spacetime_inverse(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        # Undo the spatial map at the old time, then the time change.
        z = self.spatial.inverse(t, x) if t.ndim == 0 else rowwise(self.spatial.inverse)(t, x)
        return self.time.spacetime_inverse(t, z)
