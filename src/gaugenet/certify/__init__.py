"""Certifying that the discovered symmetries are right and explain every redundancy."""

from ._certify import DEFAULT_MEMORY_BUDGET as DEFAULT_MEMORY_BUDGET
from ._certify import certify as certify
from ._functional_dimension import FunctionalDimension as FunctionalDimension
from ._functional_dimension import functional_dimension as functional_dimension
from ._gap import GapReport as GapReport
from ._gap import locate_gap as locate_gap
from ._matrix_free import MatrixFreeResult as MatrixFreeResult
from ._matrix_free import matrix_free_certificate as matrix_free_certificate
from ._result import CertifyReport as CertifyReport
from ._result import Verdict as Verdict
