"""A fingerprint of the computation a model performs, independent of its weights' values."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from torch import fx, nn

__all__ = ["fingerprint"]


def _qualname(obj: object) -> str:
    cls = type(obj)
    module = cls.__module__
    if module.startswith("_gaugenet_arch_"):
        # an architecture file, imported under a per-process name: name it by its file
        module = Path(getattr(sys.modules.get(module), "__file__", None) or module).name
    return f"{module}.{cls.__qualname__}"


def fingerprint(model: nn.Module) -> str:
    """A 16-hex-digit digest of what `model` computes, up to the values of its tensors.

    Hashed: every submodule's name, class and `extra_repr` (widths, kernel sizes, `eps`,
    activation choice); every parameter's and buffer's name, shape and dtype; and, when
    `torch.fx` can capture the model, every node of the traced graph (operation, target,
    arguments), which records what a custom `forward` does with its submodules. Models that
    cannot be traced (most Hugging Face models) are keyed by the first two parts alone.
    Two checkpoints with equal fingerprints have the same gauge group, so a sweep discovers
    it once per fingerprint.
    """
    h = hashlib.sha256()
    for name, m in model.named_modules():
        h.update(f"M {name} {_qualname(m)} {m.extra_repr()}\n".encode())
    for kind, items in (("P", model.named_parameters()), ("B", model.named_buffers())):
        for name, t in items:
            h.update(f"{kind} {name} {tuple(t.shape)} {t.dtype}\n".encode())
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # fx fails in many ways; the module structure stands alone then
        h.update(b"untraced\n")
    else:
        for node in graph.nodes:
            h.update(f"N {node.format_node()}\n".encode())
    return h.hexdigest()[:16]
