"""Service mode against a real PostgreSQL: the queue, the daemon, the schedule, crashes, shutdown.

`flywheel services up --webservers 2 --foreground` starts PostgreSQL (Debian's package, as an
unprivileged user when the tests run as root), a code server, the daemon, two webservers and an
MLflow server on it, for a temp FLYWHEEL_HOME holding two simulated weeks of a small SciFact slice
with tiny training settings. Then, in order:

* `flywheel run --submit --job weekly_labels` queues the first week; the daemon dequeues and runs it;
* a run is frozen mid-way, the daemon, the code server and the run's worker are killed with
  SIGKILL, they are restarted and the daemon's run monitoring marks the run failed; the earlier
  materializations stay and a re-run gives outputs identical to the first run's;
* the schedule, started with its start time before the latest Monday tick, is ticked by the daemon's
  scheduler, which launches the whole graph for the week that just ended; it runs through the queue
  and registers a challenger in the MLflow server;
* both webservers answer GraphQL with the same runs; after SIGKILL to one of them and to the
  daemon, and restarts, the runs, the MLflow runs and the registry aliases are all still there;
* SIGTERM to the foreground command stops every process and PostgreSQL.

Skipped, with the reason, where PostgreSQL's server binaries are missing (`.ci/run` installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from flywheel.services.postgres import PostgresUnavailable, find_bindir

from flywheel.services import procs
from flywheel.services.stack import ServiceStack
from flywheel.services.submit import graphql, reload_location, run_status, submit_partition, wait_for_run
from flywheel.testing.ui import free_port

try:
    find_bindir()
    NO_POSTGRES = ""
except PostgresUnavailable as exc:
    NO_POSTGRES = f"service tests skipped: {exc}"

pytestmark = [pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = float(os.environ.get("FLYWHEEL_SERVICE_RUN_TIMEOUT_S", "900"))
LABEL_ASSETS = ("raw_logs", "relevance_labels", "eval_set", "fewshot_set")
GATE_STEP = "benchmark_report_challenger_beats_champion"  # the blocking promotion gate


def _latest_tick(now: datetime) -> datetime:
    """The weekly schedule's latest tick at or before ``now``: Monday 02:00 UTC."""
    tick = (now - timedelta(days=now.weekday())).replace(hour=2, minute=0, second=0, microsecond=0)
    return tick if tick <= now else tick - timedelta(days=7)


NOW = datetime.now(timezone.utc)
TICK = _latest_tick(NOW)
# the tick on Monday D targets the week that ended the day before: the partition D - 7 days
WEEKS = [(TICK - timedelta(days=14)).date().isoformat(), (TICK - timedelta(days=7)).date().isoformat()]


def _stack(env: dict[str, str]) -> ServiceStack:
    from flywheel.config import load_config

    import dataclasses

    # the services' own environment, also for the processes a test restarts
    return dataclasses.replace(ServiceStack.from_config(load_config(env)), base_env=dict(env))


def _instance(stack: ServiceStack):
    import dagster as dg

    with mock.patch.dict(os.environ, {k: v for k, v in stack.env().items() if k.startswith("DAGSTER_")}):
        return dg.DagsterInstance.get()


def _run_records(instance, run_id: str):
    return [e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event is not None]


def _failures(instance, run_id: str) -> list[str]:
    """Why a run failed: each failed step's error, and the run's failure message."""
    out = []
    for entry in instance.all_logs(run_id):
        ev = entry.dagster_event
        if ev is not None and ev.event_type_value in ("STEP_FAILURE", "PIPELINE_FAILURE"):
            error = getattr(ev.event_specific_data, "error", None)
            out.append(f"{ev.step_key or 'run'}: {error.to_string()[-1500:] if error else entry.message}")
    return out


def _outputs(layout, week: str) -> dict:
    from flywheel.lib import store

    return {name: store.read_table(layout.asset(name, week)) for name in LABEL_ASSETS}


# -- the cluster: files in deploy/ load and validate (no cluster, no network) --------------------

DEPLOY = REPO / "deploy"
PG_ENV = {"DAGSTER_PG_HOST": "pg", "DAGSTER_PG_USER": "dagster", "DAGSTER_PG_PASSWORD": "x", "DAGSTER_PG_DB": "flywheel_dagster"}


