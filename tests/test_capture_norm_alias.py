"""A LayerNorm written out in operations whose module `torch.export` unflattens with two
outputs: Cohere's LayerNorm casts its input to float32 first, and in a float32 model the
cast is the input itself, which the residual connection reads again, so export hands the
parent `(input, normalized)`. The capture replaced the module by one LayerNorm call and the
parent's `[0]` and `[1]` then indexed the normalized batch (the query projection read one
sample: discovery failed with a shape error). Each output is now mapped to what it is."""

from __future__ import annotations

import torch

import gaugenet
from tiny_hf import DECODER, tiny_hf


def test_cohere_float32_has_the_group_of_float64() -> None:
    m64, x = tiny_hf("CohereModel", "CohereConfig", **DECODER)
    g64 = gaugenet.symmetries(m64, x)
    m32 = tiny_hf("CohereModel", "CohereConfig", **DECODER)[0].float()
    g32 = gaugenet.symmetries(m32, x)
    assert sorted(f.name for f in g32.factors) == sorted(f.name for f in g64.factors)
    assert g32.dim == g64.dim > 0
    # the float32 group acts exactly on the float32 model (to float32 rounding)
    elem = g32.sample(torch.Generator().manual_seed(0))
    moved = g32.act(m32, elem)
    assert gaugenet.invariance_error(m32, moved, x) < 1e-5
