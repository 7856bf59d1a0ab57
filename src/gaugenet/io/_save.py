"""Writing a state dict as safetensors, atomically and without overwriting by accident."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from .._errors import GaugeError

__all__ = ["check_writable", "save_safetensors_atomic"]


def check_writable(
    path: str | Path, *, force: bool = False, source: str | Path | None = None
) -> Path:
    """Raise `GaugeError` unless `path` may be written: not the input `source` and not an
    existing file (unless `force`), not a folder, in an existing folder. Commands call it
    before their work, so that a refusal comes at once."""
    path = Path(path)
    if (
        source is not None
        and Path(source).exists()
        and path.exists()
        and (path.resolve() == Path(source).resolve())
        and not force
    ):
        raise GaugeError(f"{path} is the input file; refusing to overwrite it (use --force)")
    if path.exists() and not force:
        raise GaugeError(f"{path} already exists; refusing to overwrite it (use --force)")
    if path.is_dir():
        raise GaugeError(f"{path} is a folder, not a file")
    if not path.parent.is_dir():
        raise GaugeError(f"the folder {path.parent} does not exist")
    return path


def save_safetensors_atomic(
    state: Mapping[str, Tensor],
    path: str | Path,
    *,
    force: bool = False,
    source: str | Path | None = None,
) -> Path:
    """Write `state` to `path` in the safetensors format.

    **Arguments:**

    - `state`: tensors by name (copied to contiguous, unshared storage before writing).
    - `path`: the output file.
    - `force`: allow replacing an existing file, or the input file itself.
    - `source`: the path the weights were read from; writing over it needs `force`.

    **Returns:** the path written. The file is written to a temporary file in the same
    folder and moved into place with `os.replace`, so a reader never sees half a file.
    """
    from safetensors.torch import save_file

    path = check_writable(path, force=force, source=source)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
