"""Service mode against the embedded default, on a small slice: time, figures, pools, crashes.

A small real slice of SciFact (80 train queries, 8 test queries, ~200 abstracts) with tiny
training settings (3 embedder steps, 2 reranker steps): every stage of the whole graph runs, in
minutes rather than an hour. Four weeks are simulated, the same way, in two homes:

1. embedded: `flywheel run` in-process (SQLite) -- weekly_labels for weeks 1-3, then the whole
   graph for week 4, timed (median of --repeats runs);
2. service: `flywheel services up` (PostgreSQL, code server, daemon, webserver, MLflow server), the
   same runs with `--submit` through the run queue, week 4 timed (median of --repeats runs); its figures (the benchmark
   report's per-query NDCG@10 and the gate's decision) compared with the embedded run's;
3. four partitions (weeks 1-4, the whole graph) submitted at once: the queue runs two at a time
   and the pool `training` lets one training step run at a time, both measured from the run
   records (step start/end events in PostgreSQL). While they run, the daemon and the webserver
   are killed with SIGKILL and restarted; completed runs, MLflow runs and registry aliases
   recorded before the kill are looked up again after.

Usage: python benchmarks/services.py [--keep]   (needs PostgreSQL's server binaries)
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "flywheel_tests"))

START = "2026-09-28"
WEEKS = ["2026-09-28", "2026-10-05", "2026-10-12", "2026-10-19"]
TRAINING_STEPS = ("trained_model", "trained_reranker")  # the steps in the pool "training"
TINY = {
    "FLYWHEEL_START_DATE": START,
    "FLYWHEEL_EVAL_QUERIES": "3", "FLYWHEEL_FIRST_WEEK_EVAL_QUERIES": "0", "FLYWHEEL_FEWSHOT_EXAMPLES": "30", "FLYWHEEL_FINETUNE_EXAMPLES": "60",
    "FLYWHEEL_MIN_EVAL_QUERIES": "3", "FLYWHEEL_MIN_FEWSHOT_EXAMPLES": "10", "FLYWHEEL_MIN_FINETUNE_EXAMPLES": "20",
    "FLYWHEEL_TRAIN_MAX_STEPS": "3", "FLYWHEEL_TRAIN_BATCH_SIZE": "8", "FLYWHEEL_TRAIN_MAX_SEQ_LENGTH": "64",
    "FLYWHEEL_ENCODE_MAX_SEQ_LENGTH": "128", "FLYWHEEL_MINE_NEGATIVES": "0",
    "FLYWHEEL_RERANKER_MAX_STEPS": "2", "FLYWHEEL_RERANKER_MAX_LENGTH": "64", "FLYWHEEL_RERANK_DEPTH": "10",
    # ~20 searches a week: the judge-agreement gate's kappa on so few pairs is noise, not a verdict
    "FLYWHEEL_JUDGE_MIN_KAPPA": "0",
}


def say(msg: str) -> None:
    print(f"[services-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def flywheel(env: dict, *args: str, timeout: float = 3600, ok: tuple[int, ...] = (0,)) -> tuple[float, subprocess.CompletedProcess]:
    """Run a flywheel command; ``ok`` lists the exit codes that are answers (1: the gate said no)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flywheel.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode not in ok:
        raise SystemExit(f"flywheel {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.monotonic() - started, done


def home_env(root: Path, name: str, dataset: Path, ports: dict[str, int]) -> dict:
    from flywheel.config import default_base_model

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "DAGSTER_", "MLFLOW_"))}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
                "FLYWHEEL_HOME": str(root / name), "FLYWHEEL_DATASET": str(dataset),
                "FLYWHEEL_BASE_MODEL": default_base_model(), **TINY})
    env.update({f"FLYWHEEL_SERVICES_{k.upper()}_PORT": str(v) for k, v in ports.items()})
    return env


def figures(home: Path, week: str) -> dict:
    """What a week's run decided and measured: the gate's decision and per-query NDCG@10."""
    import pandas as pd

    from flywheel.layout import Layout

    layout = Layout(home=home, log_dir=home / "logs")
    decision = json.loads(layout.decision(week).read_text())
    pq = pd.read_parquet(layout.per_query(week))
    ndcg = pq.groupby(["suite", "model"])["ndcg@10"].mean().round(6).to_dict()
    return {"promote": decision.get("promote"), "ndcg10": {f"{s}/{m}": v for (s, m), v in ndcg.items()}}


