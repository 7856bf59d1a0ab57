"""Gauge fixing that pays: equalization before quantization, gauge-aware model merging."""

from ._distance import logit_kl as logit_kl
from ._distance import next_token_loss as next_token_loss
from ._distance import squared_error as squared_error
from ._equalize import equalize as equalize
from ._equalize import equalizing_element as equalizing_element
from ._equalize import weight_quantization_error as weight_quantization_error
from ._merge import align_pair as align_pair
from ._merge import align_to as align_to
from ._merge import interpolation_barrier as interpolation_barrier
from ._merge import loss_curve as loss_curve
from ._merge import merge as merge
from ._metrics import accuracy as accuracy
from ._metrics import cosine_similarity as cosine_similarity
from ._metrics import sqnr_db as sqnr_db
from ._quantize import quantize_dynamic_int8 as quantize_dynamic_int8
from ._quantize import quantize_tensor as quantize_tensor
from ._quantize import quantize_weights as quantize_weights
from ._quantize import quantized_params as quantized_params
from ._residual import ResidualRotationFactor as ResidualRotationFactor
from ._residual import residual_factors as residual_factors
from ._schemes import QuantScheme as QuantScheme
from ._schemes import quantize as quantize
from ._schemes import quantize_grouped as quantize_grouped
from ._schemes import quantize_per_token as quantize_per_token
