"""The zoo of architectures for discovery and certification tests (defined in the package,
so that the reproduction report certifies the same models)."""

from gaugenet.discovery._zoo import ZOO as ZOO
from gaugenet.discovery._zoo import Entry as Entry
