"""Certifying that the discovered symmetries explain every redundancy of a model."""

from ._certify import CertifyReport as CertifyReport
from ._certify import certify as certify
from ._functional_dimension import FunctionalDimension as FunctionalDimension
from ._functional_dimension import functional_dimension as functional_dimension
from ._matrix_free import MatrixFreeResult as MatrixFreeResult
from ._matrix_free import matrix_free_certificate as matrix_free_certificate
