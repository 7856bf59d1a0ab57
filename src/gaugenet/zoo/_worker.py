"""The work done for one checkpoint, on a Dask worker: load, discover (cached), run, record."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import GaugeError
from ..discovery import symmetries
from ..groups import GaugeGroup
from ..io import save_safetensors_atomic
from ._arch import load_checkpoint
from ._fingerprint import fingerprint
from ._schema import empty_row
from ._sources import content_hash, source_stat
from ._store import ResultStore
from ._task import AbstractTask

__all__ = ["Job", "clear_cache", "process"]

#: Gauge groups (or the discovery error) by architecture fingerprint, per worker process.
_GROUPS: dict[str, GaugeGroup | GaugeError] = {}


def clear_cache() -> None:
    """Forget the cached gauge groups of this process."""
    _GROUPS.clear()


@dataclass(frozen=True)
class Job:
    """One checkpoint to process: everything a worker needs, picklable."""

    path: str
    arch: str | None
    task: AbstractTask
    out: str
    input_shape: tuple[int, ...] | None = None


def _sampler(shape: tuple[int, ...] | None):
    from ..io import sample_inputs

    def sample(model: nn.Module, n: int) -> Any:
        return sample_inputs(model, n, shape=shape)

    return sample


def _group(model: nn.Module, fp: str, x: Any) -> tuple[GaugeGroup, bool]:
    hit = _GROUPS.get(fp)
    if hit is None:
        try:
            hit = symmetries(model, x)
        except GaugeError as exc:  # an unsupported architecture fails once per worker
            hit = exc
        _GROUPS[fp] = hit
        cached = False
    else:
        cached = True
    if isinstance(hit, GaugeError):
        raise hit
    return hit, cached


def output_path(job: Job, key: str) -> Path:
    """Where the weights a task writes for `job` go: `out/<task>/<stem>-<key>.safetensors`."""
    stem = Path(job.path).name.split(".")[0] or "model"
    return Path(job.out) / job.task.name / f"{stem}-{key[:10]}.safetensors"


def _write(job: Job, key: str, state: dict) -> str:
    dest = output_path(job, key)
    src = Path(job.path).resolve()
    if dest.resolve() == src or src in dest.resolve().parents:
        raise GaugeError(f"refusing to write {dest}: it would overwrite the input {src}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # force: a rerun may replace what an interrupted run of this same row wrote; the
    # destination lies in the results folder, which never holds inputs (see above)
    save_safetensors_atomic(state, dest, force=True)
    return str(dest)


def process(job: Job) -> dict[str, Any]:
    """Run `job.task` on one checkpoint and write its row as a part file.

    Every failure (unreadable file, architecture mismatch, unsupported operation, a task
    error) becomes an error row; the sweep goes on. **Returns:** the row.
    """
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    row = empty_row(job.path, job.task.signature)
    row["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    try:
        row["source_stat"] = source_stat(job.path)
        row["content_hash"] = content_hash(job.path)
        model = load_checkpoint(job.path, job.arch)
        row["arch_fingerprint"] = fp = fingerprint(model)
        sample = _sampler(job.input_shape)
        t1 = time.perf_counter()
        group, row["discovery_cached"] = _group(model, fp, sample(model, 4))
        t2 = time.perf_counter()
        outcome = job.task(model, group, sample)
        row.update(outcome.columns)
        if outcome.state is not None:
            row["output"] = _write(job, row["key"], outcome.state)
        t3 = time.perf_counter()
        row.update(load_s=t1 - t0, discover_s=t2 - t1, task_s=t3 - t2)
    except Exception as exc:  # a bad checkpoint is a row, never a crashed sweep
        row["verdict"] = "error"
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["total_s"] = time.perf_counter() - t0
    row["finished_at"] = time.time()
    ResultStore(job.out, job.task.name).write_part(row)
    return row
