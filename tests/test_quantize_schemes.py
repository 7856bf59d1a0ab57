"""Quantization schemes: per-group weights, per-token activations, the `quantize` command."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from gaugenet import GaugeError
from gaugenet.apply import (
    QuantScheme,
    quantize,
    quantize_grouped,
    quantize_per_token,
    quantize_tensor,
    sqnr_db,
)


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("w4", QuantScheme(4)),
        ("w4t", QuantScheme(4, "per-tensor")),
        ("w4g128", QuantScheme(4, "per-group", 128)),
        ("w8a8", QuantScheme(8, act_bits=8)),
        ("W4G32A8", QuantScheme(4, "per-group", 32, 8)),
    ],
)
def test_scheme_round_trip(text: str, expect: QuantScheme) -> None:
    assert QuantScheme.parse(text) == expect
    assert QuantScheme.parse(str(expect)) == expect


@pytest.mark.parametrize("bad", ["x4", "w1", "w4g0", "w4a17", "w", "w4g", ""])
def test_bad_schemes_are_refused(bad: str) -> None:
    with pytest.raises(GaugeError):
        QuantScheme.parse(bad)


def test_grouped_rounding_has_one_step_per_group(gen: torch.Generator) -> None:
    w = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    w[0, :4] *= 100  # a loud group must not coarsen its quiet neighbour
    q = quantize_grouped(w, 4, 4)
    for i in range(3):
        for j in range(2):
            blk, qb = w[i, 4 * j : 4 * j + 4], q[i, 4 * j : 4 * j + 4]
            step = blk.abs().max() / 7
            k = qb / step
            torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-9)
            assert float((qb - blk).abs().max()) <= float(step) / 2 + 1e-12
    # negative: the per-channel step of row 0 is set by the loud group, so the quiet one
    # is rounded much more coarsely than with groups
    e_group = float((q[0, 4:] - w[0, 4:]).abs().max())
    e_chan = float((quantize_tensor(w, 4, "per-channel")[0, 4:] - w[0, 4:]).abs().max())
    assert e_chan > 10 * e_group
    with pytest.raises(GaugeError, match="positive integer"):
        quantize_grouped(w, 4, 0)


def test_a_short_last_group_is_rounded_on_its_own(gen: torch.Generator) -> None:
    w = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    w[:, 8:] *= 1e-3  # the short group's step must come from its own two entries
    q = quantize_grouped(w, 4, 4)
    torch.testing.assert_close(q[:, :8], quantize_grouped(w[:, :8], 4, 4), rtol=0, atol=0)
    torch.testing.assert_close(q[:, 8:], quantize_tensor(w[:, 8:], 4, "per-channel"))
    # a layer narrower than one group: per-channel rounding
    torch.testing.assert_close(quantize_grouped(w, 4, 128), quantize_tensor(w, 4, "per-channel"))
    assert float((q[:, 8:] - w[:, 8:]).abs().max()) < 1e-3 / 7


def test_per_token_activation_rounding(gen: torch.Generator) -> None:
    x = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    x[0, 0] *= 1000  # one outlier token keeps its own step
    q = quantize_per_token(x, 8)
    step = x.abs().amax(-1, keepdim=True) / 127
    torch.testing.assert_close(q / step, (q / step).round(), rtol=0, atol=1e-9)
    assert float(((q - x).abs() / step).max()) <= 0.5 + 1e-9
    assert float((q[1] - x[1]).abs().max()) < float(x[1].abs().max()) / 100


def test_quantize_applies_weights_and_activations(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)).double()
    x = torch.randn(8, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = m(x)
    w_only = quantize(m, "w8")
    wa = quantize(m, "w8a8")
    wa4 = quantize(m, "w8a4")
    # same weights; activation rounding adds noise on top, more at 4 bits than at 8
    for a, b in zip(w_only.parameters(), wa.parameters()):
        assert torch.equal(a, b)
    s_w, s_wa, s_wa4 = (sqnr_db(y, q(x)) for q in (w_only, wa, wa4))
    assert s_w > s_wa > s_wa4
    # the input model is untouched, and has no hooks
    assert not m[0]._forward_pre_hooks
    torch.testing.assert_close(m(x), y, rtol=0, atol=0)


def test_quantize_command(tmp_path) -> None:
    from gaugenet.cli._app import _register, app

    _register()
    runner = CliRunner()
    out = tmp_path / "q.safetensors"
    res = runner.invoke(
        app, ["quantize", "gaugenet.nets:example_cnn", "--scheme", "w4", "--equalize", "--out",
              str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "with equalization" in res.output
    state = load_file(str(out))
    w = state["0.weight"]
    steps = w.reshape(w.shape[0], -1).abs().amax(1) / 7
    k = w.reshape(w.shape[0], -1) / steps[:, None]
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)
    again = runner.invoke(
        app, ["quantize", "gaugenet.nets:example_cnn", "--out", str(out)]
    )  # refuses to overwrite without --force
    assert again.exit_code != 0
    bad = runner.invoke(
        app, ["quantize", "gaugenet.nets:example_cnn", "--scheme", "w4g0", "--out",
              str(tmp_path / "b.safetensors")],
    )  # fmt: skip
    assert bad.exit_code == 2
    assert "group size" in bad.output
    assert not (tmp_path / "b.safetensors").exists()


def _ln_mlp() -> nn.Sequential:
    """LayerNorm → Linear with two loud LayerNorm channels: the activation outliers that
    per-token activation rounding suffers from (what SmoothQuant was made for)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.rand(16) + 0.5)
        m[0].weight[[3, 7]] *= 40
        m[0].bias.normal_()
    return m


def _smoothquant(m: nn.Sequential, x: torch.Tensor, alpha: float = 0.5) -> nn.Sequential:
    """SmoothQuant's closed form on the LayerNorm → Linear pair (Xiao et al. 2023, eq. 4):
    `s_j = max|X_j|^α / max|W_j|^(1−α)`, `X_j ↦ X_j / s_j`, `W_j ↦ s_j W_j`."""
    import copy

    out = copy.deepcopy(m)
    with torch.no_grad():
        act = m[0](x).abs().amax(0)
        w = m[1].weight.abs().amax(0)
        s = act**alpha / w ** (1 - alpha)
        out[0].weight.div_(s)
        out[0].bias.div_(s)
        out[1].weight.mul_(s)
    return out


def test_activation_aware_equalization_beats_plain_and_smoothquant() -> None:
    from gaugenet import invariance_error
    from gaugenet.apply import equalize

    m = _ln_mlp()
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(3))
    calib, test = x[:64], x[64:]
    y = m(test)
    plain = sqnr_db(y, quantize(m, "w8a8")(test))
    sq = _smoothquant(m, calib)
    assert invariance_error(m, sq, test) < 1e-5
    s_sq = sqnr_db(y, quantize(sq, "w8a8")(test))
    w_only = equalize(m, calib, bits=8, granularity="per-channel", objective="output")
    wa = equalize(m, calib, bits=8, granularity="per-channel", objective="output", act_bits=8)
    s_w = sqnr_db(y, quantize(w_only, "w8a8")(test))
    s_wa = sqnr_db(y, quantize(wa, "w8a8")(test))
    assert s_wa > plain + 2.0, (plain, s_w, s_wa, s_sq)
    assert s_wa > s_w + 1.0, (plain, s_w, s_wa, s_sq)  # the activations are the point
    assert s_wa >= s_sq - 0.5, (plain, s_w, s_wa, s_sq)
    with pytest.raises(GaugeError, match="act_bits needs objective='output'"):
        equalize(m, calib, bits=8, act_bits=8)
