"""Shared pieces of the commands that take a MODEL: loading it and making sample inputs."""

from __future__ import annotations

import math

from .._errors import GaugeError
from ..io import MAX_INPUT_NUMBERS, sample_inputs

__all__ = ["ARCH_HELP", "INPUT_SHAPE_HELP", "MODEL_HELP", "parse_shape", "sample_inputs"]

MODEL_HELP = (
    "The model: a Hugging Face folder (with config.json); a weights file (.safetensors, "
    ".pt, .pth, .bin) plus --arch; or module:factory, where module is a dotted import path "
    "or a file path such as path/to/file.py:factory (a function returning the nn.Module)."
)
ARCH_HELP = "module:factory or path/to/file.py:factory building the architecture of a weights file."
INPUT_SHAPE_HELP = (
    "Shape of ONE input without the batch dimension, e.g. 1,28,28 or 3x32x32 (default: the "
    "model's example_inputs(n), token ids for Hugging Face models, else from the first layer)."
)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """`"1,28,28"` to `(1, 28, 28)`; `None` stays `None`."""
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise GaugeError(f"--input-shape {text!r}: expected integers such as 1,28,28") from None
    if not shape or min(shape) <= 0:
        raise GaugeError(f"--input-shape {text!r}: expected positive integers such as 1,28,28")
    if math.prod(shape) > MAX_INPUT_NUMBERS:
        raise GaugeError(
            f"--input-shape {text!r} asks for {math.prod(shape):.3g} numbers per input (at most "
            f"{MAX_INPUT_NUMBERS:.0e}): give the shape of one input without the batch, "
            "e.g. 1,28,28"
        )
    return shape
