"""Every path the flywheel writes, from (asset, week): one object owns the storage layout.

Everything lives under ``PathsSettings.home`` (logs may live elsewhere: ``log_dir``; LanceDB's
tables too: ``lancedb``, a folder or object storage). Assets,
checks, the CLI, the backfill and the benchmarks ask a :class:`Layout` for a path; nothing
rebuilds one by hand. Asset names are the constants below, used for asset keys and folders alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from flywheel.config import PathsSettings
from flywheel.lib.registry.store import LanceStore

# asset names: the keys in the Dagster graph and the folders under assets/
RAW_LOGS = "raw_logs"
QUARANTINE = "raw_logs_quarantine"
RELEVANCE_LABELS = "relevance_labels"
EVAL_SET = "eval_set"
FEWSHOT_SET = "fewshot_set"
FINETUNE_SET = "finetune_set"
TRAINED_MODEL = "trained_model"
TRAINED_RERANKER = "trained_reranker"
BENCHMARK_REPORT = "benchmark_report"
CHAMPION = "champion"

# model kinds: registry entries and folders under models/
EMBEDDER = "embedder"
RERANKER = "reranker"

SERVING_TABLE = "serving"


def week_key(week: date | str) -> str:
    return week if isinstance(week, str) else week.isoformat()


@dataclass(frozen=True)
class Layout:
    home: Path
    log_dir: Path
    lancedb_uri: str = ""  # empty: lancedb_dir
    lancedb_storage: tuple[tuple[str, str], ...] = ()  # LanceDB's storage options as (key, value) pairs

    @classmethod
    def of(cls, paths: PathsSettings) -> "Layout":
        options = tuple(sorted(json.loads(paths.lancedb_storage_options).items()))
        return cls(home=Path(paths.home), log_dir=Path(paths.log_dir), lancedb_uri=paths.lancedb_uri, lancedb_storage=options)

    # -- asset tables ------------------------------------------------------------------------
    @property
    def assets_dir(self) -> Path:
        return self.home / "assets"

    def asset(self, name: str, week: date | str) -> Path:
        """The Parquet file of one asset's week: re-materializing the week replaces exactly it."""
        return self.assets_dir / name / f"{week_key(week)}.parquet"

    def weeks_written(self, name: str, *, up_to: date | str | None = None) -> list[str]:
        """The weeks for which an asset has a file, oldest first, optionally up to a week."""
        folder = self.assets_dir / name
        if not folder.exists():
            return []
        weeks = sorted(p.stem for p in folder.glob("*.parquet") if not p.name.startswith("."))
        return [w for w in weeks if up_to is None or w <= week_key(up_to)]

    # -- models -----------------------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def model_dir(self, kind: str, week: str, run_id: str) -> Path:
        """One folder per week *and* run: re-materializing never overwrites a serving version."""
        return self.models_dir / kind / f"{week}-{run_id[:8]}"

    def run_info(self, kind: str, week: str) -> Path:
        """What trained_model / trained_reranker recorded for a week (MLflow run, version, folder)."""
        return self.models_dir / kind / f"{week}.json"

    def training_rows(self, week: str) -> Path:
        return self.models_dir / "training_rows" / f"{week}.parquet"

    # -- reports ----------------------------------------------------------------------------
    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    def report(self, week: str, suffix: str = ".md") -> Path:
        """benchmark-<week>.md / .html, or benchmark-<week>-<name> for a figure (suffix '-x.png')."""
        return self.reports_dir / f"benchmark-{week}{suffix}"

    def per_query(self, week: str) -> Path:
        """Per-query results the report computed (long form), which the gate decides from."""
        return self.report(week, "-per-query.parquet")

    def decision(self, week: str) -> Path:
        return self.report(week, "-decision.json")

    def trend(self, suffix: str = ".json") -> Path:
        return self.reports_dir / f"trend{suffix}"

    @property
    def serving_record(self) -> Path:
        """The serving pipeline (embedder and reranker versions, folders, settings) after the last promotion."""
        return self.home / "serving.json"

    # -- stores -----------------------------------------------------------------------------
    @property
    def lancedb_dir(self) -> Path:
        """The embedded default's LanceDB folder (``lancedb`` is where the tables really are)."""
        return self.home / "lancedb"

    @property
    def lancedb(self) -> LanceStore:
        """Where the corpus tables live (FLYWHEEL_LANCEDB_URI: a folder or object storage), with
        the storage options: what every caller hands to ``registry.index``."""
        return LanceStore(self.lancedb_uri or str(self.lancedb_dir), self.lancedb_storage)

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def openvino_cache(self) -> Path:
        """Converted (and quantized) OpenVINO networks, read back instead of converting again
        (``flywheel.lib.registry.openvino_backend``) by later runs, weeks and, under Dagster's
        multiprocess executor, steps: each a process of its own."""
        return self.cache_dir / "openvino"

    @property
    def judge_cache(self) -> Path:
        return self.cache_dir / "judge_cache.sqlite"

    @property
    def mining_cache(self) -> Path:
        return self.cache_dir / "mining"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def screenshots_dir(self) -> Path:
        return self.home / "screenshots"

    # -- simulation and backfill state --------------------------------------------------------
    @property
    def simulation_marker(self) -> Path:
        return self.log_dir / "simulation.json"

    @property
    def backfill_state(self) -> Path:
        return self.log_dir / "backfill.json"
