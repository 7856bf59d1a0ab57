"""The architectures of `coverage.py`: each row is `(name, build)`, `build()` giving a float64
eval-mode model with random weights of unit gain and a batch that reaches every parameter
(outputs outnumbering the parameters, so that the Jacobian's rank can show every
redundancy). The CNN rows take images and are calibrated on them (`coverage_images.py`):
every parameter entry has an effect, every ReLU unit is active and inactive on them, and
every ReLU6 unit also saturates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coverage_images import calibrate, images

Build = Callable[[], tuple[nn.Module, Any]]
G = torch.Generator().manual_seed(0)
F64 = torch.float64


def randomize(model: nn.Module) -> nn.Module:
    """Unit-gain matrices, norm scales near 1, small biases, BatchNorm statistics away from
    0 and 1 (so no parameter is special); float64, eval mode."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel() if p.ndim > 2 else min(p.shape)
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("weight") or name.endswith("scale") or name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.double().eval()


def _x(*shape: int, generator: torch.Generator = G) -> Tensor:
    return torch.randn(*shape, generator=generator, dtype=F64)


def _ids(batch: int, length: int, vocab: int) -> Tensor:
    """Token ids `(batch, length)` in which every id of the vocabulary appears."""
    ids = torch.randint(0, vocab, (batch * length,), generator=G)
    ids[:vocab] = torch.arange(vocab)
    return ids[torch.randperm(batch * length, generator=G)].reshape(batch, length)


# -- Hugging Face models from configs -----------------------------------------------------

V, T = 24, 6  # vocabulary, sequence length (= the positions table)


def _hf(cls_name: str, cfg_name: str, batch: int, extra: Callable | None = None, **cfg) -> Build:
    def build() -> tuple[nn.Module, Any]:
        import transformers

        config = getattr(transformers, cfg_name)(**cfg)
        model = randomize(getattr(transformers, cls_name)(config))
        ids = _ids(batch, T, cfg.get("vocab_size", V))
        inputs = extra(ids) if extra is not None else {"input_ids": ids}
        return model, inputs

    return build


def _bert_inputs(ids: Tensor) -> dict[str, Tensor]:
    types = torch.randint(0, 2, ids.shape, generator=G)
    return {"input_ids": ids, "token_type_ids": types}


_BERT = dict(
    vocab_size=V,
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    max_position_embeddings=T,
    type_vocab_size=2,
)
_LLAMA = dict(
    vocab_size=V,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=T,
    use_cache=False,
)


def _whisper() -> tuple[nn.Module, Any]:
    import transformers

    cfg = transformers.WhisperConfig(
        d_model=8,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=16,
        num_mel_bins=4,
        max_source_positions=4,
        vocab_size=V,
    )
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    model = randomize(WhisperEncoder(cfg))
    return model, {"input_features": _x(40, 4, 8)}


def _vit() -> tuple[nn.Module, Any]:
    import transformers

    cfg = transformers.ViTConfig(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        image_size=8,
        patch_size=4,
        num_channels=2,
    )
    return randomize(transformers.ViTModel(cfg)), {"pixel_values": _x(60, 2, 8, 8)}


