"""MLflow tracking and registry on local disk (SQLite + an artifact folder).

One experiment; one run per week and model kind, tagged with the Dagster run id and the
partition. New model versions get the ``challenger`` alias; ``champion`` moves only on a
passed gate (the previous champion stays registered for rollback).
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

PIP_REQUIREMENTS = ["sentence-transformers", "torch", "transformers"]


@dataclass(frozen=True)
class Tracker:
    tracking_uri: str
    artifact_root: str
    experiment: str

    def _client(self):
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow.MlflowClient(tracking_uri=self.tracking_uri)

    def experiment_id(self) -> str:
        import mlflow

        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        client = self._client()
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        Path(self.artifact_root).mkdir(parents=True, exist_ok=True)
        # artifact_location pins artifacts under FLYWHEEL_HOME, not ./mlruns of whatever cwd
        return mlflow.create_experiment(self.experiment, artifact_location=Path(self.artifact_root).as_uri())

    @contextmanager
    def run(self, name: str, tags: dict[str, str]) -> Iterator[str]:
        import mlflow

        exp_id = self.experiment_id()
        # the trainer's own MLflow callback is off (report_to="none"); we log explicitly
        os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        with mlflow.start_run(experiment_id=exp_id, run_name=name, tags=tags) as run:
            yield run.info.run_id

    def log_embedder(self, model_dir: Path, registered_name: str, *, device: str = "cpu") -> str:
        """Log the saved model in MLflow's sentence_transformers flavour and register a version."""
        import mlflow

        from flywheel.lib.index import load_embedder

        model = load_embedder(model_dir, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = mlflow.sentence_transformers.log_model(
                model, name="model", registered_model_name=registered_name, pip_requirements=PIP_REQUIREMENTS,
            )
        version = str(info.registered_model_version)
        self._client().set_registered_model_alias(registered_name, "challenger", version)
        return version

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        client = self._client()
        for key, value in metrics.items():
            if value == value:  # skip NaN
                client.log_metric(run_id, key.replace("@", "_at_"), float(value), step=step or 0)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._client().log_text(run_id, text, artifact_file)

    def alias_version(self, registered_name: str, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return self._client().get_model_version_by_alias(registered_name, alias).version
        except MlflowException:
            return None

    def set_alias(self, registered_name: str, alias: str, version: str) -> None:
        self._client().set_registered_model_alias(registered_name, alias, version)
