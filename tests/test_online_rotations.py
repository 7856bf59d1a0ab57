"""Online input rotations (`gaugenet.apply._online`): exact algebra, the deployed model equals
its emulation in the original basis, and they are proposed only where they pay."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gaugenet import GaugeError
from gaugenet.apply import (
    RotatedInput,
    equalize,
    online_layers,
    quantize,
    rotate_inputs_online,
    rotated_layers,
)
from gaugenet.apply._equalize import _rounded_outputs
from gaugenet.apply._online import _paley, online_factor, rotation_matrix
from gaugenet.apply._quantize import quantized_params
from gaugenet.groups import model_state


class GatedMLP(nn.Module):
    """`x + down(silu(gate x) * up x)` then a head: the down projection's input is a product
    that nothing before it can rotate; `loud` hidden units are made large (outliers)."""

    def __init__(self, d: int = 16, h: int = 48, loud: int = 2, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate, self.up = nn.Linear(d, h), nn.Linear(d, h)
        self.down, self.head = nn.Linear(h, d), nn.Linear(d, 8)
        with torch.no_grad():
            for lin in (self.gate, self.up, self.down, self.head):
                lin.weight.copy_(
                    torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.in_features)
                )
                lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))
            self.up.weight[:loud] *= 40.0
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.down(nn.functional.silu(self.gate(x)) * self.up(x)))


def _x(n: int = 64, d: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 3, 12, 20, 24, 44, 48, 96, 128, 384, 100, 7])
def test_rotation_is_orthogonal(n):
    r = rotation_matrix(n)
    assert r.shape == (n, n)
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=r.dtype), atol=1e-13, rtol=0)


@pytest.mark.parametrize("n", [4, 12, 20, 24, 48, 96, 384])
def test_hadamard_widths_are_flat(n):
    """Where a Hadamard matrix is built (powers of two times a Paley order), every entry has
    magnitude `1/√n`: a single loud feature is spread evenly over all of them."""
    assert torch.allclose(
        rotation_matrix(n).abs(), torch.full((n, n), n**-0.5, dtype=torch.float64), atol=1e-13
    )


@pytest.mark.parametrize("m", [4, 8, 12, 20, 24, 32, 44, 48, 60])
def test_paley_is_hadamard(m):
    h = _paley(m)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=h.dtype))


def test_online_factor_rejects_bad_width():
    with pytest.raises(GaugeError, match="positive width"):
        online_factor(0)
    p, small = online_factor(384)
    assert p * small.shape[0] == 384 and small.shape[0] == 12


def test_rotated_model_computes_the_same_function():
    model, x = GatedMLP(), _x()
    rot = rotate_inputs_online(model, ["down", "head"])
    assert rotated_layers(rot) == ["down", "head"] and isinstance(rot.down, RotatedInput)
    assert (rot(x) - model(x)).abs().max() <= 1e-13 * model(x).abs().max()
    assert isinstance(model.down, nn.Linear)  # the input model is not modified
    # negative: the rotated input without the rotated weight is a different function
    wrong = RotatedInput(nn.Linear(48, 16).double(), *online_factor(48))
    wrong.linear.load_state_dict(model.down.state_dict())
    h = torch.randn(5, 48, dtype=torch.float64)
    assert (wrong(h) - model.down(h)).abs().max() > 0.1


def test_rotate_rejects_what_it_cannot_rotate():
    model = GatedMLP()
    with pytest.raises(GaugeError, match="no layer 'nope'"):
        rotate_inputs_online(model, ["nope"])
    conv = nn.Sequential(nn.Conv1d(4, 4, 3))
    with pytest.raises(GaugeError, match="online rotations apply to Linear layers"):
        rotate_inputs_online(conv, ["0"])
    with pytest.raises(GaugeError, match="the model itself is the Linear layer"):
        rotate_inputs_online(nn.Linear(4, 4), [""])


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8", "w4g16"])
def test_emulation_equals_the_deployed_rotated_model(scheme):
    """What the objective scores (rounding `round(W Rᵀ) R` and `Rᵀ round(R x)` in the original
    basis) is exactly what `quantize` computes on the model with `RotatedInput` layers."""
    model, x = GatedMLP(), _x()
    names = quantized_params(model)
    rounded, _ = _rounded_outputs(model, x, names, _scheme(scheme), online=("down",))
    deployed = quantize(rotate_inputs_online(model, ["down"]), scheme)(x)
    assert (rounded(model_state(model)) - deployed).abs().max() <= 1e-12
    plain, _ = _rounded_outputs(model, x, names, _scheme(scheme))
    assert (plain(model_state(model)) - deployed).abs().max() > 1e-4  # the rotation matters


def _quiet() -> nn.Module:
    """One Linear layer on Gaussian inputs: nothing for a rotation to spread."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(16, 8)).double()


