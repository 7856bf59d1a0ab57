"""Gauge groups: factors (rescaling, GL and its subalgebras, affine, orthogonal, translation,
LayerNorm offset, free entries, permutation) and their product."""

from . import _algebra_canonical as _algebra_canonical  # registers its canonicalizer
from ._algebra import AlgebraFactor as AlgebraFactor
from ._base import AbstractFactor as AbstractFactor
from ._base import Breaker as Breaker
from ._canonical_hooks import canonicalizer_for as canonicalizer_for
from ._canonical_hooks import register_canonicalizer as register_canonicalizer
from ._free import FreeFactor as FreeFactor
from ._free import FreeRows as FreeRows
from ._group import Element as Element
from ._group import GaugeGroup as GaugeGroup
from ._group import load_state as load_state
from ._group import model_state as model_state
from ._matrix import AffineFactor as AffineFactor
from ._matrix import AffineTerm as AffineTerm
from ._matrix import GLFactor as GLFactor
from ._matrix import MatTerm as MatTerm
from ._matrix import random_gl as random_gl
from ._monomial import MonomialScaleFactor as MonomialScaleFactor
from ._offset import LayerNormOffsetFactor as LayerNormOffsetFactor
from ._offset_scale import OffsetScale as OffsetScale
from ._orthogonal import OrthogonalFactor as OrthogonalFactor
from ._permutation import PermTerm as PermTerm
from ._permutation import PermutationFactor as PermutationFactor
from ._rescaling import BatchNormShift as BatchNormShift
from ._rescaling import RescalingFactor as RescalingFactor
from ._rescaling import Scale as Scale
from ._signature import ModelSignature as ModelSignature
from ._signature import bind_to_model as bind_to_model
from ._signature import check_model as check_model
from ._signature import model_signature as model_signature
from ._translation import Shift as Shift
from ._translation import TranslationFactor as TranslationFactor
from ._translation import shifted_entries as shifted_entries
