"""`load_model(spec, arch)`: a model from a Hugging Face folder, a state dict file or a factory.

`spec` forms:

- a folder with `config.json`: a Hugging Face model, loaded as the class its config names
  (`architectures`), else with `transformers.AutoModel`;
- a `.safetensors` file, or a `.pt` / `.pth` / `.bin` file holding a state dict (read with
  `weights_only=True`, never by unrestricted unpickling), plus `arch="module:factory"`;
- `"module:factory"` alone (the factory is called without arguments).

In `"module:factory"`, `module` is a dotted import path or a path to a `.py` file.
"""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .._errors import GaugeError
from ..groups import check_model
from ._hf import named_class

__all__ = ["load_model", "load_state_dict", "resolve_factory"]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def resolve_factory(arch: str) -> Callable[[], nn.Module]:
    """The callable named by `"module:factory"` (`module` dotted, or a `.py` file path)."""
    mod_name, sep, attr = arch.rpartition(":")
    if not sep or not mod_name or not attr:
        raise GaugeError(f"architecture {arch!r} must look like 'module:factory'")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise GaugeError(f"architecture file {path} does not exist")
        key = f"_gaugenet_arch_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[key]
            raise GaugeError(
                f"running the architecture file {path} failed: {type(exc).__name__}: {exc}"
            ) from exc
    else:
        try:
            module = importlib.import_module(mod_name)
        except Exception as exc:  # ImportError, or a relative / malformed name
            raise GaugeError(f"cannot import {mod_name!r} (from {arch!r}): {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise GaugeError(f"{mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise GaugeError(f"{arch!r} is not callable")
    return obj


def _build(arch: str) -> nn.Module:
    factory = resolve_factory(arch)
    try:
        model = factory()
    except Exception as exc:
        raise GaugeError(
            f"calling {arch!r} failed ({type(exc).__name__}: {exc}); the factory must build "
            "the model without arguments"
        ) from exc
    if not isinstance(model, nn.Module):
        raise GaugeError(f"{arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors by name from a `.safetensors` file or a weights-only torch file."""
    path = Path(path)
    if not path.is_file():
        raise GaugeError(f"{path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise GaugeError(f"{path} is not a readable safetensors file: {exc}") from exc
    if path.suffix not in _TORCH_SUFFIXES:
        raise GaugeError(
            f"{path}: unknown weight format {path.suffix!r} "
            f"(expected .safetensors or one of {_TORCH_SUFFIXES})"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise GaugeError(
            f"{path} is not a weights-only file (it pickles arbitrary objects, which is refused; "
            f"save a state dict instead): {str(exc).splitlines()[0]}"
        ) from exc
    except Exception as exc:
        raise GaugeError(f"{path} cannot be read as a torch weights file: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise GaugeError(f"{path} does not hold a state dict (a dict of tensors by name)")
    return dict(obj)


def _load_hf(path: Path) -> nn.Module:
    """The model of a Hugging Face folder as the class its `config.json` names (its head
    included: a language model's head is a layer to equalize and round too), else as
    `AutoModel` would load it."""
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as exc:
        raise GaugeError(f"{path} is a Hugging Face folder but transformers is missing") from exc
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        cls = named_class(config) or AutoModel
        model = cls.from_pretrained(str(path), config=config, local_files_only=True)
    except Exception as exc:
        raise GaugeError(f"cannot load the Hugging Face model in {path}: {exc}") from exc
    return model.eval()


def load_model(spec: str, arch: str | None = None) -> nn.Module:
    """The model described by `spec` (see the module docstring), in eval mode.

    **Arguments:**

    - `spec`: a Hugging Face folder, a weights file, or `"module:factory"`.
    - `arch`: `"module:factory"` building the architecture a weights file is loaded into.

    **Returns:** the `nn.Module`. Raises `GaugeError` saying what is wrong (missing file,
    unknown format, pickled objects, keys or shapes that do not match the architecture, a
    model without parameters, with integer or zero-width ones; see `check_model`).
    """
    if "\x00" in spec or (arch is not None and "\x00" in arch):
        raise GaugeError("the model or --arch contains a NUL character")
    try:
        return check_model(_load(spec, arch))
    except OSError as exc:
        raise GaugeError(f"cannot read {spec!r}: {exc.strerror or exc}") from exc


def _load(spec: str, arch: str | None) -> nn.Module:
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GaugeError(f"{path} is a folder without config.json (not a Hugging Face model)")
        if arch is not None:
            raise GaugeError("--arch is for weights files; a Hugging Face folder has its own")
        return _load_hf(path)
    if path.suffix in (".safetensors", *_TORCH_SUFFIXES):
        if arch is None:
            raise GaugeError(
                f"{path} holds weights only: pass the architecture as --arch module:factory"
            )
        state = load_state_dict(path)
        model = _build(arch)
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise GaugeError(
                f"{path} does not match {arch}: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise GaugeError(
                    f"{path}: {k} has shape {tuple(v.shape)}, {arch} expects {tuple(own[k].shape)}"
                )
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
        return model.eval()
    if ":" in spec and not path.exists():
        if arch is not None:
            raise GaugeError("give either a factory or a weights file with --arch, not both")
        return _build(spec).eval()
    raise GaugeError(
        f"{spec!r} is neither a Hugging Face folder, a weights file "
        "(.safetensors, .pt, .pth, .bin) nor 'module:factory'"
    )