def _yaml(path: Path):
    import yaml

    return list(yaml.safe_load_all(path.read_text()))


def _k8s_launcher_errors(config: dict) -> list[str]:
    from dagster._config import process_config
    from dagster_k8s import K8sRunLauncher

    with mock.patch.dict(os.environ, PG_ENV):
        result = process_config(K8sRunLauncher.config_type(), config)
    return [e.message for e in result.errors or []]


def test_k8s_instance_validates_against_dagster_schemas():
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_postgres import DagsterPostgresStorage

    with mock.patch.dict(os.environ, PG_ENV):
        config, custom_class = dagster_instance_config(str(DEPLOY), "dagster.yaml")
        storage = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert custom_class is None and storage.success, storage.errors
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    assert _k8s_launcher_errors(config["run_launcher"]["config"]) == []
    assert config["concurrency"]["pools"]["default_limit"] == 1
    # the same check fails on a misspelt key
    bad = {**config["run_launcher"]["config"], "job_namespce": "flywheel"}
    assert any("job_namespce" in e for e in _k8s_launcher_errors(bad))


def _camel_to_snake(name: str) -> str:
    import re

    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_helm_values_render_the_same_instance():
    import importlib.util

    [values] = _yaml(DEPLOY / "helm" / "values.yaml")
    [instance] = _yaml(DEPLOY / "dagster.yaml")
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    # the chart's camelCase keys, in the instance's snake_case, validate against K8sRunLauncher's schema
    as_instance = {_camel_to_snake(k): v for k, v in launcher.items()}
    for key in ("env_config_maps", "env_secrets"):
        as_instance[key] = [ref["name"] for ref in as_instance[key]]
    as_instance["volume_mounts"] = [{_camel_to_snake(k): v for k, v in m.items()} for m in as_instance["volume_mounts"]]
    written = instance["run_launcher"]["config"]
    # the chart fills these from the release (its config map, secret and DAGSTER_HOME)
    from_release = {k: written[k] for k in ("instance_config_map", "postgres_password_secret", "dagster_home")}
    assert _k8s_launcher_errors({**as_instance, **from_release}) == []
    for key, value in as_instance.items():
        assert written[key] == value, key
    assert values["concurrency"]["enabled"] is True
    assert instance["concurrency"] == {
        "runs": {"max_concurrent_runs": values["concurrency"]["runs"]["maxConcurrentRuns"]},
        "pools": {"default_limit": values["concurrency"]["pools"]["defaultLimit"]},
    }
    assert instance["run_monitoring"] == {_camel_to_snake(k): v for k, v in values["dagsterDaemon"]["runMonitoring"].items()}
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    [deployment] = values["dagster-user-deployments"]["deployments"]
    module = deployment["dagsterApiGrpcArgs"][deployment["dagsterApiGrpcArgs"].index("-m") + 1]
    assert importlib.util.find_spec(module) is not None, module


def test_mlflow_server_manifest_parses_with_mlflows_own_cli():
    import click
    from mlflow.cli import server

    deployment = next(d for d in _yaml(DEPLOY / "k8s" / "mlflow.yaml") if d["kind"] == "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "server"
    ctx = server.make_context("server", list(args[1:]))
    assert ctx.params["serve_artifacts"] is True and ctx.params["artifacts_destination"].startswith("s3://")
    assert {e["name"] for e in container["env"]} >= {"MLFLOW_BACKEND_STORE_URI"}
    with pytest.raises(click.NoSuchOption):  # the same parse refuses a flag mlflow does not have
        server.make_context("server", [*args[1:], "--artifact-destination", "s3://x"])


def test_cluster_settings_configmap_loads_as_flywheel_config():
    from flywheel.config import load_config
    from flywheel.layout import Layout

    [configmap] = _yaml(DEPLOY / "k8s" / "flywheel-settings.yaml")
    config = load_config(dict(configmap["data"]))
    assert str(config.paths.home) == "/data/flywheel"
    assert config.paths.mlflow_uri == "http://flywheel-mlflow:5000"
    assert not any(k.endswith("API_KEY") for k in configmap["data"])  # secrets live in a Secret
    [lance] = _yaml(DEPLOY / "lancedb.yaml")  # the pods' LanceDB is the one deploy/lancedb.yaml describes
    store = Layout.of(config.paths).lancedb
    assert store.uri == lance["uri"] and dict(store.storage_options) == lance["storage_options"]


@pytest.fixture(scope="module")
def s3_server():
    """A local S3-compatible server (moto): LanceDB's object store talks to it like to S3."""
    pytest.importorskip("moto", reason="LanceDB object-storage test skipped: moto[server] missing (pip install -e '.[dev]')")
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="flywheel-s3-")) / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            import urllib.request

            urllib.request.urlopen(url + "/", timeout=2).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.3)
    yield url
    procs.stop_group(proc.pid, grace_s=5)
    shutil.rmtree(log.parent, ignore_errors=True)


