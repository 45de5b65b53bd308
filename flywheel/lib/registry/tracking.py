"""MLflow tracking and registry on local disk (SQLite + an artifact folder).

One experiment; one run per week and model kind, tagged with the Dagster run id and the
partition. New model versions get the ``challenger`` alias; ``champion`` moves only on a
passed gate (the previous champion stays registered for rollback).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

PIP_REQUIREMENTS = ["sentence-transformers", "torch", "transformers"]


def metric_name(key: str) -> str:
    """A name an MLflow tracking server accepts (alphanumerics, _ - . space : /); SQLite stores
    accept more, a server refuses the run's metrics with INVALID_PARAMETER_VALUE."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_").replace("+", "_plus_"))


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
        mlflow.disable_system_metrics_logging()
        with mlflow.start_run(experiment_id=exp_id, run_name=name, tags=tags) as run:
            yield run.info.run_id

    def log_embedder(self, model_dir: Path, registered_name: str, *, device: str = "cpu") -> str:
        """Log the saved model in MLflow's sentence_transformers flavour and register a version.

        The version gets the ``challenger`` alias and a ``model_dir`` tag (the local folder it was
        trained into, which ``promotion.serving_model`` serves from while it exists).
        """
        import mlflow

        from flywheel.lib.registry.index import load_embedder

        model = load_embedder(model_dir, device=device)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()) as said:
            warnings.simplefilter("ignore")
            info = mlflow.sentence_transformers.log_model(
                model, name="model", registered_model_name=registered_name, pip_requirements=PIP_REQUIREMENTS,
            )
        log.debug("mlflow: %s", said.getvalue().strip())  # "Successfully registered model ..." lines
        version = str(info.registered_model_version)
        client = self._client()
        client.set_model_version_tag(registered_name, version, "model_dir", str(Path(model_dir).resolve()))
        client.set_registered_model_alias(registered_name, "challenger", version)
        return version

    def log_reranker(self, run_id: str, model_dir: Path, registered_name: str) -> str:
        """Log a CrossEncoder folder as run artifacts (``reranker/``) and register it as a version.

        MLflow has no cross-encoder flavour; load a version with
        ``CrossEncoder(mlflow.artifacts.download_artifacts(run_id=<run>, artifact_path="reranker"))``.
        """
        from mlflow.exceptions import MlflowException

        client = self._client()
        client.log_artifacts(run_id, str(model_dir), artifact_path="reranker")
        try:
            client.create_registered_model(registered_name, description="flywheel cross-encoder reranker (artifact; see flywheel.lib.training.reranker)")
        except MlflowException:
            pass  # already registered
        source = f"{client.get_run(run_id).info.artifact_uri}/reranker"
        mv = client.create_model_version(registered_name, source=source, run_id=run_id,
                                         tags={"model_dir": str(Path(model_dir).resolve()), "loader": "sentence_transformers.CrossEncoder"})
        client.set_registered_model_alias(registered_name, "challenger", str(mv.version))
        return str(mv.version)

    def model_version(self, registered_name: str, version: str):
        return self._client().get_model_version(registered_name, str(version))

    def download_embedder(self, registered_name: str, version: str) -> str:
        """A local sentence-transformers folder for a registered version (from its MLflow copy)."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        model = mlflow.sentence_transformers.load_model(f"models:/{registered_name}/{version}")
        dest = Path(self.artifact_root).parent / "downloads" / registered_name / str(version)
        if not (dest / "modules.json").exists():
            model.save_pretrained(str(dest))
        return str(dest)

    def log_params(self, run_id: str, params: dict) -> None:
        client = self._client()
        for k, v in params.items():
            client.log_param(run_id, k, str(v)[:6000])

    def log_dict(self, run_id: str, data: dict, artifact_file: str) -> None:
        self._client().log_dict(run_id, data, artifact_file)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        client = self._client()
        for key, value in metrics.items():
            if value is not None and value == value:  # skip NaN
                client.log_metric(run_id, metric_name(key), float(value), step=step or 0)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._client().log_text(run_id, text, artifact_file)

    def log_files(self, run_id: str, files: dict[str, bytes], artifact_path: str) -> None:
        """Write named bytes (PNG plots, an HTML report) under ``artifact_path`` of the run."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self._client().log_artifacts(run_id, tmp, artifact_path)

    def alias_version(self, registered_name: str, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self._client().get_model_version_by_alias(registered_name, alias).version)
        except MlflowException:
            return None

    def set_alias(self, registered_name: str, alias: str, version: str) -> None:
        self._client().set_registered_model_alias(registered_name, alias, version)

    def delete_alias(self, registered_name: str, alias: str) -> None:
        self._client().delete_registered_model_alias(registered_name, alias)
