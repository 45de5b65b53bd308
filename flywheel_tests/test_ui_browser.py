"""The UIs as a person uses them: the real Dagster UI and MLflow UI in headless Chromium.

A small configuration (a real slice of SciFact, tiny training budgets) is simulated for two weeks;
the first week is labelled from the command line (`flywheel run --job weekly_labels`), then
`flywheel ui` serves the instance and the browser:

* opens the global asset lineage, expands every group and finds every asset, then every check on
  each asset's Checks tab (names come from ``flywheel.definitions.defs``, never from this file);
* clicks "Materialize all", picks the second week in the partition dialog and launches one run,
  which must succeed (watched through Dagster's GraphQL API, the same one the UI reads);
* opens the report asset's page and its Markdown metadata, which must show the report;
* then `flywheel mlflow-ui` on the same home shows the run and the registered model's versions
  with the ``challenger`` alias.

Screenshots go to ``$FLYWHEEL_SCREENSHOTS`` (default ``.flywheel/screenshots/``) for review.
Chromium is Debian's (packages ``chromium`` and ``chromium-driver``; `.ci/run` installs them),
driven by Playwright's Python package; the test is skipped where either is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from flywheel.testing import ui

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(1500)]

CHROMIUM = ui.chromium_executable()
if CHROMIUM is None:
    pytest.skip(
        "browser UI test skipped: no Chromium at /usr/bin/chromium (install Debian's packages: "
        "apt-get install -y chromium chromium-driver; .ci/run does this in CI)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="browser UI test skipped: the Playwright Python package is missing (pip install -e '.[dev]')",
)

REPO = Path(__file__).resolve().parents[1]
REPORT_ASSET = "benchmark_report"  # the asset whose metadata carries the Markdown report
EMBEDDER_MODEL = "flywheel-embedder"
CHALLENGER_ALIAS = "challenger"
# Bounded waits (seconds). A week's run trains two models and benchmarks them: minutes on 2 busy
# cores. Override with FLYWHEEL_UI_RUN_TIMEOUT_S on slower machines.
SERVER_START_S = 180
RUN_TIMEOUT_S = float(os.environ.get("FLYWHEEL_UI_RUN_TIMEOUT_S", "1200"))
UI_TIMEOUT_MS = 30_000
VIEWPORT = {"width": 1680, "height": 1000}


def _weeks() -> list[str]:
    """Two complete weeks before the current one: partitions exist whatever today's date is."""
    monday = date.today() - timedelta(days=date.today().weekday())
    return [(monday - timedelta(days=14)).isoformat(), (monday - timedelta(days=7)).isoformat()]


WEEKS = _weeks()


