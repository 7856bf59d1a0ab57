"""Learning dynamics along and across gauge orbits: Noether charges, orthogonality,
teleportation."""

from ._noether import NoetherRecorder as NoetherRecorder
from ._noether import noether_charges as noether_charges
from ._orthogonality import orthogonality as orthogonality
from ._teleport import Teleporting as Teleporting
from ._teleport import teleport as teleport
