"""Week-partitioned files for every asset: one Parquet file per (asset, week).

Assets write their own files (atomically: temp file + rename) so that re-materializing a
week replaces exactly that week and a crash never leaves half a file behind.
"""

from __future__ import annotations

import os
import tempfile
from datetime import date
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def week_key(week: date | str) -> str:
    return week if isinstance(week, str) else week.isoformat()


def asset_path(assets_dir: Path, asset: str, week: date | str, suffix: str = ".parquet") -> Path:
    return Path(assets_dir) / asset / f"{week_key(week)}{suffix}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_table(path: Path, table: pa.Table | pd.DataFrame) -> Path:
    """Write a Parquet file atomically (readers never see a partial file)."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: materialize the upstream asset for this week first"
        )
    return pq.read_table(path).to_pandas()


def weeks_written(assets_dir: Path, asset: str, *, up_to: date | str | None = None) -> list[str]:
    """The weeks for which an asset has a file, oldest first, optionally up to a week."""
    folder = Path(assets_dir) / asset
    if not folder.exists():
        return []
    weeks = sorted(p.stem for p in folder.glob("*.parquet") if not p.name.startswith("."))
    if up_to is not None:
        weeks = [w for w in weeks if w <= week_key(up_to)]
    return weeks
