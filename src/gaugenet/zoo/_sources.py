"""The checkpoints of a zoo: a folder or a glob of weights files and Hugging Face folders."""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path

from .._errors import GaugeError

__all__ = ["WEIGHT_SUFFIXES", "content_hash", "list_checkpoints", "source_stat"]

#: File suffixes read as one checkpoint each (a folder with `config.json` is one too).
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _is_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return (path / "config.json").is_file()
    return path.is_file() and path.suffix in WEIGHT_SUFFIXES


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def list_checkpoints(zoo: str | Path, *, exclude: str | Path | None = None) -> list[str]:
    """The checkpoints of `zoo`, as sorted absolute paths.

    **Arguments:**

    - `zoo`: a folder (searched recursively for weights files and Hugging Face folders; the
      files inside a Hugging Face folder belong to it) or a glob pattern (`**` allowed).
    - `exclude`: a folder whose contents are never listed (the results folder, so that a
      sweep never reads what it wrote).

    **Returns:** absolute paths. Raises `GaugeError` when nothing matches.
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    root = Path(zoo)
    if root.is_dir():
        found: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath).resolve()
            if _inside(here, skip):
                dirnames.clear()
                continue
            if here != root.resolve() and (here / "config.json").is_file():
                found.append(here)
                dirnames.clear()  # a Hugging Face folder's files are not separate checkpoints
                continue
            dirnames.sort()
            found += [here / f for f in filenames if Path(f).suffix in WEIGHT_SUFFIXES]
        if (root / "config.json").is_file():
            found = [root.resolve()]
    else:
        found = [Path(p).resolve() for p in glob.glob(str(zoo), recursive=True)]
        found = [p for p in found if _is_checkpoint(p)]
    paths = sorted({str(p) for p in found if not _inside(p, skip)})
    if not paths:
        raise GaugeError(
            f"no checkpoints in {str(zoo)!r} (looked for {', '.join(WEIGHT_SUFFIXES)} files and "
            "folders with config.json)"
        )
    return paths


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def content_hash(path: str | Path) -> str:
    """SHA-256 of the checkpoint's bytes (a folder: of its files' relative names and bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in _files(path):
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def source_stat(path: str | Path) -> str:
    """Sizes and modification times of the checkpoint's files: a cheap test of whether a
    finished row still describes the file (a rerun redoes rows whose stat changed)."""
    path = Path(path)
    parts = []
    for f in _files(path):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()