def test_lancedb_storage_options_write_and_read_on_object_storage(s3_server):
    import boto3
    import lancedb
    import numpy as np
    import pyarrow as pa

    [spec] = _yaml(DEPLOY / "lancedb.yaml")
    bucket = spec["uri"].removeprefix("s3://").split("/", 1)[0]
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    boto3.client("s3", endpoint_url=s3_server, region_name=spec["storage_options"]["aws_region"], **creds).create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": spec["storage_options"]["aws_region"]})
    # the deploy file's options; only the endpoint and credentials point at the local server
    options = {**spec["storage_options"], "aws_endpoint": s3_server, "allow_http": "true", **creds}
    vectors = np.eye(4, 8, dtype=np.float32)
    table = pa.table({"id": ["a", "b", "c", "d"], "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 8)})
    lancedb.connect(spec["uri"], storage_options=options).create_table("corpus", data=table)
    again = lancedb.connect(spec["uri"], storage_options=options)  # a second client, as another pod would
    assert again.list_tables().tables == ["corpus"]
    hit = again.open_table("corpus").search(vectors[2]).limit(1).to_list()[0]
    assert hit["id"] == "c"
    listed = boto3.client("s3", endpoint_url=s3_server, region_name="eu-west-1", **creds).list_objects_v2(Bucket=bucket)
    assert any(o["Key"].startswith("prod/corpus.lance/") for o in listed.get("Contents", []))


def test_lancedb_corpus_index_of_the_flywheel_on_object_storage_searches_like_a_local_one(
        s3_server, small_beir, base_model_path, tmp_path, monkeypatch):
    """FLYWHEEL_LANCEDB_URI=s3://... with the storage options: the flywheel's own index and BM25
    functions build their tables in the bucket, and a second configuration (another pod) finds
    them and ranks exactly as the same tables on local disk do. Credentials come from AWS_* only."""
    import json

    import boto3

    from flywheel.config import load_config
    from flywheel.layout import Layout
    from flywheel.lib.beir import load_beir
    from flywheel.lib.registry import hybrid, index

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="eu-west-1")
    s3.create_bucket(Bucket="flywheel-index", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    options = {"aws_region": "eu-west-1", "aws_endpoint": s3_server, "allow_http": "true"}
    cluster = {"FLYWHEEL_HOME": str(tmp_path / "pod"), "FLYWHEEL_LANCEDB_URI": "s3://flywheel-index/weekly",
               "FLYWHEEL_LANCEDB_STORAGE_OPTIONS": json.dumps(options)}
    remote = Layout.of(load_config(cluster).paths).lancedb
    local = Layout.of(load_config({"FLYWHEEL_HOME": str(tmp_path / "laptop")}).paths).lancedb
    assert remote.uri == "s3://flywheel-index/weekly" and local.uri == str(tmp_path / "laptop" / "lancedb")

    ds = load_beir(small_beir)
    model = index.load_embedder(base_model_path, device="cpu", max_seq_length=128)
    model_id = index.model_fingerprint(base_model_path)
    said: list[str] = []
    tables = {where: index.ensure_corpus_table(where, model, model_id, ds.corpus, progress=said.append)
              for where in (remote, local)}
    assert tables[remote] == tables[local] and sum("embedded" in line for line in said) == 2
    bm25 = {where: hybrid.ensure_bm25_table(where, ds.corpus) for where in (remote, local)}

    again = Layout.of(load_config(cluster).paths).lancedb  # a second pod: same settings, new connections
    said.clear()
    assert index.ensure_corpus_table(again, model, model_id, ds.corpus, progress=said.append) == tables[remote]
    assert not said  # the complete table in the bucket is reused, not embedded again
    assert set(index.table_names(again)) == {tables[remote], bm25[remote]}
    queries = list(ds.split_queries("test").values())
    vectors = index.encode(model, queries, task="query")
    hits_remote, hits_local = (index.search(w, tables[remote], vectors, 10) for w in (again, local))
    assert [[d for d, _ in h] for h in hits_remote] == [[d for d, _ in h] for h in hits_local]
    assert [s for h in hits_remote for _, s in h] == pytest.approx([s for h in hits_local for _, s in h], abs=1e-6)
    assert hybrid.bm25_search(again, bm25[remote], queries, 10) == hybrid.bm25_search(local, bm25[local], queries, 10)

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="flywheel-index")["Contents"]]
    assert any(k.startswith(f"weekly/{tables[remote]}.lance/") for k in keys)
    assert not (tmp_path / "pod").exists()  # nothing of the index went to the pod's local disk


