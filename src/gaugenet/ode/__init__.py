"""Neural ODEs, their diffeomorphism gauge symmetries, Wilson lines and linear neural ODEs."""
from ._diffeo import AbstractDiffeo as AbstractDiffeo
from ._diffeo import SpatialDiffeo as SpatialDiffeo
from ._diffeo_linear import LinearDiffeo as LinearDiffeo
from ._diffeo_spacetime import SpacetimeDiffeo as SpacetimeDiffeo
from ._diffeo_time import TimeReparam as TimeReparam
from ._diffeo_time import TimeShift as TimeShift
from ._lie import lie_derivative as lie_derivative
from ._lie import time_shift_derivative as time_shift_derivative
from ._neural_ode import MLPField as MLPField
from ._neural_ode import NeuralODE as NeuralODE
from ._relating import relating_diffeo as relating_diffeo
