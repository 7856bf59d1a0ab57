"""The results table: one row per checkpoint and task, with a fixed Parquet schema."""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

__all__ = ["SCHEMA", "empty_row", "row_key"]

#: Columns of the results table. Dimensions, drift, SQNR and gap are null where the task
#: does not measure them; `error` is null unless `verdict == "error"`.
SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # absolute path of the checkpoint
        ("key", pa.string()),  # digest of (path, task signature): the row's identity
        ("task", pa.string()),  # the task with its options, e.g. canonicalize(gauge=balanced)
        ("content_hash", pa.string()),  # SHA-256 of the checkpoint's bytes
        ("arch_fingerprint", pa.string()),  # digest of the computation (see `fingerprint`)
        ("n_params", pa.int64()),
        ("symmetry_dim", pa.int64()),
        ("functional_dim", pa.int64()),
        ("unexplained", pa.int64()),
        ("n_factors", pa.int64()),
        ("n_breakers", pa.int64()),
        ("factors", pa.string()),  # factor kinds with counts (inspect) or causes (certify)
        ("drift", pa.float64()),  # relative output change of the written weights
        ("sqnr_before_db", pa.float64()),
        ("sqnr_after_db", pa.float64()),
        ("gap", pa.float64()),  # singular-value gap of the certificate
        ("verdict", pa.string()),  # ok, drift, certified, unexplained, inconclusive, error
        ("error", pa.string()),
        ("output", pa.string()),  # the weights written, if any
        ("discovery_cached", pa.bool_()),  # the gauge group came from the worker's cache
        ("load_s", pa.float64()),
        ("discover_s", pa.float64()),
        ("task_s", pa.float64()),
        ("total_s", pa.float64()),
        ("worker", pa.string()),
        ("finished_at", pa.float64()),  # Unix time the row was finished
        ("source_stat", pa.string()),  # sizes and mtimes of the input when it was read
    ]
)


def row_key(path: str, signature: str) -> str:
    """The identity of a row: the checkpoint's path and the task signature."""
    return hashlib.sha1(f"{path}\0{signature}".encode()).hexdigest()[:24]


def empty_row(path: str, signature: str) -> dict[str, Any]:
    """A row with every column null except the checkpoint's identity."""
    row: dict[str, Any] = dict.fromkeys(SCHEMA.names)
    row.update(path=path, key=row_key(path, signature), task=signature)
    return row
