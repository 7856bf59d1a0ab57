"""Capture by `torch.export` where `torch.fx` fails, keyword inputs, and results the rules do
not follow (every factor still passes the self-check)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gaugenet
from gaugenet.discovery import INTERNAL_ERROR

F64 = torch.float64
transformers = pytest.importorskip("transformers")


def _internal(group) -> list[str]:
    return [b.node for b in group.breakers if b.reason.startswith(INTERNAL_ERROR)]


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=24,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=6,
        use_cache=False,
    )
    return transformers.LlamaModel(cfg).double().eval()


def test_a_model_returning_its_key_value_cache_is_captured_without_it(gen) -> None:
    """A decoder built with its default configuration returns a key-value cache that
    `torch.export` cannot flatten; it is captured with `use_cache=False` and gets the same
    group as one built without the cache, checked on the call as given (cache included)."""
    plain = _llama()
    cfg = plain.config.to_dict() | {"use_cache": True}
    cached = transformers.LlamaModel(transformers.LlamaConfig(**cfg)).double().eval()
    cached.load_state_dict(plain.state_dict())
    x = {"input_ids": torch.randint(0, 24, (3, 6), generator=gen)}
    assert type(cached(**x).past_key_values).__name__.endswith("Cache")
    group, ref = gaugenet.symmetries(cached, x), gaugenet.symmetries(plain, x)
    assert group.dim == ref.dim == 72 and _internal(group) == []
    assert group.example_inputs == x  # the call the group was checked on, as given
    moved = group.act(cached, group.sample(gen))
    assert gaugenet.invariance_error(cached, moved, x) < 1e-12
    # negative: an unchecked perturbation of one weight changes the outputs
    with torch.no_grad():
        moved.layers[0].mlp.up_proj.weight[0, 0] += 0.5
    assert gaugenet.invariance_error(cached, moved, x) > 1e-4


def _distilbert() -> nn.Module:
    cfg = transformers.DistilBertConfig(
        vocab_size=24, dim=8, n_layers=1, n_heads=2, hidden_dim=16, max_position_embeddings=6
    )
    return transformers.DistilBertModel(cfg).double().eval()


@pytest.mark.parametrize("build", [_llama, _distilbert], ids=["llama", "distilbert"])
def test_export_captures_what_fx_cannot(build, gen) -> None:
    torch.manual_seed(0)
    model = build()
    x = {"input_ids": torch.randint(0, 24, (3, 6), generator=gen)}
    with pytest.raises(gaugenet.GaugeError, match="torch.fx"):
        from gaugenet.discovery._trace import trace

        trace(model, 1)
    group = gaugenet.symmetries(model, x)  # captured, analysed, self-checked
    assert _internal(group) == []
    assert not any("cannot capture" in b.reason for b in group.breakers)
    g = group.sample(gen)
    assert gaugenet.invariance_error(model, group.act(model, g), x) < 1e-9


class Chunked(nn.Module):
    """`torch.chunk` of a layer's outputs (a result that is a tuple, not one tensor): one
    half through ReLU, the other through tanh, each read by its own layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(2, 2), nn.Linear(2, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        u, v = torch.chunk(self.a(x), 2, -1)
        return self.b(F.relu(u)) + self.c(torch.tanh(v))


class _Stacked(nn.Module):
    """The parts of a split given whole to an operation no rule follows."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.logsumexp(torch.stack(F.relu(self.a(x)).chunk(2, -1)), 0))


def test_tuple_results_keep_the_labels_of_their_parts(gen) -> None:
    """Each part of a split keeps its entries' labels: the ReLU half's two units rescale,
    the tanh half's do not, and that is every redundancy of the Jacobian."""
    torch.manual_seed(0)
    model, x = Chunked().double(), torch.randn(30, 3, generator=gen, dtype=F64)
    group = gaugenet.symmetries(model, x)
    assert _internal(group) == []  # the rule, not the self-check, keeps it right
    assert group.dim == 2 and any("tanh" in b.reason.lower() for b in group.breakers)
    assert gaugenet.certify(model, x, group=group, method="exact").verdict == "complete"
    assert gaugenet.invariance_error(model, group.act(model, group.sample(gen)), x) < 1e-12
    # negative: the same scales on the tanh half's rows change the outputs
    wrong = Chunked().double()
    wrong.load_state_dict(model.state_dict())
    with torch.no_grad():
        wrong.a.weight[2:].mul_(2.0)
        wrong.a.bias[2:].mul_(2.0)
        wrong.c.weight.div_(2.0)
    assert gaugenet.invariance_error(model, wrong, x) > 1e-3
    # a part that reaches an operation no rule follows is fixed there (nothing unseen)
    stacked = _Stacked().double()
    group = gaugenet.symmetries(stacked, x)
    assert _internal(group) == [] and group.dim == 0
