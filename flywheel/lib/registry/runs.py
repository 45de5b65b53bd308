"""What trained_model / trained_reranker recorded for a week: MLflow run, registered version,
model folder. The report, the gate and the promotion read it; nothing else rebuilds it."""

from __future__ import annotations

import json

from flywheel.layout import EMBEDDER, Layout
from flywheel.lib import store


def read_run_info(layout: Layout, week: str, kind: str = EMBEDDER) -> dict:
    path = layout.run_info(kind, week)
    if not path.exists():
        asset = "trained_model" if kind == EMBEDDER else "trained_reranker"
        raise FileNotFoundError(f"{path} is missing: materialize {asset} for {week} first")
    return json.loads(path.read_text())


def write_run_info(layout: Layout, week: str, kind: str, info: dict) -> None:
    store.atomic_write_bytes(layout.run_info(kind, week), json.dumps(info, indent=2).encode())