@pytest.fixture(scope="module")
def svc(request, base_model_path):
    """The services up in the foreground on a temp home with two simulated weeks."""
    from conftest import make_small_beir

    if NO_POSTGRES:
        pytest.skip(NO_POSTGRES)

    # PostgreSQL runs as an unprivileged user when we are root: its folder must be reachable
    # by that user, which pytest's 0700 temp root is not.
    root = Path(tempfile.mkdtemp(prefix="flywheel-services-"))
    root.chmod(0o711)
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    dataset = make_small_beir(root / "scifact-small", train_queries=40, test_queries=8, extra_docs=80)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "DAGSTER_", "MLFLOW_"))}
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "PYTHONUNBUFFERED": "1",
        "FLYWHEEL_HOME": str(root / "home"), "FLYWHEEL_DATASET": str(dataset), "FLYWHEEL_BASE_MODEL": base_model_path,
        "FLYWHEEL_START_DATE": WEEKS[0],
        "FLYWHEEL_EVAL_QUERIES": "3", "FLYWHEEL_FIRST_WEEK_EVAL_QUERIES": "0", "FLYWHEEL_FEWSHOT_EXAMPLES": "30", "FLYWHEEL_FINETUNE_EXAMPLES": "60",
        "FLYWHEEL_MIN_EVAL_QUERIES": "3", "FLYWHEEL_MIN_FEWSHOT_EXAMPLES": "10", "FLYWHEEL_MIN_FINETUNE_EXAMPLES": "20",
        "FLYWHEEL_TRAIN_MAX_STEPS": "3", "FLYWHEEL_TRAIN_BATCH_SIZE": "8", "FLYWHEEL_TRAIN_MAX_SEQ_LENGTH": "64",
        "FLYWHEEL_ENCODE_MAX_SEQ_LENGTH": "128", "FLYWHEEL_MINE_NEGATIVES": "0",
        "FLYWHEEL_RERANKER_MAX_STEPS": "2", "FLYWHEEL_RERANKER_MAX_LENGTH": "64", "FLYWHEEL_RERANK_DEPTH": "10",
        "FLYWHEEL_SERVICES_POSTGRES_PORT": str(free_port()), "FLYWHEEL_SERVICES_CODE_SERVER_PORT": str(free_port()),
        "FLYWHEEL_SERVICES_MLFLOW_PORT": str(free_port()),
    })
    env["FLYWHEEL_SERVICES_DAGSTER_PORT"] = str(free_port(consecutive=2))  # the second webserver listens on the next port
    from flywheel.config import load_config
    from flywheel.layout import Layout

    layout = Layout.of(load_config(env).paths)
    sim = subprocess.run(
        [sys.executable, "-m", "flywheel.cli", "simulate", "--weeks", "2", "--start", WEEKS[0], "--max-queries", "40"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    assert sorted(p.name for p in layout.log_dir.glob("day=*"))[0] == f"day={WEEKS[0]}"
    stack = _stack(env)
    request.addfinalizer(stack.down)  # whatever is still up (nothing, when the last test passed)
    log = root / "services-up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel.cli", "services", "up", "--webservers", "2", "--foreground"],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL), signal.signal(signal.SIGTERM, signal.SIG_DFL)),
        )
    deadline = time.monotonic() + 300
    while "running in the foreground" not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
        time.sleep(1)
    instance = _instance(stack)
    yield SimpleNamespace(env=env, root=root, stack=stack, proc=proc, log=log, layout=layout, instance=instance)
    instance.dispose()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)


