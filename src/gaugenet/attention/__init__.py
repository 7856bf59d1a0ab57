"""The gauge symmetries of attention (paper Sec. 4): per-head query-key and value-output
`GL`, the `α` rescaling of positively homogeneous attention, the softmax key-bias shift and
head permutations, for `gaugenet.nets.SelfAttention`, `torch.nn.MultiheadAttention` and the
graph-level attention that discovery finds in any other model (`discovery/_attention.py`)."""

from torch import nn as _nn

from ..discovery import register_analyzer as _register_analyzer
from ..discovery import register_model_analyzer as _register_model_analyzer
from ._api import align_attention as align_attention
from ._api import canonicalize_attention as canonicalize_attention
from ._api import qk_matrices as qk_matrices
from ._api import vo_matrices as vo_matrices
from ._canonical import canonical_attention_element as canonical_attention_element
from ._factors import AlphaFactor as AlphaFactor
from ._factors import HeadPermFactor as HeadPermFactor
from ._factors import KeyShiftFactor as KeyShiftFactor
from ._factors import QKFactor as QKFactor
from ._factors import ValueShiftFactor as ValueShiftFactor
from ._factors import VOFactor as VOFactor
from ._factors import attention_factors as attention_factors
from ._layout import HeadLayout as HeadLayout
from ._layout import Slot as Slot
from ._torch import mha_factors as mha_factors
from ._torch import mha_layout as mha_layout
from ._torch import self_attention_layout as self_attention_layout
from ._torch import torch_model_group as torch_model_group

# Registration: a whole model that is one attention module, then `nn.MultiheadAttention`
# as an atom inside larger graphs. `nn.TransformerEncoderLayer` is no atom: its layers are
# captured by `torch.export` and analyzed by the same rules as any other model.
_register_model_analyzer(torch_model_group)
_register_analyzer(_nn.MultiheadAttention, mha_factors)
