"""Writing a sharded checkpoint folder atomically: every shard, the index and the small
files (config, tokenizer) go to a temporary folder next to the output, which is renamed
onto the output only when all of it is written; on any error it is removed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

from .._errors import GaugeError
from ._checkpoint import INDEX, ShardedCheckpoint

__all__ = ["ShardWriter", "atomic_folder", "check_output_folder"]

#: small files copied along with the weights (configuration, tokenizer, templates)
_COPIED = (".json", ".txt", ".model", ".jinja")


def check_output_folder(out: Path, source: Path, *, force: bool) -> Path:
    """Raise `GaugeError` unless `out` may be written: never the input folder (nor inside
    it, nor holding it, even with `force`), not an existing path unless `force`, in an
    existing writable folder."""
    out, src = out.resolve(), source.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise GaugeError(
            f"{out} is the input folder or overlaps it; a streamed checkpoint is never "
            "written over its input: choose another output folder"
        )
    if out.exists() and not force:
        raise GaugeError(f"{out} already exists; refusing to overwrite it (use --force)")
    if out.exists() and not out.is_dir():
        raise GaugeError(f"{out} is a file; the output of a sharded checkpoint is a folder")
    if not out.parent.is_dir():
        raise GaugeError(f"the folder {out.parent} does not exist: create it first")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise GaugeError(f"the folder {out.parent} is not writable")
    return out


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A temporary folder next to `out`; renamed onto `out` when the block ends without
    error (an existing `out` is moved aside first and removed after), removed otherwise."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # as mkdir would create it, not mkdtemp's 0700
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        raise GaugeError(f"writing {out} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ShardWriter:
    """Writes shards with the input's names and layout into `folder`, then the index."""

    def __init__(self, ckpt: ShardedCheckpoint, folder: Path) -> None:
        self.ckpt, self.folder = ckpt, folder
        self.sizes: dict[str, int] = {}

    def write(self, shard: str, tensors: dict[str, Tensor]) -> None:
        from safetensors.torch import save_file

        expected = self.ckpt.shards[shard]
        if sorted(tensors) != sorted(expected):
            raise GaugeError(f"internal error: shard {shard} is incomplete")
        tensors = {self.ckpt.stored_name(k): tensors[k].contiguous() for k in expected}
        save_file(tensors, str(self.folder / shard), metadata={"format": "pt"})
        self.sizes[shard] = sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self) -> None:
        """The index (same weight map, total size) and the small files of the input."""
        index = {
            "metadata": {"total_size": sum(self.sizes.values())},
            "weight_map": {self.ckpt.stored_name(k): v for k, v in self.ckpt.weight_map.items()},
        }
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for p in self.ckpt.folder.iterdir():
            if p.is_file() and p.suffix in _COPIED and p.name != INDEX:
                shutil.copy2(p, self.folder / p.name)
