"""`flywheel`: simulate demo traffic, run the weekly flywheel, open the UIs.

    flywheel demo            simulate 8 weeks of traffic, run the flywheel for the latest week
    flywheel simulate        only write the demo logs
    flywheel run --week W    run the whole flywheel (or --job weekly_labels) for one week
    flywheel backfill        8 weeks in order, each served by the champion of its time; trend report
    flywheel ui              the Dagster UI on the same instance the commands use
    flywheel mlflow-ui       the MLflow UI on the same tracking store
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import date
from pathlib import Path

from flywheel.settings import REPO_ROOT, Settings, get_settings


def say(msg: str) -> None:
    print(f"[flywheel {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare_dagster_home(settings: Settings) -> Path:
    """Dagster reads dagster.yaml from $DAGSTER_HOME only: put the project's copy there."""
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    src = REPO_ROOT / "dagster.yaml"
    if src.exists():
        shutil.copyfile(src, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


# -- simulate ---------------------------------------------------------------------------------

def _sim_config(settings: Settings, args: argparse.Namespace):
    from flywheel.lib.simulate.traffic import SimulationConfig

    return SimulationConfig(
        dataset_dir=settings.dataset_dir,
        log_dir=settings.log_dir,
        lancedb_uri=settings.lancedb_dir,
        model_path=settings.base_model,
        start=date.fromisoformat(args.start) if args.start else settings.start_date,
        weeks=args.weeks,
        seed=args.seed if args.seed is not None else settings.seed,
        max_queries=args.max_queries,
        encode_max_seq_length=settings.encode_max_seq_length,
        poison_weeks=tuple(w - 1 for w in args.poison_week),
    )


def cmd_simulate(args: argparse.Namespace, settings: Settings | None = None) -> list[str]:
    from flywheel.lib.simulate.traffic import simulate, week_starts

    settings = settings or get_settings()
    cfg = _sim_config(settings, args)
    marker = settings.log_dir / "simulation.json"
    wanted = {k: str(v) for k, v in vars(cfg).items() if k not in ("log_dir", "lancedb_uri")}
    weeks = [w.isoformat() for w in week_starts(cfg.start, cfg.weeks)]
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("config") == wanted and not args.overwrite:
            say(f"demo logs already simulated in {settings.log_dir} (same settings): reusing them")
            return weeks
        if not args.overwrite:
            raise SystemExit(
                f"{settings.log_dir} holds logs simulated with other settings; pass --overwrite to replace them"
            )
    if args.overwrite and settings.log_dir.exists():
        shutil.rmtree(settings.log_dir)
    say(f"simulating {cfg.weeks} weeks of searches from {weeks[0]} into {settings.log_dir}")
    summary = simulate(cfg, progress=say)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"config": wanted, "summary": vars(summary)}, indent=2, default=str))
    say(
        f"wrote {summary.searches} searches ({summary.unique_queries} distinct queries, {summary.repeats} repeats, "
        f"{summary.feedback_events} feedback events); base model finds a relevant chunk in the top 20 for "
        f"{summary.recall_at_k:.0%} of searches"
    )
    return weeks


# -- run weeks through Dagster ------------------------------------------------------------------

def _print_materializations(result) -> None:
    for event in result.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization
            md = mat.metadata
            keys = [k for k in ("dagster/row_count", "queries", "kappa_vs_human", "train_seconds", "mlflow_run_id", "decision", "report_path") if k in md]
            parts = [f"{k.replace('dagster/', '')}={md[k].value}" for k in keys]
            say(f"  done {mat.asset_key.to_user_string()} [{mat.partition}] " + ", ".join(map(str, parts)))
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            ev = event.event_specific_data
            status = "passed" if ev.passed else "FAILED"
            say(f"  check {ev.asset_check_key.name} on {ev.asset_key.to_user_string()}: {status}"
                + (f" - {ev.description}" if ev.description else ""))


def run_week(week: str, job_name: str = "flywheel_weekly", *, resources: dict | None = None):
    import dagster as dg

    from flywheel.definitions import defs

    job = defs.resolve_job_def(job_name)
    instance = dg.DagsterInstance.get()
    say(f"running {job_name} for the week of {week}")
    started = time.monotonic()
    result = job.execute_in_process(
        partition_key=week,
        instance=instance,
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        resources=resources,
    )
    _print_materializations(result)
    say(f"{job_name} for {week}: {'succeeded' if result.success else 'FAILED'} in {time.monotonic() - started:.0f}s")
    return result