def _shot(page, name: str) -> Path:
    path = ui.screenshots_dir(REPO / ".flywheel" / "screenshots") / name
    page.screenshot(path=str(path))
    return path


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flywheel_env(tmp_path_factory, base_model_path) -> SimpleNamespace:
    """A temp FLYWHEEL_HOME with two simulated weeks, the first one labelled from the CLI."""
    from conftest import make_small_beir

    root = tmp_path_factory.mktemp("ui")
    dataset = make_small_beir(root / "scifact-small", train_queries=40, test_queries=8, extra_docs=80)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "DAGSTER_"))}
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
        "PYTHONUNBUFFERED": "1",
        "FLYWHEEL_HOME": str(root / "home"),
        "FLYWHEEL_DATASET": str(dataset),
        "FLYWHEEL_BASE_MODEL": base_model_path,
        "FLYWHEEL_START_DATE": WEEKS[0],
        # a tiny configuration: every stage runs for real, in seconds rather than minutes
        "FLYWHEEL_EVAL_QUERIES": "3", "FLYWHEEL_FIRST_WEEK_EVAL_QUERIES": "0", "FLYWHEEL_FEWSHOT_EXAMPLES": "30", "FLYWHEEL_FINETUNE_EXAMPLES": "60",
        "FLYWHEEL_MIN_EVAL_QUERIES": "3", "FLYWHEEL_MIN_FEWSHOT_EXAMPLES": "10", "FLYWHEEL_MIN_FINETUNE_EXAMPLES": "20",
        "FLYWHEEL_TRAIN_MAX_STEPS": "3", "FLYWHEEL_TRAIN_BATCH_SIZE": "8", "FLYWHEEL_TRAIN_MAX_SEQ_LENGTH": "64",
        "FLYWHEEL_ENCODE_MAX_SEQ_LENGTH": "128", "FLYWHEEL_MINE_NEGATIVES": "0",
        "FLYWHEEL_RERANKER_MAX_STEPS": "2", "FLYWHEEL_RERANKER_MAX_LENGTH": "64", "FLYWHEEL_RERANK_DEPTH": "10",
        # 3 training steps and 6 eval queries say nothing about quality: the UI run checks the wiring, so its
        # gate allows a tie (the rule is tested on constructed results in test_promotion.py)
        "FLYWHEEL_MIN_IMPROVEMENT": "-0.2", "FLYWHEEL_REGRESSION_MARGIN": "0.2",
    })
    with mock.patch.dict(os.environ, env, clear=True):
        from flywheel.config import load_config
        from flywheel.layout import Layout
        from flywheel.lib.simulate.traffic import SimulationConfig, simulate

        config = load_config()
        settings = Layout.of(config.paths)
        summary = simulate(SimulationConfig(
            dataset_dir=config.paths.dataset, log_dir=settings.log_dir, lancedb_uri=settings.lancedb_dir,
            model_path=base_model_path, start=date.fromisoformat(WEEKS[0]), weeks=2, seed=0, max_queries=40,
            encode_max_seq_length=config.training.encode_max_seq_length,
        ))
    assert summary.weeks == WEEKS, summary
    labels = subprocess.run(
        [sys.executable, "-m", "flywheel.cli", "run", "--week", WEEKS[0], "--job", "weekly_labels"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert labels.returncode == 0, labels.stdout[-3000:] + labels.stderr[-3000:]
    return SimpleNamespace(
        env=env, root=root, mlflow_uri=config.paths.mlflow_uri, reports_dir=settings.reports_dir,
    )


@pytest.fixture(scope="module")
def dagster_ui(flywheel_env):
    port = ui.free_port()
    server = ui.start_server(
        "dagster dev", [sys.executable, "-m", "flywheel.cli", "ui", "--port", str(port)],
        url=f"http://127.0.0.1:{port}", env=flywheel_env.env, cwd=REPO,
        log_path=flywheel_env.root / "dagster-ui.log",
    )
    try:
        ui.wait_http(server, "/server_info", timeout_s=SERVER_START_S)
        _wait_code_location_loaded(server)
        yield server
    finally:
        ui.stop_server(server)


def _wait_code_location_loaded(server: ui.Server) -> None:
    query = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
        locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        entries = ui.graphql(server.url, query)["workspaceOrError"]["locationEntries"]
        if entries and all(e["loadStatus"] == "LOADED" for e in entries):
            errors = [e["locationOrLoadError"] for e in entries if e["locationOrLoadError"]["__typename"] != "RepositoryLocation"]
            assert not errors, f"code location failed to load: {errors}"
            return
        time.sleep(1)
    raise TimeoutError(f"code location not loaded after {SERVER_START_S}s:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ui.CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    # Dagster shows a one-time "Join the Dagster community" dialog over the first page it serves;
    # its own flag in localStorage marks it as seen (the same as clicking "Skip").
    context.add_init_script("window.localStorage.setItem('communityNux', '\"1\"')")
    pg = context.new_page()
    pg.set_default_timeout(UI_TIMEOUT_MS)
    pg.set_default_navigation_timeout(60_000)
    yield pg
    context.close()


@pytest.fixture(scope="module")
def graph():
    """Asset and check names as the definitions declare them (never hard-coded here)."""
    from flywheel.definitions import defs

    asset_graph = defs.resolve_asset_graph()
    assets = sorted(k.to_user_string() for k in asset_graph.get_all_asset_keys())
    checks: dict[str, list[str]] = {}
    for ck in asset_graph.asset_check_keys:
        checks.setdefault(ck.asset_key.to_user_string(), []).append(ck.name)
    assert REPORT_ASSET in assets, assets
    return {"assets": assets, "checks": {a: sorted(c) for a, c in sorted(checks.items())}}


# -- Dagster UI -----------------------------------------------------------------------------------

def test_asset_graph_shows_every_asset_and_check(dagster_ui, page, graph):
    page.goto(f"{dagster_ui.url}/asset-groups")  # "Lineage" in the left navigation
    # button names include their icon's aria-label, so match the words, not the whole name
    materialize_all = page.get_by_role("button", name=re.compile(r"Materialize all"))
    materialize_all.wait_for()
    # Groups start collapsed. The graph's context menu (right click on the empty canvas) has
    # "Expand all groups", a menuitem by its text; the canvas' empty bottom strip is below the
    # "Materialize all" toolbar and left of the zoom controls.
    box = materialize_all.bounding_box()
    page.mouse.click(box["x"] - 300, VIEWPORT["height"] - 40, button="right")
    page.get_by_role("menuitem", name="Expand all groups").click()
    missing = []
    for asset in graph["assets"]:
        node = page.get_by_text(asset, exact=True).first  # node label: the asset key, exactly
        try:
            node.wait_for(state="visible", timeout=10_000)
        except sync_api.TimeoutError:
            missing.append(asset)
    page.wait_for_timeout(1000)  # let the graph settle after the layout change
    _shot(page, "dagster-asset-graph.png")
    assert not missing, f"assets not in the UI's lineage graph: {missing}"

    # Checks: each asset's "Checks" tab lists its checks by name.
    missing_checks = []
    for asset, names in graph["checks"].items():
        page.goto(f"{dagster_ui.url}/assets/{asset}?view=checks")
        page.get_by_text(re.compile(r"Checks \(\d+\)")).first.wait_for()  # the tab's list header
        for name in names:
            try:
                page.get_by_text(name, exact=True).first.wait_for(state="visible", timeout=10_000)
            except sync_api.TimeoutError:
                missing_checks.append(f"{asset}:{name}")
        _shot(page, f"dagster-checks-{asset.replace('/', '_')}.png")
    assert not missing_checks, f"checks not shown on their asset's Checks tab: {missing_checks}"


RUN_QUERY = """query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"""
RESULTS_QUERY = """query($id: ID!) { runOrError(runId: $id) { ... on Run {
    assetMaterializations { assetKey { path } partition }
    eventConnection { events { __typename ... on EngineEvent { message } ... on AssetCheckEvaluationEvent { evaluation {
        assetKey { path } checkName success partition } } } } } } }"""
FAILURE_QUERY = """query($id: ID!) { runOrError(runId: $id) { ... on Run { eventConnection { events {
    __typename ... on MessageEvent { message stepKey }
    ... on ExecutionStepFailureEvent { error { message } }
    ... on EngineEvent { error { message } } } } } } }"""
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


@pytest.fixture(scope="module")
def ui_run(dagster_ui, page, graph):
    """Materialize every asset for the second week from the UI; wait until the run ends."""
    week = WEEKS[1]
    page.goto(f"{dagster_ui.url}/asset-groups")
    page.get_by_role("button", name=re.compile(r"Materialize all")).click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(f"Launch runs to materialize {len(graph['assets'])} assets").wait_for()
    # The partition dialog's text box takes a partition key (or a range); its placeholder names it.
    partitions = dialog.get_by_placeholder(re.compile("partition", re.I))
    partitions.fill(week)
    partitions.press("Enter")
    dialog.get_by_text("1 partition", exact=True).wait_for()
    _shot(page, "dagster-launch-dialog.png")
    dialog.get_by_role("button", name="Launch 1 run").click()
    # A toast says "Launched run <id>" with a "View" link to /runs/<full id>.
    view = page.locator('a[href*="/runs/"]').filter(has_text=re.compile(r"^View$")).first
    view.wait_for()
    run_id = view.get_attribute("href").rstrip("/").split("/")[-1]
    page.goto(f"{dagster_ui.url}/runs/{run_id}")
    page.get_by_text(run_id.split("-")[0]).first.wait_for()
    _shot(page, "dagster-run-started.png")
    # Leave the run page while training runs: its live updates would compete for 2 cores.
    page.goto("about:blank")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        status = ui.graphql(dagster_ui.url, RUN_QUERY, {"id": run_id})["runOrError"]["status"]
        if status in TERMINAL or not dagster_ui.alive():
            break
        time.sleep(5)
    page.goto(f"{dagster_ui.url}/runs/{run_id}")
    page.get_by_text(run_id.split("-")[0]).first.wait_for()
    if status == "SUCCESS":
        # the run header's status tag; the step list has rendered by then
        page.get_by_text("Success", exact=True).first.wait_for()
    page.wait_for_timeout(1500)
    _shot(page, "dagster-run-success.png" if status == "SUCCESS" else "dagster-run-failure.png")
    detail = ""
    if status != "SUCCESS":  # the failures, for the assertion message
        events = ui.graphql(dagster_ui.url, FAILURE_QUERY, {"id": run_id})["runOrError"]["eventConnection"]["events"]
        detail = "\n".join(
            f"{e.get('stepKey') or ''} {e.get('message') or ''} {(e.get('error') or {}).get('message', '')}".strip()
            for e in events
            if e["__typename"] in ("ExecutionStepFailureEvent", "RunFailureEvent") or (e.get("error") or {}).get("message")
        )
    return {"id": run_id, "week": week, "status": status, "detail": detail}


def test_materialize_one_week_from_the_ui_succeeds(ui_run, dagster_ui, graph):
    assert ui_run["status"] == "SUCCESS", (
        f"run {ui_run['id']} for {ui_run['week']} ended {ui_run['status']} "
        f"(waited up to {RUN_TIMEOUT_S:.0f}s):\n{ui_run['detail']}\n{dagster_ui.log_tail(2000)}"
    )
    run = ui.graphql(dagster_ui.url, RESULTS_QUERY, {"id": ui_run["id"]})["runOrError"]
    done = {"/".join(m["assetKey"]["path"]) for m in run["assetMaterializations"] if m["partition"] == ui_run["week"]}
    assert done == set(graph["assets"]), f"materialized by the UI run: {sorted(done)}; declared: {graph['assets']}"
    evaluations = {
        ("/".join(e["evaluation"]["assetKey"]["path"]), e["evaluation"]["checkName"]): e["evaluation"]["success"]
        for e in run["eventConnection"]["events"] if e["__typename"] == "AssetCheckEvaluationEvent"
    }
    declared = {(a, c) for a, names in graph["checks"].items() for c in names}
    assert set(evaluations) == declared, f"checks evaluated: {sorted(evaluations)}; declared: {sorted(declared)}"
    assert all(evaluations.values()), {k: v for k, v in evaluations.items() if not v}
    # a run launched from the UI executes as FLYWHEEL_SERVICES_EXECUTOR (default in_process) says
    engine = [e["message"] for e in run["eventConnection"]["events"] if e["__typename"] == "EngineEvent"]
    assert any(m.startswith("Executing steps in process") for m in engine), engine


def test_report_metadata_shows_the_report(ui_run, dagster_ui, page, flywheel_env):
    if ui_run["status"] != "SUCCESS":
        pytest.fail(f"the UI run did not succeed ({ui_run['status']}); no report to show")
    page.goto(f"{dagster_ui.url}/assets/{REPORT_ASSET}?partition={ui_run['week']}")
    # Overview tab: "Latest materialization" names the partition; the metadata table lists each
    # key with its value, Markdown values behind a "[Show Markdown]" link that opens a dialog.
    page.get_by_text(ui_run["week"], exact=True).first.wait_for()
    page.get_by_text("[Show Markdown]").first.click()
    dialog = page.get_by_role("dialog")
    report = (flywheel_env.reports_dir / f"benchmark-{ui_run['week']}.md").read_text()
    title = report.splitlines()[0].lstrip("# ").strip()
    dialog.get_by_role("heading", name=title).wait_for()
    # every section heading of the report file is rendered in the UI
    for heading in [line.lstrip("# ").strip() for line in report.splitlines()[1:] if line.startswith("## ")]:
        dialog.get_by_role("heading", name=heading).first.wait_for()
    page.wait_for_timeout(500)
    _shot(page, "dagster-report-metadata.png")
    assert ui_run["week"] in dialog.inner_text()
    # the plots are embedded PNGs: each one the report holds is drawn (decoded, non-zero width)
    images = dialog.locator("img[src^='data:image/png']")
    assert images.count() == report.count("](data:image/png;base64,") > 0
    images.first.scroll_into_view_if_needed()
    widths = images.evaluate_all("els => els.map(e => e.complete ? e.naturalWidth : 0)")
    assert all(w > 100 for w in widths), widths
    _shot(page, "dagster-report-plot.png")


# -- MLflow UI ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_ui(flywheel_env, ui_run):
    port = ui.free_port()
    server = ui.start_server(
        "mlflow ui", [sys.executable, "-m", "flywheel.cli", "mlflow-ui", "--port", str(port)],
        url=f"http://127.0.0.1:{port}", env=flywheel_env.env, cwd=REPO,
        log_path=flywheel_env.root / "mlflow-ui.log",
    )
    try:
        ui.wait_http(server, "/health", timeout_s=SERVER_START_S)
        yield server
    finally:
        ui.stop_server(server)


def _close_mlflow_assistant(page) -> None:
    # MLflow 3 opens its "MLflow Assistant" side panel on first load; its close button carries
    # data-component-id="mlflow.assistant.chat_panel.close" (aria-label "Close").
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    try:
        close.first.click(timeout=3000)
    except sync_api.TimeoutError:
        pass


def test_mlflow_ui_shows_the_run_and_model_versions_with_aliases(ui_run, mlflow_ui, page, flywheel_env):
    if ui_run["status"] != "SUCCESS":
        pytest.fail(f"the UI run did not succeed ({ui_run['status']}); nothing tracked to show")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=flywheel_env.mlflow_uri)
    version = client.get_model_version_by_alias(EMBEDDER_MODEL, CHALLENGER_ALIAS)
    run = client.get_run(version.run_id)
    exp_id = run.info.experiment_id
    experiment = client.get_experiment(exp_id)

    # The experiment's training runs: the run is listed by name.
    page.goto(f"{mlflow_ui.url}/#/experiments/{exp_id}/runs")
    _close_mlflow_assistant(page)
    page.get_by_role("link", name=run.info.run_name).first.wait_for()
    page.get_by_text(experiment.name, exact=True).first.wait_for()
    _shot(page, "mlflow-runs.png")

    # The run's own page: its name, metrics logged by training and the benchmark.
    page.get_by_role("link", name=run.info.run_name).first.click()
    page.wait_for_url(re.compile(rf"/runs/{run.info.run_id}"))
    page.get_by_text(re.compile(r"^Metrics \(\d+\)")).first.wait_for()
    metric = sorted(run.data.metrics)[0]
    page.get_by_text(metric, exact=True).first.wait_for()
    _shot(page, "mlflow-run.png")

    # The registered model: every version, with the challenger alias on the right one.
    page.goto(f"{mlflow_ui.url}/#/models/{EMBEDDER_MODEL}")
    _close_mlflow_assistant(page)
    page.get_by_role("heading", name=EMBEDDER_MODEL).first.wait_for()
    versions = client.search_model_versions(f"name='{EMBEDDER_MODEL}'")
    for v in versions:
        page.get_by_role("link", name=f"Version {v.version}", exact=True).first.wait_for()
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version.version}", exact=True))
    row.get_by_text(re.compile(rf"\b{CHALLENGER_ALIAS}\b")).first.wait_for()
    model = client.get_registered_model(EMBEDDER_MODEL)
    for alias in model.aliases:  # every alias (challenger, and champion once promoted) is shown
        page.get_by_text(re.compile(rf"\b{re.escape(alias)}\b")).first.wait_for()
    _shot(page, "mlflow-model-versions.png")
