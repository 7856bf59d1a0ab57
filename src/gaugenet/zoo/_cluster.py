"""A Dask client: an embedded local cluster of worker processes, or an existing scheduler."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dask
from distributed import Client, LocalCluster

from .._errors import GaugeError

__all__ = ["dask_client"]

#: How often a task may lose its worker (killed, out of memory) before it becomes an error row.
ALLOWED_FAILURES = 2


def _export_pythonpath() -> None:
    """Put the folder gaugenet is imported from on `PYTHONPATH`, which spawned worker
    processes inherit, so that they import this same gaugenet (a source tree, say)."""
    import gaugenet

    root = str(Path(gaugenet.__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


@contextmanager
def dask_client(
    *, workers: int = 2, scheduler: str | None = None, memory_limit: str | None = "2GiB"
) -> Iterator[Client]:
    """A connected `distributed.Client`.

    **Arguments:**

    - `workers`: worker processes of the embedded cluster (one thread each), which listens
      on 127.0.0.1 only and has no dashboard.
    - `scheduler`: the address of a running scheduler (`tcp://127.0.0.1:8786`) to use
      instead; its workers must import gaugenet themselves.
    - `memory_limit`: per worker of the embedded cluster (`"2GiB"`, `None` for none); a
      worker that exceeds it is restarted and its task retried, then recorded as an error.
    """
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise GaugeError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
        with client:
            yield client
        return
    if workers < 1:
        raise GaugeError(f"--workers must be at least 1, got {workers}")
    _export_pythonpath()
    config = {
        "distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
        # one task per thread: a worker that dies takes no queued, innocent task with it
        "distributed.scheduler.worker-saturation": 1.0,
    }
    with (
        dask.config.set(config),
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit or 0,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
