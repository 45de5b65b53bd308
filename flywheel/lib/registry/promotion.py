"""Champion / challenger: which model serves, and the promotion itself (the gate that decides
is ``flywheel.lib.evaluation.gate``).

Registry aliases (MLflow): every new version gets ``challenger``; ``champion`` is the version in
production and moves only when the gate passes; the champion it replaces keeps the alias
``previous-champion`` (roll back with ``set_alias(name, "champion", <that version>)``). Before the
first promotion there is no ``champion`` alias and the configured base model serves.
"""

from __future__ import annotations

from pathlib import Path

from flywheel.lib.registry.tracking import Tracker

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
MODEL_DIR_TAG = "model_dir"


def serving_model(tracker: Tracker, embedder_name: str, base_model: str) -> tuple[str, str]:
    """(model folder, version label) of the embedder that serves now: the champion, else the base.

    The folder is the one the version was trained into (recorded as the version's ``model_dir``
    tag); if that folder is gone, the logged MLflow copy is downloaded and its sentence-transformers
    folder returned.
    """
    version = tracker.alias_version(embedder_name, CHAMPION)
    if version is None:
        return str(base_model), "base"
    mv = tracker.model_version(embedder_name, version)
    folder = (mv.tags or {}).get(MODEL_DIR_TAG)
    if folder and (Path(folder) / "modules.json").exists():
        return folder, f"v{version}"
    return tracker.download_embedder(embedder_name, version), f"v{version}"


def promote(tracker: Tracker, registered_name: str, version: str) -> dict:
    """Move ``champion`` to ``version``; the replaced champion becomes ``previous-champion``."""
    previous = tracker.alias_version(registered_name, CHAMPION)
    if previous is not None and previous != str(version):
        tracker.set_alias(registered_name, PREVIOUS, previous)
    tracker.set_alias(registered_name, CHAMPION, str(version))
    return {"registered_model": registered_name, "champion": str(version), "previous_champion": previous}


def retire(tracker: Tracker, registered_name: str) -> str | None:
    """No version of this model serves any more (e.g. no reranker passes the gate): the champion
    alias is removed and kept as ``previous-champion``. Returns the retired version."""
    previous = tracker.alias_version(registered_name, CHAMPION)
    if previous is not None:
        tracker.set_alias(registered_name, PREVIOUS, previous)
        tracker.delete_alias(registered_name, CHAMPION)
    return previous


def read_serving(path: Path) -> dict:
    """What serves now: {"embedder": {...} | None, "hybrid": {...} | None, "reranker": {...} | None}
    (empty before any promotion; "hybrid" is the keyword fusion of BM25 with the embedder's list)."""
    import json

    return json.loads(path.read_text()) if path.exists() else {"embedder": None, "reranker": None}


def changes(record: dict, serving: dict) -> list[str]:
    """What a week's decision record changes in the serving pipeline (empty: nothing to promote)."""
    out = []
    if record["promote"]:
        out.append(f"first stage -> challenger v{record['challenger_version']}")
    fusion_now, fusion_next = serving.get("hybrid"), _fusion(record)
    if fusion_next != fusion_now:
        out.append(f"keyword fusion -> {_fusion_words(fusion_next)}")
    if record["serving_reranker_is_new"]:
        out.append(f"reranker -> v{record['reranker_version']}")
    elif record["serving_reranker"] is None and serving.get("reranker"):
        out.append(f"reranker v{serving['reranker']['version']} retired")
    return out


def _fusion(record: dict) -> dict | None:
    """The keyword fusion a decision record serves (None: the dense list alone)."""
    return dict(record["hybrid_spec"]) if record.get("serving_hybrid") else None


def _fusion_words(spec: dict | None) -> str:
    return "off" if spec is None else f"BM25 {spec['fusion']} fusion, weight {spec['bm25_weight']}"


def promote_week(tracker: Tracker, record: dict, embedder: dict, reranker: dict, serving_path: Path, *,
                 embedder_name: str, reranker_name: str, write_serving_table) -> dict:
    """Carry out a week's decisions, component by component, and record the serving pipeline.

    ``embedder`` / ``reranker`` are the week's run infos; ``write_serving_table(table)`` copies a
    corpus table to the serving one. Returns what moved."""
    import json

    from flywheel.lib import store

    serving = read_serving(serving_path)
    moved = {"embedder": None, "reranker": None, "reranker_retired": None}
    if record["promote"]:
        moved["embedder"] = promote(tracker, embedder_name, embedder["version"])
        write_serving_table(embedder["lancedb_table"])
        serving["embedder"] = {k: embedder[k] for k in ("version", "model_dir", "lancedb_table", "week")}
    serving["hybrid"] = _fusion(record)
    if record["serving_reranker_is_new"]:
        moved["reranker"] = promote(tracker, reranker_name, reranker["version"])
        serving["reranker"] = {k: reranker[k] for k in reranker if k != "mlflow_run_id"}
    elif record["serving_reranker"] is None and serving.get("reranker"):
        moved["reranker_retired"] = retire(tracker, reranker_name)
        serving["reranker"] = None
    store.atomic_write_bytes(serving_path, json.dumps(serving, indent=2).encode())
    return {**moved, "serving": serving}
