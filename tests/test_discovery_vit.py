"""ViT's embedding stream from the computation: the patch projection (a convolution read
channels-last), the class token and the position table feed a residual stream that only
LayerNorms read, so their contributions along `1` are free."""

from __future__ import annotations

import torch

import gaugenet
from gaugenet.discovery import INTERNAL_ERROR
from gaugenet.discovery._float64 import keep_float64
from gaugenet.groups import GaugeGroup


def _vit():
    import transformers

    cfg = transformers.ViTConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        image_size=8, patch_size=4, num_channels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ViTModel(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if p.ndim == 1 else 1 / p[0].numel() ** 0.5))
    x = torch.randn(12, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, {"pixel_values": x}


def test_vit_stream_sources() -> None:
    model, inputs = _vit()
    group = gaugenet.symmetries(model, inputs)
    assert not [b for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]
    dims = {f.name: f.dim for f in group.factors}
    # a shift over the 2·4·4 flattened inputs and the bias; one row; 5 position rows
    assert dims["center:embeddings.patch_embeddings.projection"] == 2 * 4 * 4 + 1
    assert dims["center:embeddings.cls_token"] == 1
    assert dims["center:embeddings.position_embeddings"] == 5
    # vectors ⊥ 1 moved between a segment's position rows and what its tokens carry
    pos = "embeddings.position_embeddings"
    assert dims[f"move:{pos}[0:1]->embeddings.cls_token"] == 7
    assert dims[f"move:{pos}[1:5]->embeddings.patch_embeddings.projection.bias"] == 7
    for name in dims:
        if name.startswith(("center:embeddings", "move:")):
            one = GaugeGroup((group.factor(name),), (), group.param_names)
            with keep_float64():
                moved = one.act(model, one.sample(torch.Generator().manual_seed(2)))
                assert gaugenet.invariance_error(model, moved, inputs) < 1e-12, name


def test_class_token_moves_only_along_ones() -> None:
    """The negative: the same change of the class token off `1` changes the outputs."""
    model, inputs = _vit()
    bad = type(model)(model.config).double().eval()
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        bad.embeddings.cls_token += torch.linspace(-1, 1, 8, dtype=torch.float64)
    with keep_float64():
        assert gaugenet.invariance_error(model, bad, inputs) > 1e-3


def test_position_rows_move_only_with_their_own_segment() -> None:
    """The negative: moving into the class token from the patches' position rows (another
    segment) changes the outputs."""
    import dataclasses

    model, inputs = _vit()
    group = gaugenet.symmetries(model, inputs)
    f = next(f for f in group.factors if f.name.endswith("->embeddings.cls_token"))
    wrong = dataclasses.replace(f, terms=(dataclasses.replace(f.terms[0], start=1, stop=5),))
    one = GaugeGroup((wrong,), (), group.param_names)
    with keep_float64():
        moved = one.act(model, one.sample(torch.Generator().manual_seed(3)))
        assert gaugenet.invariance_error(model, moved, inputs) > 1e-3
