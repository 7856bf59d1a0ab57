"""Architectures for weights files: built-in names, `path/file.py:factory`, `module:factory`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .._errors import GaugeError
from ..io import load_model

__all__ = ["BUILTIN_ARCHS", "load_checkpoint", "resolve_arch"]

#: Built-in architecture names and the factories they stand for.
BUILTIN_ARCHS: dict[str, str] = {
    "digits_mlp": "gaugenet.apply._models:digits_mlp",
    "digits_cnn": "gaugenet.apply._models:digits_cnn",
    "example_cnn": "gaugenet.nets:example_cnn",
}


def resolve_arch(arch: str | None) -> str | None:
    """`arch` as a `module:factory` string any process can resolve: a built-in name is
    replaced by its factory, a relative `.py` path made absolute (workers may run elsewhere).
    """
    if arch is None:
        return None
    if arch in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[arch]
    mod, sep, attr = arch.rpartition(":")
    if not sep:
        raise GaugeError(
            f"architecture {arch!r} is neither a built-in name ({', '.join(BUILTIN_ARCHS)}) "
            "nor 'path/file.py:factory' / 'module:factory'"
        )
    if mod.endswith(".py"):
        path = Path(mod)
        if not path.is_file():
            raise GaugeError(f"architecture file {path} does not exist")
        return f"{path.resolve()}:{attr}"
    return arch


def load_checkpoint(path: str, arch: str | None) -> nn.Module:
    """The model a checkpoint holds: a Hugging Face folder (its own architecture) or a
    weights file loaded into `arch` (already resolved by `resolve_arch`)."""
    return load_model(path, None if Path(path).is_dir() else arch)