def _scheme(s):
    from gaugenet.apply import QuantScheme

    return QuantScheme.parse(s)


def test_online_layers_finds_the_loud_product_only():
    """The down projection's input holds two loud hidden units: rotating it cuts its
    per-token rounding error many times. The head's input (the residual sum, no outlier
    planted) is not proposed, nor is a Gaussian input, which a rotation leaves Gaussian."""
    model, x = GatedMLP(), _x()
    found = online_layers(model, x, "w8a8")
    assert list(found) == ["down"]
    before, after = found["down"]
    assert after * 4 < before
    assert online_layers(_quiet(), x, "w8a8") == {}
    with pytest.raises(GaugeError, match="gain must be at least 1"):
        online_layers(model, x, "w8a8", gain=0.5)


def test_equalize_online_pays_and_keeps_the_function():
    """A wide gated product is heavy-tailed token by token (no fixed loud channel that a
    rescaling could tame): the online rotation lowers the held-out rounding error well
    below the best in-group element's."""
    model, x, held = GatedMLP(h=128, loud=0), _x(128), _x(128, seed=2)
    lines: list[str] = []
    kw = dict(bits=8, objective="output", scheme="w8a8", search=0)
    plain = equalize(model, x, **kw)
    rot = equalize(model, x, **kw, online=True, log=lines.append)
    assert rotated_layers(rot) == ["down"] and rotated_layers(plain) == []
    assert any(line.startswith("online rotations: kept (1: down)") for line in lines)
    final = [line for line in lines if line.startswith("online rotations on calibration: ")]
    assert len(final) == 1 and "; kept weights-only element + 1 proposed online (" in final[0]
    y = model(held).detach()
    assert (rot(held) - y).abs().max() <= 1e-9 * y.abs().max()

    def err(m):
        return float(((quantize(m, "w8a8")(held) - y) ** 2).sum().detach())

    assert err(rot) < 0.85 * min(err(plain), err(model))


def test_equalize_online_needs_the_output_objective():
    with pytest.raises(GaugeError, match="online rotations need objective='output'"):
        equalize(GatedMLP(), _x(), bits=8, online=True)


def test_equalize_online_not_kept_where_nothing_pays():
    lines: list[str] = []
    out = equalize(
        _quiet(), _x(), bits=8, objective="output", scheme="w8a8", search=0,
        online=True, log=lines.append,
    )  # fmt: skip
    assert rotated_layers(out) == []
    assert any("online rotations: not kept" in line for line in lines)


