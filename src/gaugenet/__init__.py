"""gaugenet: the gauge symmetries of neural networks, as something to compute with."""

from . import attention as attention
from ._canonical import align as align
from ._canonical import canonical_element as canonical_element
from ._canonical import canonicalize as canonicalize
from ._errors import GaugeError as GaugeError
from ._errors import NotLiftableError as NotLiftableError
from ._errors import UnsupportedModelError as UnsupportedModelError
from ._invariance import assert_invariant as assert_invariant
from ._invariance import exact_invariance_error as exact_invariance_error
from ._invariance import invariance_error as invariance_error
from .certify import certify as certify
from .certify import functional_dimension as functional_dimension
from .discovery import symmetries as symmetries
from .groups import GaugeGroup as GaugeGroup

__version__ = "0.1.0"
