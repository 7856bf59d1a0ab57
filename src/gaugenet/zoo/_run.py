"""`gaugenet.zoo.run`: one task over every checkpoint of a zoo, in parallel, resumable."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .._errors import GaugeError
from ._arch import resolve_arch
from ._cluster import dask_client
from ._schema import empty_row, row_key
from ._sources import list_checkpoints, source_stat
from ._store import ResultStore
from ._task import AbstractTask
from ._tasks import as_task
from ._worker import Job, process

__all__ = ["run"]


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _sweep(client, jobs: list[Job], advance) -> dict[Job, BaseException]:
    """Run `jobs`; returns the ones whose task failed (their worker died) with the error."""
    from distributed import as_completed

    futures = client.map(process, jobs, pure=False)
    job_of = {f.key: j for f, j in zip(futures, jobs)}
    failed: dict[Job, BaseException] = {}
    for n, fut in enumerate(as_completed(futures), 1):
        try:
            fut.result()
        except Exception as exc:  # `process` records every error itself: the worker died
            failed[job_of[fut.key]] = exc
        advance(n - len(failed))
        fut.release()
    return failed


def _died(job: Job, task: AbstractTask, exc: BaseException) -> dict:
    row = empty_row(job.path, task.signature)
    row.update(verdict="error", error=f"{type(exc).__name__} (out of memory?): {exc}")
    row.update(finished_at=time.time(), source_stat=source_stat(job.path))
    return row


def run(
    zoo: str | Path,
    task: str | AbstractTask,
    *,
    out: str | Path,
    arch: str | None = None,
    workers: int = 2,
    scheduler: str | None = None,
    memory_limit: str | None = "2GiB",
    input_shape: tuple[int, ...] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Run `task` on every checkpoint of `zoo` on Dask; one row per checkpoint.

    **Arguments:**

    - `zoo`: a folder (searched recursively) or a glob of checkpoints: `.safetensors` or
      weights-only `.pt`/`.pth`/`.bin` state dicts (with `arch`), Hugging Face folders.
    - `task`: `"inspect"`, `"canonicalize"`, `"certify"`, `"equalize"` or a task object
      with options (`Canonicalize(gauge="unit_in")`, `Equalize(bits=8)`, ...).
    - `out`: the results folder: `out/<task>.parquet` and the written weights
      `out/<task>/*.safetensors` (inputs are never overwritten).
    - `arch`: the architecture of weights files: a built-in name (`BUILTIN_ARCHS`),
      `path/file.py:factory` or `module:factory`.
    - `workers`, `scheduler`, `memory_limit`: see `dask_client`.
    - `input_shape`: the shape of one input without the batch, when it cannot be inferred.
    - `progress`: show a progress bar.

    **Returns:** the rows of `zoo`'s checkpoints as a DataFrame (columns: `SCHEMA`), sorted
    by path. Rows finished by an earlier run with the same task and unchanged input are
    reused, not recomputed; `df.attrs["skipped"]` counts them, `df.attrs["seconds"]` is the
    wall time of the computed part (cluster start included).
    """
    t = as_task(task)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GaugeError(f"{out} is a file; --out must be a folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = list_checkpoints(zoo, exclude=out)
    arch = resolve_arch(arch)
    store = ResultStore(out, t.name)
    done = store.finished()
    jobs = []
    for p in paths:
        row = done.get(row_key(p, t.signature))
        if row is not None and row["source_stat"] == source_stat(p):
            continue
        jobs.append(Job(p, arch, t, str(out.resolve()), input_shape))
    start = time.perf_counter()
    if jobs:
        client = dask_client(workers=workers, scheduler=scheduler, memory_limit=memory_limit)
        with client as c, _progress(progress) as bar:
            bar_id = bar.add_task(t.name, total=len(jobs), rate="")

            def advance(n: int) -> None:
                rate = n / (time.perf_counter() - start)
                bar.update(bar_id, completed=n, rate=f"{rate:.2f} ckpt/s")

            suspects = _sweep(c, jobs, advance)
            # a dead worker fails every task it held: retry those one at a time, so that
            # only a checkpoint that kills its worker on its own gets an error row
            for i, job in enumerate(suspects, 1):
                err = _sweep(c, [job], lambda _: None)
                if err:
                    store.write_part(_died(job, t, err[job]))
                advance(len(jobs) - len(suspects) + i)
    seconds = time.perf_counter() - start
    table = store.compact().to_pandas()
    keys = {row_key(p, t.signature) for p in paths}
    df = table[table["key"].isin(keys)].reset_index(drop=True)
    df.attrs.update(skipped=len(paths) - len(jobs), computed=len(jobs), seconds=seconds)
    return df