def timed_week(env: dict, repeats: int, label: str, *extra: str) -> tuple[float, dict]:
    """Week 4's whole graph ``repeats`` times (each re-run replaces the week): the median wall time,
    and the figures of the first run (later runs start from the champion the first one may have promoted)."""
    times, first = [], None
    for i in range(repeats):
        seconds, _ = flywheel(env, "run", *extra, "--week", WEEKS[-1], ok=(0, 1))
        times.append(seconds)
        first = first or figures(Path(env["FLYWHEEL_HOME"]), WEEKS[-1])
        say(f"{label} week 4, run {i + 1}/{repeats}: {seconds:.1f}s")
    return statistics.median(times), first


def overlap_max(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1]))
    best = cur = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


def step_windows(instance, run_ids: list[str]) -> tuple[list, list]:
    """(training step windows, run windows) from the run records in the instance."""
    training, runs = [], []
    for run_id in run_ids:
        opened: dict[str, float] = {}
        run_start = run_end = None
        for entry in instance.all_logs(run_id):
            ev = entry.dagster_event
            if ev is None:
                continue
            kind = ev.event_type_value
            if kind == "PIPELINE_START":
                run_start = entry.timestamp
            elif kind in ("PIPELINE_SUCCESS", "PIPELINE_FAILURE", "PIPELINE_CANCELED"):
                run_end = entry.timestamp
            elif ev.step_key in TRAINING_STEPS and kind == "STEP_START":
                opened[ev.step_key] = entry.timestamp
            elif ev.step_key in TRAINING_STEPS and kind in ("STEP_SUCCESS", "STEP_FAILURE") and ev.step_key in opened:
                training.append((opened.pop(ev.step_key), entry.timestamp))
        if run_start is not None and run_end is not None:
            runs.append((run_start, run_end))
    return training, runs


