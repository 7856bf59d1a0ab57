"""Writing a state dict as safetensors, atomically and without overwriting by accident."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType

from torch import Tensor

from .._errors import GaugeError

__all__ = ["atomic_path", "check_writable", "save_safetensors_atomic"]


def check_writable(
    path: str | Path, *, force: bool = False, source: str | Path | None = None
) -> Path:
    """Raise `GaugeError` unless `path` may be written: not the input `source` and not an
    existing file (unless `force`), not a folder, in an existing folder we may write to.
    Commands call it before their work, so that a refusal comes at once."""
    path = Path(path)
    if (
        source is not None
        and Path(source).exists()
        and path.exists()
        and (path.resolve() == Path(source).resolve())
        and not force
    ):
        raise GaugeError(f"{path} is the input file; refusing to overwrite it (use --force)")
    if path.is_dir():
        raise GaugeError(f"{path} is a folder, not a file: give a file name for the output")
    if path.exists() and not force:
        raise GaugeError(f"{path} already exists; refusing to overwrite it (use --force)")
    if not path.parent.is_dir():
        raise GaugeError(f"the folder {path.parent} does not exist: create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise GaugeError(
            f"the folder {path.parent} is not writable: choose an output in a folder you may "
            "write to, or change its permissions"
        )
    return path


@contextlib.contextmanager
def _removed_on_signal(tmp: Path) -> Iterator[None]:
    """While active, SIGTERM and SIGINT remove `tmp` before the process ends as it would
    have (the previous handler runs; the default one re-raises the signal). A signal the
    process ignores (a background job's SIGINT, say) stays ignored: the write goes on."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be installed from the main thread
        return
    previous: dict[int, Callable | int | None] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        tmp.unlink(missing_ok=True)
        old = previous[signum]
        if callable(old):
            old(signum, frame)
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        old = signal.getsignal(sig)
        if old == signal.SIG_IGN:
            continue  # removing the file would turn an ignored signal into a failed write
        previous[sig] = old
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file next to `path` to write to; moved onto `path` when the block ends
    without error, removed otherwise, and removed on SIGTERM / SIGINT meanwhile."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise GaugeError(
            f"cannot create a file in {path.parent} ({exc.strerror}): choose an output in a "
            "folder you may write to"
        ) from exc
    os.close(fd)
    tmp = Path(name)
    try:
        with _removed_on_signal(tmp):
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # as open() would create it, not mkstemp's 0600
            os.replace(tmp, path)
    except OSError as exc:
        raise GaugeError(f"writing {path} failed ({exc.strerror or exc}): {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


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
    folder and moved into place with `os.replace`, so a reader never sees half a file; the
    temporary file is removed on any error, and on SIGTERM or SIGINT during the write.
    Raises `GaugeError` when the file may not or cannot be written.
    """
    from safetensors.torch import save_file

    path = check_writable(path, force=force, source=source)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return path