@pytest.mark.slow
def test_submitted_partition_is_queued_and_run_by_the_daemon(svc):
    done = subprocess.run(
        [sys.executable, "-m", "flywheel.cli", "run", "--submit", "--week", WEEKS[0], "--job", "weekly_labels"],
        env=svc.env, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "queued weekly_labels for " + WEEKS[0] in done.stdout
    [record] = svc.instance.get_run_records()
    run = record.dagster_run
    assert run.status.value == "SUCCESS" and run.tags["dagster/partition"] == WEEKS[0] and run.job_name == "weekly_labels"
    kinds = [e.event_type_value for e in _run_records(svc.instance, run.run_id)]
    # through the queue: enqueued by the webserver, launched by the daemon (STARTING), then started
    assert kinds.index("PIPELINE_ENQUEUED") < kinds.index("PIPELINE_STARTING") < kinds.index("PIPELINE_START")
    done_assets = {e.event_specific_data.materialization.asset_key.to_user_string()
                   for e in _run_records(svc.instance, run.run_id) if e.event_type_value == "ASSET_MATERIALIZATION"}
    assert done_assets == set(LABEL_ASSETS)
    # the command printed what the run materialized, like an in-process run
    assert f"done relevance_labels [{WEEKS[0]}]" in done.stdout


@pytest.mark.slow
def test_dagster_killed_mid_run_run_failed_and_rerun_gives_identical_outputs(svc):
    import dagster as dg

    # the first week again: its inputs are as they were (no model trained or promoted yet)
    before = _outputs(svc.layout, WEEKS[0])
    materialized_before = {a: svc.instance.get_latest_materialization_event(dg.AssetKey(a)).run_id for a in LABEL_ASSETS}
    url = svc.stack.webserver_url()
    # in one process: freezing the run worker freezes all of the run's work (with a process per
    # step, the step processes would go on writing after the worker is frozen or killed). The
    # crashed run ingests the logs only, so it stops at a point a re-run must recover from.
    run_id = submit_partition(url, "weekly_labels", WEEKS[0], executor="in_process", assets=["raw_logs"])
    launcher = svc.instance.run_launcher
    deadline = time.monotonic() + 180
    # the worker's pid is known as soon as it is spawned, before it reports the run started: wait
    # for both, or the freeze below can catch it still STARTING
    while ((status := run_status(url, run_id)) != "STARTED"
           or (pid := launcher.worker_pid(svc.instance.get_run_by_id(run_id))) is None):
        assert time.monotonic() < deadline and status not in ("SUCCESS", "FAILURE"), "run never started"
        time.sleep(0.2)
    os.kill(pid, signal.SIGSTOP)  # frozen mid-run: it cannot finish before the crash below
    assert run_status(url, run_id) == "STARTED"
    assert launcher.check_run_worker_health(svc.instance.get_run_by_id(run_id)).status.value == "RUNNING"
    # a crash of the Dagster processes (OOM killer, kill -9): the daemon, the code server and the
    # run worker it started. (With the code server alive, the code server itself reports a dead worker.)
    killed = [svc.stack.kill("daemon", signal.SIGKILL), svc.stack.kill("code-server", signal.SIGKILL), pid]
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 30
    while any(procs.pid_alive(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(procs.pid_alive(p) for p in killed)
    assert run_status(url, run_id) == "STARTED"  # nobody is left to notice
    svc.stack.restart("code-server")
    for index in (0, 1):
        reload_location(svc.stack.webserver_url(index))
    svc.stack.restart("daemon")
    # the restarted daemon's run monitoring asks the launcher, which finds the worker gone
    assert wait_for_run(url, run_id, timeout_s=180) == "FAILURE"
    failure = [e.message for e in svc.instance.all_logs(run_id) if e.dagster_event and e.dagster_event.event_type_value == "PIPELINE_FAILURE"]
    assert any(f"the run worker (pid {pid}) is gone" in m for m in failure), failure
    # nothing completed is lost: the earlier run's materializations stay
    for asset in LABEL_ASSETS:
        event = svc.instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert event is not None and event.run_id in (materialized_before[asset], run_id)
    # the re-run goes through the restarted daemon and gives the same outputs
    rerun = submit_partition(url, "weekly_labels", WEEKS[0], executor="in_process")
    assert wait_for_run(url, rerun, timeout_s=RUN_TIMEOUT_S) == "SUCCESS", _failures(svc.instance, rerun)
    after = _outputs(svc.layout, WEEKS[0])
    for name in LABEL_ASSETS:
        assert after[name].equals(before[name]), name


@pytest.mark.slow
def test_schedule_tick_launches_the_week_that_just_ended(svc):
    import dagster as dg
    import mlflow
    from dagster._core.scheduler.instigation import (
        InstigatorState, InstigatorStatus, InstigatorType, ScheduleInstigatorData,
    )
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    ws = WorkspaceFileTarget([str(svc.stack.dagster_home / "workspace.yaml")])
    with WorkspaceProcessContext(svc.instance, ws) as ctx:
        location = ctx.create_request_context().get_code_location("flywheel")
        [schedule] = [s for s in next(iter(location.get_repositories().values())).get_schedules()
                      if s.job_name == "flywheel_weekly"]
    # started an hour before the latest tick: the daemon's scheduler owes that tick and fires it now
    svc.instance.add_instigator_state(InstigatorState(
        schedule.get_remote_origin(), InstigatorType.SCHEDULE, InstigatorStatus.RUNNING,
        ScheduleInstigatorData(schedule.cron_schedule, start_timestamp=TICK.timestamp() - 3600),
    ))
    deadline = time.monotonic() + 180
    while not (runs := [r for r in svc.instance.get_runs() if r.tags.get("dagster/schedule_name") == schedule.name]):
        assert time.monotonic() < deadline, "the daemon's scheduler launched no run"
        time.sleep(2)
    svc.instance.stop_schedule(schedule.get_remote_origin_id(), schedule.selector_id, schedule)
    [run] = runs
    assert run.tags["dagster/partition"] == WEEKS[1] and run.job_name == "flywheel_weekly"
    assert run.run_config["execution"] == {"config": {"in_process": {}}}  # FLYWHEEL_SERVICES_EXECUTOR's default
    status = wait_for_run(svc.stack.webserver_url(), run.run_id, timeout_s=RUN_TIMEOUT_S)
    events = _run_records(svc.instance, run.run_id)
    assert "PIPELINE_ENQUEUED" in [e.event_type_value for e in events]
    # the whole graph ran; with tiny training the gate may say no, which fails the run on purpose
    failed_steps = {e.step_key for e in events if e.event_type_value == "STEP_FAILURE"}
    assert status == "SUCCESS" or failed_steps == {GATE_STEP}, _failures(svc.instance, run.run_id)
    # the whole graph ran for that week, and the challenger is in the MLflow server's registry
    for asset in ("trained_model", "trained_reranker", "benchmark_report"):
        assert svc.instance.get_latest_materialization_event(dg.AssetKey(asset)).dagster_event.partition == WEEKS[1]
    client = mlflow.MlflowClient(tracking_uri=svc.stack.mlflow_url)
    runs = client.search_runs([client.get_experiment_by_name("flywheel").experiment_id])
    challenger = client.get_model_version_by_alias("flywheel-embedder", "challenger")
    assert challenger.run_id in {r.info.run_id for r in runs}
    assert WEEKS[1] in {r.data.tags.get("partition") for r in runs}
    # the OpenVINO networks the week ran on are kept in the home for the next run's processes
    assert list(svc.layout.openvino_cache.glob("openvino-*/model.xml"))


def _runs_seen_by(url: str) -> list[tuple[str, str]]:
    data = graphql(url, "{ runsOrError { ... on Runs { results { runId status } } } }")
    return sorted((r["runId"], r["status"]) for r in data["runsOrError"]["results"])


@pytest.mark.slow
def test_two_webservers_show_the_same_runs_and_kill_9_loses_nothing(svc):
    first, second = svc.stack.webserver_url(0), svc.stack.webserver_url(1)
    seen = _runs_seen_by(first)
    assert len(seen) == len(svc.instance.get_runs()) == 4 and seen == _runs_seen_by(second)
    mlflow_before = _mlflow_snapshot(svc.stack)
    assert mlflow_before[0] and mlflow_before[1]  # the whole-graph run logged runs and set aliases
    old_pids = [svc.stack.kill("webserver-2", signal.SIGKILL), svc.stack.kill("daemon", signal.SIGKILL)]
    deadline = time.monotonic() + 30
    while any(procs.pid_alive(p) for p in old_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(procs.pid_alive(p) for p in old_pids)
    assert _runs_seen_by(first) == seen  # the other user's UI did not notice
    svc.stack.restart("webserver-2")
    svc.stack.restart("daemon")
    assert _runs_seen_by(second) == seen
    assert _mlflow_snapshot(svc.stack) == mlflow_before  # no MLflow run, no registry alias lost


def _mlflow_snapshot(stack: ServiceStack) -> tuple[set, dict]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.mlflow_url)
    runs = {r.info.run_id for r in client.search_runs([client.get_experiment_by_name("flywheel").experiment_id])}
    aliases = {m.name: dict(m.aliases) for m in client.search_registered_models()}
    return runs, aliases


@pytest.mark.slow
def test_sigterm_stops_every_service(svc):
    running, _ = procs.read_state(svc.stack.state_file)
    assert set(running) == {"code-server", "mlflow", "daemon", "webserver", "webserver-2"}
    pg_pid = svc.stack.postgres.pid()
    assert pg_pid and procs.pid_alive(pg_pid)
    os.kill(svc.proc.pid, signal.SIGTERM)
    assert svc.proc.wait(timeout=120) == 0, svc.log.read_text(errors="replace")[-3000:]
    for name, proc in running.items():
        assert procs.group_members(proc.pid) == [], f"{name} left processes behind"
    assert not procs.pid_alive(pg_pid) and not svc.stack.postgres.running()
    assert not svc.stack.state_file.exists()


def test_the_schedule_runs_the_week_that_just_ended_with_the_services_executor(monkeypatch):
    """Each Monday tick asks for the week that ended (none before the first), executed as
    FLYWHEEL_SERVICES_EXECUTOR says, like a --submit run; a run that names no executor (one
    launched from the UI) executes that way too, and either way can still be asked for."""
    import dagster as dg

    from flywheel.config import load_config
    from flywheel.defs import build_definitions, schedules

    repo = build_definitions().get_repository_def()
    schedule = repo.get_schedule_def("flywheel_weekly_schedule")
    assert (schedule.cron_schedule, schedule.execution_timezone, schedule.job_name) == ("0 2 * * 1", "UTC", "flywheel_weekly")
    first = schedules.weekly_partitions.get_first_partition_key()
    tick = datetime.fromisoformat(first).replace(tzinfo=timezone.utc) + timedelta(days=14, hours=2)

    def evaluate(at):
        return schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=at, repository_def=repo))

    for executor in ("in_process", "multiprocess"):
        monkeypatch.setattr(schedules, "CONFIG", load_config({"FLYWHEEL_SERVICES_EXECUTOR": executor}))
        [request] = evaluate(tick).run_requests
        week = (datetime.fromisoformat(first) + timedelta(days=7)).date().isoformat()
        assert (request.partition_key, request.run_key) == (week, week)
        assert request.run_config == {"execution": {"config": {executor: {}}}}
    before = evaluate(tick - timedelta(days=14))
    assert not before.run_requests and "no complete week yet" in before.skip_message

    def executes(job, run_config) -> list[str]:
        return list(dg.validate_run_config(job, run_config)["execution"]["multi_or_in_process_executor"])

    assert executes(repo.get_job("flywheel_weekly"), {}) == ["in_process"]  # the setting's default
    for default in ("in_process", "multiprocess"):
        job = repo.get_job("flywheel_weekly").with_executor_def(schedules.run_executor(default))
        assert executes(job, {}) == [default]
        for asked in ("in_process", "multiprocess"):
            assert executes(job, {"execution": {"config": {asked: {}}}}) == [asked]


def test_submit_refuses_settings_the_services_do_not_run_with():
    from flywheel.services.commands import override_mismatch
    from flywheel.services.submit import settings_mismatch

    recorded = {"FLYWHEEL_HOME": "/a", "FLYWHEEL_RERANKER_MAX_STEPS": "20", "FLYWHEEL_SEED": "0"}
    assert settings_mismatch(recorded, {"FLYWHEEL_HOME": "/b", "FLYWHEEL_RERANKER_MAX_STEPS": "20", "FLYWHEEL_SEED": "0"},
                             ignore=("FLYWHEEL_HOME",)) == []
    [line] = settings_mismatch(recorded, {"FLYWHEEL_RERANKER_MAX_STEPS": "20", "FLYWHEEL_SEED": "1"}, ignore=("FLYWHEEL_HOME",))
    assert line.startswith("FLYWHEEL_SEED: services '0', here '1'")
    # backfill's light settings are overrides, not environment: they must match too
    assert override_mismatch(recorded, {"reranker": {"max_steps": 20}}) == []
    [line] = override_mismatch(recorded, {"reranker": {"max_steps": 20, "depth": 20}})
    assert line.startswith("FLYWHEEL_RERANK_DEPTH: services '(unset)'")


def test_services_up_refuses_a_taken_or_shared_port_before_starting_anything(tmp_path):
    """A port another process holds (the second webserver's, the Dagster port + 1) or two services
    on one port: `up` names the service and the setting, and starts nothing, PostgreSQL included."""
    import socket

    web = free_port(consecutive=2)
    env = {"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_SERVICES_DAGSTER_PORT": str(web),
           "FLYWHEEL_SERVICES_POSTGRES_PORT": str(free_port()), "FLYWHEEL_SERVICES_CODE_SERVER_PORT": str(free_port()),
           "FLYWHEEL_SERVICES_MLFLOW_PORT": str(free_port())}
    stack = _stack(env)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", web + 1))
        holder.listen()
        with pytest.raises(RuntimeError, match=rf"webserver-2: port {web + 1} .* in use .*FLYWHEEL_SERVICES_DAGSTER_PORT \+ 1"):
            stack.up(webservers=2)
    assert not stack.postgres.data_dir.exists() and not stack.postgres.running()
    clash = _stack({**env, "FLYWHEEL_SERVICES_MLFLOW_PORT": str(web + 1)})
    with pytest.raises(RuntimeError, match=rf"webserver-2 and mlflow would both listen on port {web + 1}"):
        clash.up(webservers=2)
    assert procs.read_state(stack.state_file)[0] == {}


def test_services_start_with_sigterm_restored_even_when_the_parent_ignores_it(tmp_path):
    """What made `flywheel ui` unstoppable: a child inherits an ignored SIGTERM. procs.spawn resets it."""
    from flywheel.services.launcher import _started_at

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # like a shell that started us in the background
    try:
        ours = procs.spawn("sleeper", ["sleep", "60"], env=dict(os.environ), log_path=tmp_path / "sleep.log")
        plain = subprocess.Popen(["sleep", "60"], start_new_session=True)  # inherits the ignored SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    started = _started_at(ours.pid)
    assert started is not None and started <= time.time() + 2
    assert procs.stop_group(ours.pid, grace_s=10) == "stopped"  # SIGTERM was enough
    assert procs.stop_group(plain.pid, grace_s=1) == "killed"  # SIGTERM ignored: only SIGKILL stopped it
    plain.wait(timeout=5)
    assert not procs.pid_alive(ours.pid) and _started_at(ours.pid) is None