def mlflow_state(url: str) -> tuple[set, set]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("flywheel")
    runs = {r.info.run_id for r in client.search_runs([exp.experiment_id])} if exp else set()
    aliases = {(m.name, a) for m in client.search_registered_models() for a in m.aliases}
    return runs, aliases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (homes, logs)")
    parser.add_argument("--repeats", type=int, default=3, help="times week 4 is run in each home (the median is reported)")
    args = parser.parse_args()
    from conftest import make_small_beir

    from flywheel.services.postgres import find_bindir
    from flywheel.testing.ui import free_port

    find_bindir()  # a clear error when PostgreSQL is missing
    root = Path(tempfile.mkdtemp(prefix="flywheel-services-bench-"))
    root.chmod(0o711)  # PostgreSQL runs as an unprivileged user when we are root
    say(f"small slice: 80 train / 8 test SciFact queries over 4 weeks, tiny training settings; work in {root}")
    dataset = make_small_beir(root / "scifact-small", train_queries=80, test_queries=8, extra_docs=80)
    web = free_port()
    ports = {"postgres": free_port(), "code_server": free_port(), "mlflow": free_port(), "dagster": web}
    embedded, service = home_env(root, "embedded", dataset, ports), home_env(root, "service", dataset, ports)
    sim = ["simulate", "--weeks", str(len(WEEKS)), "--start", START, "--max-queries", "80"]
    stack = None
    try:
        for env in (embedded, service):
            flywheel(env, *sim)
        say("embedded: weekly_labels for weeks 1-3, then the whole graph for week 4, in-process")
        for week in WEEKS[:-1]:
            flywheel(embedded, "run", "--week", week, "--job", "weekly_labels")
        embedded_s, fig_e = timed_week(embedded, args.repeats, "embedded")

        from flywheel.config import load_config
        from flywheel.services.stack import ServiceStack

        stack = ServiceStack.from_config(load_config(service), say=say)
        t0 = time.monotonic()
        flywheel(service, "services", "up")
        say(f"services up in {time.monotonic() - t0:.1f}s")
        for week in WEEKS[:-1]:
            flywheel(service, "run", "--submit", "--week", week, "--job", "weekly_labels")
        service_s, fig_s = timed_week(service, args.repeats, "service (queued, run by the daemon)", "--submit")
        say(f"week 4, median of {args.repeats}: embedded {embedded_s:.1f}s, service {service_s:.1f}s "
            f"({(service_s / embedded_s - 1) * 100:+.1f}%)")
        diffs = [abs(fig_e["ndcg10"][k] - fig_s["ndcg10"].get(k, float("nan"))) for k in fig_e["ndcg10"]]
        max_diff = max(diffs) if diffs else float("nan")
        same = fig_e["promote"] == fig_s["promote"] and fig_e["ndcg10"].keys() == fig_s["ndcg10"].keys() and max_diff <= 1e-3
        say(f"figures: embedded {fig_e}")
        say(f"figures: service  {fig_s}")
        say(f"same figures: {same} (largest per-suite NDCG@10 difference {max_diff:.2e})")

        # -- four partitions at once; kill -9 the daemon and the webserver while they run -------------
        from flywheel.services.submit import submit_partition, wait_for_run

        os.environ.update({k: v for k, v in stack.env().items() if k.startswith("DAGSTER_")})
        import dagster as dg

        instance = dg.DagsterInstance.get()
        url = stack.webserver_url()
        t0 = time.monotonic()
        run_ids = [submit_partition(url, "flywheel_weekly", week) for week in WEEKS]
        say(f"queued 4 partitions: {', '.join(r[:8] for r in run_ids)}")
        while not any(instance.get_run_by_id(r).is_finished for r in run_ids):
            time.sleep(2)
        finished_before = {r for r in run_ids if instance.get_run_by_id(r).is_finished}
        mlflow_before = mlflow_state(stack.mlflow_url)
        assets_before = {k.to_user_string() for k in instance.get_asset_keys()}
        say(f"{len(finished_before)} run(s) done; SIGKILL to the daemon and the webserver")
        stack.kill("daemon", signal.SIGKILL)
        stack.kill("webserver", signal.SIGKILL)
        time.sleep(5)
        stack.restart("daemon")
        stack.restart("webserver")
        statuses = {r: wait_for_run(url, r, timeout_s=7200) for r in run_ids}
        concurrent_s = time.monotonic() - t0
        mlflow_after = mlflow_state(stack.mlflow_url)
        runs_lost = sum(1 for r in finished_before if instance.get_run_by_id(r) is None) + len(mlflow_before[0] - mlflow_after[0])
        aliases_lost = len(mlflow_before[1] - mlflow_after[1])
        assets_lost = len(assets_before - {k.to_user_string() for k in instance.get_asset_keys()})
        failed_steps = sorted({e.dagster_event.step_key for r in run_ids for e in instance.all_logs(r)
                               if e.dagster_event and e.dagster_event.event_type_value == "STEP_FAILURE"})
        training, runs = step_windows(instance, run_ids)
        max_training, max_runs = overlap_max(training), overlap_max(runs)
        say(f"4 partitions: {statuses} in {concurrent_s:.0f}s; at most {max_runs} runs and {max_training} training "
            f"step(s) at once ({len(training)} training steps recorded)")
        say(f"after kill -9 and restart: runs lost {runs_lost}, aliases lost {aliases_lost}, assets lost {assets_lost}; "
            f"failed steps in the 4 runs: {failed_steps or 'none'}")
        result = {
            "slice": "small SciFact slice (80 train / 8 test queries, 4 weeks), tiny training (3 + 2 steps)",
            "embedded_seconds": round(embedded_s, 1), "service_seconds": round(service_s, 1), "repeats": args.repeats,
            "service_overhead_pct": round((service_s / embedded_s - 1) * 100, 1),
            "same_figures": bool(same), "max_ndcg10_difference": max_diff,
            "max_concurrent_training": max_training, "max_concurrent_runs": max_runs,
            "concurrent_statuses": sorted(statuses.values()), "concurrent_failed_steps": failed_steps,
            "concurrent_seconds": round(concurrent_s, 1),
            "runs_lost_after_kill": runs_lost, "aliases_lost_after_kill": aliases_lost, "assets_lost_after_kill": assets_lost,
        }
        instance.dispose()
    finally:
        if stack is not None:
            stack.down()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