def test_equalize_online_loses_to_the_weights_only_element():
    """One loud ReLU channel (×40): a rotation of the second layer's input pays at the
    identity, so it is proposed, but a rescaling of that channel (in the group) does better
    on validation than the element chosen with the rotation, so `online=True` returns the
    weights-only element itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).double()
    with torch.no_grad():
        model[0].weight[:1] *= 40.0
        model[0].bias[:1] *= 40.0
    x, val, lines = _x(128), _x(128, seed=2), []
    kw = dict(bits=8, objective="output", scheme="w8a8", search=0, validation=val)
    out = equalize(model, x, **kw, online=True, log=lines.append)
    assert any(line.startswith("online rotations: kept (1: 2)") for line in lines)
    final = [line for line in lines if line.startswith("online rotations on validation: ")]
    assert len(final) == 1 and final[0].endswith("; kept weights only (lowest)")
    assert "online element + 1 proposed online" in final[0]  # judged, not kept
    assert rotated_layers(out) == []
    plain = equalize(model, x, **kw)
    held = _x(64, seed=5)
    assert torch.equal(quantize(out, "w8a8")(held), quantize(plain, "w8a8")(held))
    rot = rotate_inputs_online(plain, ["2"])  # the rotation does change the rounded model
    assert (quantize(rot, "w8a8")(held) - quantize(plain, "w8a8")(held)).abs().max() > 1e-4


class _Cube(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.abs()


def _cubed(width: int = 32, depth: int = 3, seed: int = 0) -> nn.Sequential:
    """Linear layers with `x ↦ x|x|` between them: every hidden input is heavy-tailed token
    by token, each a little."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    d = 16
    for _ in range(depth):
        layers += [nn.Linear(d, width), _Cube()]
        d = width
    model = nn.Sequential(*layers, nn.Linear(d, 8)).double()
    with torch.no_grad():
        for lin in model:
            if isinstance(lin, nn.Linear):
                w = torch.randn(lin.weight.shape, generator=g, dtype=torch.float64)
                lin.weight.copy_(w / math.sqrt(lin.in_features))
                lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))
    return model


def test_equalize_online_rotates_every_input_where_together_they_pay():
    """No single rotation cuts its layer's rounding error in half (1.4 to 2.0), so
    `online_layers` proposes none; rotating every Linear input together more than halves
    the validation noise, beyond one standard error, and is kept. Held out it beats the
    weights-only element too, and the function is kept exactly."""
    model = _cubed(seed=1)
    x, val, held = _x(256, seed=9), _x(256, seed=10), _x(256, seed=11)
    kw = dict(bits=8, objective="output", scheme="w8a8", search=0, validation=val)
    lines: list[str] = []
    out = equalize(model, x, **kw, online=True, log=lines.append)
    assert online_layers(model, x, "w8a8") == {}
    assert "online rotations: not kept (0: none proposed)" in lines
    final = [line for line in lines if line.startswith("online rotations on validation: ")]
    assert len(final) == 1 and final[0].endswith(
        "; kept weights-only element + all 4 online (lowest)"
    )
    assert rotated_layers(out) == ["0", "2", "4", "6"]
    y = model(held).detach()
    assert (out(held) - y).abs().max() <= 1e-9 * y.abs().max()
    plain = equalize(model, x, **kw)

    def err(m):
        return float(((quantize(m, "w8a8")(held) - y) ** 2).sum().detach())

    assert rotated_layers(plain) == [] and err(out) < 0.85 * err(plain)


def test_rounding_online_rejects_bad_layers():
    from gaugenet.apply._schemes import round_weight, with_activation_rounding

    with pytest.raises(GaugeError, match="not quantized: \\['nope'\\]"):
        with_activation_rounding(GatedMLP(), 8, copy_model=True, online=("nope",))
    conv = nn.Sequential(nn.Conv1d(4, 4, 3))
    with pytest.raises(GaugeError, match="'0' is Conv1d"):
        with_activation_rounding(conv, 8, copy_model=True, online=("0",))
    with pytest.raises(GaugeError, match="not shape \\(4, 4, 3\\)"):
        round_weight(torch.randn(4, 4, 3, dtype=torch.float64), _scheme("w8"), rotated=True)