HF_ROWS: list[tuple[str, Build]] = [
    ("BertModel", _hf("BertModel", "BertConfig", 40, _bert_inputs, **_BERT)),
    (
        "RobertaModel",
        _hf(
            "RobertaModel",
            "RobertaConfig",
            40,
            None,
            **{**_BERT, "max_position_embeddings": T + 2, "type_vocab_size": 1},
        ),
    ),
    (
        "DistilBertModel",
        _hf(
            "DistilBertModel",
            "DistilBertConfig",
            40,
            None,
            vocab_size=V,
            dim=8,
            n_layers=1,
            n_heads=2,
            hidden_dim=16,
            max_position_embeddings=T,
        ),
    ),
    (
        "GPT2Model",
        _hf(
            "GPT2Model",
            "GPT2Config",
            40,
            None,
            vocab_size=V,
            n_embd=8,
            n_layer=1,
            n_head=2,
            n_positions=T,
            use_cache=False,
        ),
    ),
    (
        "GPT2LMHeadModel (tied)",
        _hf(
            "GPT2LMHeadModel",
            "GPT2Config",
            40,
            None,
            vocab_size=V,
            n_embd=8,
            n_layer=1,
            n_head=2,
            n_positions=T,
            use_cache=False,
        ),
    ),
    (
        "OPTModel",
        _hf(
            "OPTModel",
            "OPTConfig",
            40,
            None,
            vocab_size=V,
            hidden_size=8,
            ffn_dim=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            word_embed_proj_dim=8,
            max_position_embeddings=T,
            use_cache=False,
        ),
    ),
    ("LlamaModel", _hf("LlamaModel", "LlamaConfig", 40, None, **_LLAMA)),
    (
        "LlamaModel (GQA 4/2)",
        _hf(
            "LlamaModel",
            "LlamaConfig",
            40,
            None,
            **{**_LLAMA, "num_attention_heads": 4, "num_key_value_heads": 2},
        ),
    ),
    ("LlamaForCausalLM", _hf("LlamaForCausalLM", "LlamaConfig", 40, None, **_LLAMA)),
    ("MistralModel", _hf("MistralModel", "MistralConfig", 40, None, **_LLAMA)),
    ("Qwen2Model", _hf("Qwen2Model", "Qwen2Config", 40, None, **_LLAMA)),
    (
        "GPTNeoXModel",
        _hf(
            "GPTNeoXModel",
            "GPTNeoXConfig",
            64,
            None,
            vocab_size=64,  # the parallel MLP of layer 0 reads the embeddings alone
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=T,
            use_cache=False,
        ),
    ),
    (
        "T5EncoderModel",
        _hf(
            "T5EncoderModel",
            "T5Config",
            40,
            None,
            vocab_size=V,
            d_model=8,
            d_kv=4,
            d_ff=16,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=4,
        ),
    ),
    ("ViTModel", _vit),
    (
        "CLIPTextModel",
        _hf(
            "CLIPTextModel",
            "CLIPTextConfig",
            40,
            None,
            vocab_size=V,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=T,
        ),
    ),
    ("Whisper encoder", _whisper),
]

# -- torch layers ---------------------------------------------------------------------------


