"""Durable results: one Parquet part per finished row, compacted into one table at the end."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ._schema import SCHEMA

__all__ = ["ResultStore"]


def _write_atomic(table: pa.Table, path: Path) -> None:
    # a leading dot keeps half-written files out of `pyarrow.dataset` listings
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultStore:
    """The results of one task in a results folder `out`.

    - `out/.parts/<task>/<key>.parquet`: one file per finished row, written atomically by
      the worker that finished it (so a crash of the sweep, or of a worker, loses only the
      rows in flight);
    - `out/<task>.parquet`: the compacted table, written atomically by `compact`, after
      which the parts it holds are removed.

    A rerun reads both to skip finished rows.
    """

    def __init__(self, out: str | Path, task_name: str) -> None:
        self.out = Path(out)
        self.parts = self.out / ".parts" / task_name
        self.table_path = self.out / f"{task_name}.parquet"

    def write_part(self, row: dict[str, Any]) -> Path:
        """Write one finished row durably; returns the part's path."""
        self.parts.mkdir(parents=True, exist_ok=True)
        path = self.parts / f"{row['key']}.parquet"
        _write_atomic(pa.Table.from_pylist([row], schema=SCHEMA), path)
        return path

    def _part_files(self) -> list[Path]:
        if not self.parts.is_dir():
            return []
        return sorted(p for p in self.parts.glob("*.parquet") if not p.name.startswith("."))

    def _read(self) -> tuple[pa.Table, list[Path]]:
        tables = []
        if self.table_path.is_file():
            tables.append(pq.read_table(self.table_path, schema=SCHEMA))
        parts = self._part_files()
        if parts:
            tables.append(ds.dataset([str(p) for p in parts], schema=SCHEMA).to_table())
        if not tables:
            return SCHEMA.empty_table(), parts
        return pa.concat_tables(tables), parts

    def finished(self) -> dict[str, dict[str, Any]]:
        """The finished rows by key (a part overrides the compacted table's row)."""
        table, _ = self._read()
        return {r["key"]: r for r in table.to_pylist()}

    def compact(self) -> pa.Table:
        """Merge the parts into the table (sorted by path), write it atomically, remove the
        parts it now holds; returns the table."""
        table, parts = self._read()
        rows = {r["key"]: r for r in table.to_pylist()}
        merged = pa.Table.from_pylist(
            sorted(rows.values(), key=lambda r: (r["path"], r["task"])), schema=SCHEMA
        )
        self.out.mkdir(parents=True, exist_ok=True)
        _write_atomic(merged, self.table_path)
        for p in parts:
            p.unlink(missing_ok=True)
        return merged