def test_gpt2_conv1d_rotated_online():
    """GPT-2's MLP down projection is a `Conv1D` (weight `(in, out)`): rotated online as the
    `nn.Linear` holding its transpose would be, the function kept, and its emulation equal
    to `quantize` of the rotated model."""
    from tiny_hf import tiny_hf

    gpt, inputs = tiny_hf(
        "GPT2Model", "GPT2Config", batch=8, vocab_size=24, n_embd=16, n_layer=1, n_head=2,
        n_positions=6, use_cache=False,
    )  # fmt: skip
    ids = inputs["input_ids"]
    layer = "h.0.mlp.c_proj"
    rot = rotate_inputs_online(gpt, [layer])
    assert rotated_layers(rot) == [layer]
    y = gpt(input_ids=ids).last_hidden_state
    assert (rot(input_ids=ids).last_hidden_state - y).abs().max() <= 1e-12 * y.abs().max()
    names = quantized_params(gpt)
    for scheme in ("w4a8", "w4g8"):
        rounded, _ = _rounded_outputs(gpt, {"input_ids": ids}, names, _scheme(scheme), (layer,))
        deployed = quantize(rot, scheme)(input_ids=ids).last_hidden_state
        assert (rounded(model_state(gpt)) - deployed).abs().max() <= 1e-12
    with torch.no_grad():  # two loud hidden units (Conv1D's output units are its columns)
        gpt.h[0].mlp.c_fc.weight[:, :2] *= 40.0
        gpt.h[0].mlp.c_fc.bias[:2] += 20.0
    found = online_layers(gpt, {"input_ids": ids}, "w8a8")
    assert layer in found and found[layer][1] * 2 <= found[layer][0]


def test_a_tied_head_is_not_rotated_online():
    """GPT-2's LM head is its token table: rotating the head's input online (`W Rᵀ`) would
    rotate the table's rows too. `rotatable_layers` leaves it out, `rotate_inputs_online`
    refuses it, and every other input rotated keeps the function; untied, the head is
    rotatable."""
    from gaugenet.apply._online import rotatable_layers
    from tiny_hf import tiny_hf

    gpt, inputs = tiny_hf(
        "GPT2LMHeadModel", "GPT2Config", batch=8, vocab_size=24, n_embd=16, n_layer=1,
        n_head=2, n_positions=6, use_cache=False,
    )  # fmt: skip
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    free = rotatable_layers(gpt)
    assert "lm_head" not in free and "transformer.h.0.mlp.c_proj" in free
    with pytest.raises(GaugeError, match="'lm_head' shares its weight with another layer"):
        rotate_inputs_online(gpt, ["lm_head"])
    y = gpt(**inputs).logits
    rot = rotate_inputs_online(gpt, free)
    assert (rot(**inputs).logits - y).abs().max() <= 1e-12 * y.abs().max()
    # negative: the head rotated with its table tied moves the outputs (what is refused)
    bad = copy.deepcopy(gpt)
    with torch.no_grad():
        bad.lm_head.weight.copy_(bad.lm_head.weight @ rotation_matrix(16).T)
    assert (bad(**inputs).logits - y).abs().max() > 1e-2 * y.abs().max()
    gpt.lm_head.weight = nn.Parameter(gpt.lm_head.weight.detach().clone())
    assert "lm_head" in rotatable_layers(gpt)


def test_unreached_layers_are_those_no_residual_rotation_reaches():
    """On a Llama block the group's residual rotation reaches the inputs of q, k, v, gate,
    up and the head (merged into their weights for free); o_proj (after the heads' values)
    and down_proj (after the gated product) are the unreached ones, QuaRot's online places,
    found from the group, and `equalize(online=True)` judges them as a finalist."""
    from gaugenet.apply._equalize import _group_rotated_inputs
    from gaugenet.apply._online import rotatable_layers
    from loud_llama import loud_llama

    model, x, group, _ = loud_llama()
    every = set(rotatable_layers(model))
    reached = _group_rotated_inputs(group, model)
    assert every - reached == {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"}
    assert len(every) == 8 and len(every & reached) == 6
    lines: list[str] = []
    equalize(model, x, bits=8, objective="output", scheme="w8a8", search=0, online=True,
             log=lines.append)  # fmt: skip
    final = [line for line in lines if line.startswith("online rotations on calibration: ")]
    assert len(final) == 1 and "+ 2 unreached online " in final[0] and "+ all 8 online " in final[0]
