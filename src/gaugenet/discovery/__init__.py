"""Discovering the gauge symmetries of a model from its computation graph."""

from ._meta import check_on as check_on
from ._selfcheck import INTERNAL_ERROR as INTERNAL_ERROR
from ._selfcheck import self_check as self_check
from ._symmetries import register_analyzer as register_analyzer
from ._symmetries import register_model_analyzer as register_model_analyzer
from ._symmetries import symmetries as symmetries
from ._trace import register_atomic as register_atomic
from .rules import RULES as RULES
from .rules import Example as Example
from .rules import Rule as Rule
