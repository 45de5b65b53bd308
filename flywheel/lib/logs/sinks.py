"""Parquet output for the ingest: rows flushed in batches, and temporary files made next to their target.

Batches keep memory bounded whatever the week's size; a temporary file in the target's own folder
is replaced into place atomically once complete, so a killed ingest never leaves half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

BATCH_ROWS = 5_000


class _BatchSink:
    """Rows (tuples in schema order) flushed to a ParquetWriter every ``BATCH_ROWS`` rows."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema)
        self.rows: list[tuple] = []
        self.total = 0

    def add(self, row: tuple) -> None:
        self.rows.append(row)
        if len(self.rows) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        columns = list(zip(*self.rows))
        arrays = [pa.array(col, type=f.type) for col, f in zip(columns, self.schema)]
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.total += len(self.rows)
        self.rows = []

    def close(self) -> None:
        self.flush()
        if self.total == 0:
            self.writer.write_table(self.schema.empty_table())
        self.writer.close()


def _tmp_next_to(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)
