"""The rules of discovery, one file per family, and their registry (see `_registry.py`)."""

from ._common import Unsupported as Unsupported
from ._registry import REGISTRY as REGISTRY
from ._registry import RULES as RULES
from ._registry import Registry as Registry
from ._rule import Example as Example
from ._rule import Rule as Rule