def _encoder(norm_first: bool) -> Build:
    def build() -> tuple[nn.Module, Any]:
        layer = nn.TransformerEncoderLayer(
            8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        return randomize(model), _x(40, 5, 8)

    return build


def _decoder(norm_first: bool) -> Build:
    def build() -> tuple[nn.Module, Any]:
        model = nn.TransformerDecoderLayer(
            8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        return randomize(model), (_x(60, 4, 8), _x(60, 3, 8))

    return build


# -- CNNs -----------------------------------------------------------------------------------


class Basic(nn.Module):
    """ResNet basic block (two 3×3 convolutions with BatchNorm, projection when needed)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return F.relu(h + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout (stem, 4 stages of 2 basic blocks, pooling, head), widths 2-4."""

    def __init__(self, widths: tuple[int, ...] = (2, 2, 3, 4), classes: int = 3) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(2, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [Basic(cin, w, 1 if i == 0 else 2), Basic(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _vgg11(side: int = 64) -> nn.Module:
    """VGG-11's layout (8 convolutions with ReLU, 5 max-pools, a 3-layer classifier on the
    flattened last map), widths 2-4, for `side × side` inputs."""
    cfg = [2, "M", 3, "M", 3, 3, "M", 4, 4, "M", 4, 4, "M"]
    layers: list[nn.Module] = []
    cin = 2
    for c in cfg:
        if c == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, c, 3, padding=1), nn.ReLU()]
            cin = c
    return nn.Sequential(
        *layers, nn.Flatten(), nn.Linear(cin * (side // 32) ** 2, 5), nn.ReLU(), nn.Linear(5, 3)
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expansion, depthwise 3×3, 1×1 projection, ReLU6, BatchNorm."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.use_res else self.body(x)


def _mobilenet() -> nn.Module:
    """MobileNetV2's layout: a strided stem, inverted residual blocks (linear bottlenecks,
    one residual stream), a last 1×1 convolution with ReLU6, pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, 2, 1, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU6(),
        InvertedResidual(3, 3, 2, 1),
        InvertedResidual(3, 4, 2, 2),
        InvertedResidual(4, 4, 2, 1),
        nn.Conv2d(4, 6, 1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def _separable(act: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        act(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        act(),
        nn.Conv2d(4, 3, 1),
        act(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 2),
    )


def _normed_cnn(norm: Callable[[int], nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        norm(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        norm(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


class UNet(nn.Module):
    """Two levels: encoder convs, max-pool, bottleneck, transposed-conv and nearest
    upsampling paths, skips concatenated, a 1×1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.e1, self.e2 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1)
        self.mid = nn.Conv2d(3, 3, 3, padding=1)
        self.up2 = nn.ConvTranspose2d(3, 2, 2, stride=2)
        self.d2 = nn.Conv2d(2 + 3, 2, 3, padding=1)
        self.d1 = nn.Conv2d(2 + 2, 2, 3, padding=1)
        self.head = nn.Conv2d(2, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.e1(x))
        b = F.relu(self.e2(F.max_pool2d(a, 2)))
        m = F.relu(self.mid(F.max_pool2d(b, 2)))
        u = F.relu(self.d2(torch.cat([self.up2(m), b], 1)))
        u = F.interpolate(u, scale_factor=2, mode="nearest")
        return self.head(F.relu(self.d1(torch.cat([u, a], 1))))


class GatedMLP(nn.Module):
    """`down(act(gate(x)) * up(x))`: SwiGLU (SiLU) or GeGLU (GELU)."""

    def __init__(self, act: Callable[[Tensor], Tensor], d: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.act = act
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class Recurrent(nn.Module):
    """An LSTM or GRU over a sequence, then a linear head on every step."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn, self.head = cell(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0])


def _m(make: Callable[[], nn.Module], *shape: int) -> Build:
    """A row of `make()` on standard normal inputs of `shape` (drawn from the row's own
    generator: the same whichever rows run)."""
    return lambda: (randomize(make()), _x(*shape, generator=torch.Generator().manual_seed(0)))


def _cnn(make: Callable[[], nn.Module], *shape: int, spread: float | None = None) -> Build:
    """A CNN row: `make()` on `images(*shape)`, calibrated on them (`coverage_images.py`)."""

    def build() -> tuple[nn.Module, Any]:
        x = images(*shape, seed=0)
        return calibrate(randomize(make()), x, spread), x

    return build


TORCH_ROWS: list[tuple[str, Build]] = [
    ("nn.TransformerEncoder (post-norm)", _encoder(False)),
    ("nn.TransformerEncoder (pre-norm)", _encoder(True)),
    ("nn.TransformerDecoderLayer (post-norm)", _decoder(False)),
    ("nn.TransformerDecoderLayer (pre-norm)", _decoder(True)),
    ("ResNet-18 layout", _cnn(ResNet18, 600, 2, 16, 16)),
    ("VGG-11 layout", _cnn(_vgg11, 700, 2, 64, 64)),
    ("MobileNetV2 layout", _cnn(_mobilenet, 1500, 2, 16, 16, spread=8.0)),
    ("depthwise-separable, ReLU", _cnn(lambda: _separable(nn.ReLU), 100, 2, 6, 6)),
    ("depthwise-separable, ReLU6", _cnn(lambda: _separable(nn.ReLU6), 100, 2, 6, 6, spread=8.0)),
    ("GroupNorm CNN", _m(lambda: _normed_cnn(lambda c: nn.GroupNorm(2, c)), 100, 2, 6, 6)),
    (
        "InstanceNorm CNN",
        _m(lambda: _normed_cnn(lambda c: nn.InstanceNorm2d(c, affine=True)), 100, 2, 6, 6),
    ),
    ("U-Net (transposed conv, upsampling, skips)", _cnn(UNet, 64, 1, 16, 16)),
    ("SwiGLU MLP", _m(lambda: GatedMLP(F.silu), 40, 4)),
    ("GeGLU MLP", _m(lambda: GatedMLP(F.gelu), 40, 4)),
    ("LSTM", _m(lambda: Recurrent(nn.LSTM), 30, 5, 3)),
    ("GRU", _m(lambda: Recurrent(nn.GRU), 30, 5, 3)),
]

ROWS = HF_ROWS + TORCH_ROWS