def cmd_run(args: argparse.Namespace) -> int:
    prepare_dagster_home(get_settings())
    return 0 if run_week(args.week, args.job).success else 1


def cmd_demo(args: argparse.Namespace) -> int:
    settings = get_settings()
    prepare_dagster_home(settings)
    started, started_wall = time.monotonic(), time.time()
    weeks = cmd_simulate(args, settings)
    for week in weeks[:-1]:
        if not run_week(week, "weekly_labels").success:
            return 1
    result = run_week(weeks[-1], "flywheel_weekly")
    report = settings.reports_dir / f"benchmark-{weeks[-1]}.md"
    say(f"demo finished in {time.monotonic() - started:.0f}s")
    # The gate saying "not promoted" is an answer, not a crash: the demo succeeded when the week's
    # report was written in this run, whatever it decided.
    reported = report.exists() and report.stat().st_mtime >= started_wall
    if reported:
        say(f"report: {report}")
        print(report.read_text().split("\n\n")[1])
    say(f"Dagster UI: flywheel ui   |   MLflow UI: flywheel mlflow-ui   (data under {settings.home})")
    return 0 if result.success or reported else 1


def cmd_backfill(args: argparse.Namespace) -> int:
    from flywheel.backfill import LIGHT, run_backfill

    if not args.full:
        for key, value in LIGHT.items():
            os.environ.setdefault(key, value)
    settings = get_settings()  # after the light settings are in the environment
    prepare_dagster_home(settings)
    figures = run_backfill(settings, _sim_config(settings, args), light=not args.full, run_week=run_week, say=say)
    say(f"trend report: {figures['trend_report']}")
    print(json.dumps(figures))
    return 0


# -- UIs ------------------------------------------------------------------------------------------

def cmd_ui(args: argparse.Namespace) -> int:
    prepare_dagster_home(get_settings())
    os.chdir(REPO_ROOT)
    cmd = [sys.executable, "-m", "dagster", "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-p", str(args.port)]
    say(f"Dagster UI on http://127.0.0.1:{args.port} (DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
    os.execv(sys.executable, cmd)


def cmd_mlflow_ui(args: argparse.Namespace) -> int:
    s = get_settings()
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", s.mlflow_tracking_uri,
           "--port", str(args.port), "--workers", "1"]
    say(f"MLflow UI on http://127.0.0.1:{args.port}")
    os.execv(sys.executable, cmd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flywheel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("demo", "simulate", "backfill"):
        sp = sub.add_parser(name)
        sp.add_argument("--weeks", type=int, default=8)
        sp.add_argument("--start", help="first week (a Monday), default FLYWHEEL_START_DATE")
        sp.add_argument("--seed", type=int, default=None)
        sp.add_argument("--max-queries", type=int, default=None, help="use only this many train queries")
        sp.add_argument("--overwrite", action="store_true", help="replace logs simulated with other settings")
        sp.add_argument("--poison-week", type=int, action="append", default=[], metavar="N",
                        help="re-log the history in week N (1-based) with chunk texts shuffled: a bad week for the gate to stop")
    sub.choices["backfill"].add_argument("--full", action="store_true", help="full training settings (slow)")
    rp = sub.add_parser("run")
    rp.add_argument("--week", required=True, help="the week's Monday, e.g. 2026-11-16")
    rp.add_argument("--job", default="flywheel_weekly", choices=["flywheel_weekly", "weekly_labels"])
    up = sub.add_parser("ui")
    up.add_argument("--port", type=int, default=3000)
    mp = sub.add_parser("mlflow-ui")
    mp.add_argument("--port", type=int, default=5000)
    args = p.parse_args(argv)
    if args.command == "simulate":
        cmd_simulate(args)
        return 0
    commands = {"demo": cmd_demo, "run": cmd_run, "backfill": cmd_backfill, "ui": cmd_ui, "mlflow-ui": cmd_mlflow_ui}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
