"""`flywheel`: simulate demo traffic, run the weekly flywheel, open the UIs.

    flywheel demo            simulate 8 weeks of traffic, run the flywheel for the latest week
    flywheel simulate        only write the demo logs
    flywheel run --week W    run the whole flywheel (or --job weekly_labels) for one week
    flywheel backfill        8 weeks in order, each served by the champion of its time; trend report
    flywheel config          every setting, its value and where it came from
    flywheel import PATH...  traces/logs a team already has (OpenInference, OTLP, MLflow, Langfuse, ...)
    flywheel ui              the Dagster UI on the same instance the commands use
    flywheel mlflow-ui       the MLflow UI on the same tracking store
    flywheel services ...    PostgreSQL, Dagster webserver + daemon, MLflow server (service mode)

Settings are read and validated once, before any work starts (flywheel/config.py); a bad one
stops the command with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import date

from flywheel.config import REPO_ROOT, ConfigError, FlywheelConfig, load_config
from flywheel.layout import Layout


def say(msg: str) -> None:
    print(f"[flywheel {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare_dagster_home(config: FlywheelConfig) -> Layout:
    """Dagster reads dagster.yaml from $DAGSTER_HOME only: put the project's copy there."""
    layout = Layout.of(config.paths)
    layout.dagster_home.mkdir(parents=True, exist_ok=True)
    src = REPO_ROOT / "dagster.yaml"
    if src.exists():
        shutil.copyfile(src, layout.dagster_home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(layout.dagster_home)  # read by Dagster in this process and its children
    return layout


# -- simulate ---------------------------------------------------------------------------------

def _sim_config(config: FlywheelConfig, args: argparse.Namespace):
    from flywheel.lib.simulate.traffic import SimulationConfig

    layout = Layout.of(config.paths)
    return SimulationConfig(
        dataset_dir=config.paths.dataset,
        log_dir=layout.log_dir,
        lancedb_uri=layout.lancedb,
        openvino_cache=layout.openvino_cache,
        model_path=config.paths.base_model,
        start=_monday(args.start, config) if args.start else config.tiers.start_date,
        weeks=args.weeks,
        seed=args.seed if args.seed is not None else config.tiers.seed,
        top_k=config.tiers.top_k,
        max_queries=args.max_queries,
        encode_max_seq_length=config.training.encode_max_seq_length,
        precision=config.training.inference_precision,
        query_precision=config.training.query_precision,
        sentence_units=config.training.sentence_units,
        poison_weeks=tuple(w - 1 for w in args.poison_week),
    )


def cmd_simulate(args: argparse.Namespace, config: FlywheelConfig) -> list[str]:
    from flywheel.lib.simulate.traffic import simulate, week_starts

    cfg, layout = _sim_config(config, args), Layout.of(config.paths)
    marker = layout.simulation_marker
    wanted = {k: str(v) for k, v in vars(cfg).items() if k not in ("log_dir", "lancedb_uri", "openvino_cache")}
    weeks = [w.isoformat() for w in week_starts(cfg.start, cfg.weeks)]
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("config") == wanted and not args.overwrite:
            say(f"demo logs already simulated in {layout.log_dir} (same settings): reusing them")
            return weeks
        if not args.overwrite:
            raise SystemExit(f"{layout.log_dir} holds logs simulated with other settings; pass --overwrite to replace them")
    if args.overwrite and layout.log_dir.exists():
        shutil.rmtree(layout.log_dir)
    say(f"simulating {cfg.weeks} weeks of searches from {weeks[0]} into {layout.log_dir}")
    summary = simulate(cfg, progress=say)
    layout.log_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"config": wanted, "summary": vars(summary)}, indent=2, default=str))
    say(f"wrote {summary.searches} searches ({summary.unique_queries} distinct queries, {summary.repeats} repeats, "
        f"{summary.feedback_events} feedback events); base model finds a relevant chunk in the top 20 for "
        f"{summary.recall_at_k:.0%} of searches")
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
    say(f"running {job_name} for the week of {week}")
    started = time.monotonic()
    result = job.execute_in_process(
        partition_key=week,
        instance=dg.DagsterInstance.get(),
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        resources=resources,
    )
    _print_materializations(result)
    say(f"{job_name} for {week}: {'succeeded' if result.success else 'FAILED'} in {time.monotonic() - started:.0f}s")
    return result


def _week_runner(args: argparse.Namespace, config: FlywheelConfig, overrides: dict | None = None):
    """In-process by default (with ``overrides`` applied to the resources); with --submit,
    through the service instance's run queue (the instance's own settings apply)."""
    if getattr(args, "submit", False):
        from flywheel.services.commands import submitting_run_week

        return submitting_run_week(say, _print_materializations, overrides=overrides)
    if not overrides:
        return run_week
    from flywheel.defs.resources import resources_for

    resources = resources_for(config)
    return lambda week, job="flywheel_weekly": run_week(week, job, resources=resources)


def _monday(text: str, config: FlywheelConfig) -> date:
    """A week given on the command line: an ISO date, a Monday, not before the first partition."""
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--week {text!r} is not a date: give the week's Monday as YYYY-MM-DD") from None
    if day.weekday() != 0:
        raise ConfigError(f"--week {text}: weeks start on Monday; {text} is a {day:%A} (its week starts "
                          f"{date.fromordinal(day.toordinal() - day.weekday())})")
    if day < config.tiers.start_date:
        raise ConfigError(f"--week {text} is before the first week {config.tiers.start_date} (FLYWHEEL_START_DATE)")
    return day


def cmd_run(args: argparse.Namespace, config: FlywheelConfig) -> int:
    week = _monday(args.week, config).isoformat()
    prepare_dagster_home(config)
    return 0 if _week_runner(args, config)(week, args.job).success else 1


def summary_lines(layout: Layout, week: str) -> list[str]:
    """The demo's last lines: the decision and the test split's verdict beside it."""
    path = layout.decision(week)
    if not path.exists():
        return [f"no benchmark report for {week}: see the failed stage above"]
    d = json.loads(path.read_text())
    lines = [layout.report(week).read_text().split("\n\n")[1].strip("*")] if layout.report(week).exists() else []
    from flywheel.lib import store

    pq = store.read_table(layout.per_query(week))
    test = pq[pq["suite"].str.startswith("test")]
    if not test.empty:
        nd = test.groupby("model")["ndcg@10"].mean()
        t = (d.get("test") or {}).get("challenger_vs_base") or {}
        reranked = nd.get(f"{d.get('serving_retriever', d['serving_first_stage'])}+reranker", float("nan"))
        lines.append(f"test split NDCG@10 ({test['query_id'].nunique()} queries, human labels): base {nd['base']:.4f} -> "
                     f"challenger {nd['challenger']:.4f} ({(nd['challenger'] / nd['base'] - 1) * 100:+.1f}%, paired 95% CI "
                     f"[{t.get('ci_low', float('nan')):+.4f}, {t.get('ci_high', float('nan')):+.4f}]); "
                     + (f"{d['hybrid']['candidate']} (keyword fusion) {nd[d['hybrid']['candidate']]:.4f}; " if d.get("hybrid") else "")
                     + f"+ reranker {reranked:.4f}")
    return lines


def cmd_demo(args: argparse.Namespace, config: FlywheelConfig) -> int:
    layout = prepare_dagster_home(config)
    started = time.monotonic()
    runner = _week_runner(args, config)
    weeks = cmd_simulate(args, config)
    for week in weeks[:-1]:
        if not runner(week, "weekly_labels").success:
            return 1
    result = runner(weeks[-1], "flywheel_weekly")
    say(f"demo finished in {time.monotonic() - started:.0f}s; report: {layout.report(weeks[-1])}")
    say(f"Dagster UI: flywheel ui   |   MLflow UI: flywheel mlflow-ui   (data under {layout.home})")
    for line in summary_lines(layout, weeks[-1]):
        print(line, flush=True)
    # The gate saying "not promoted" is an answer, not a crash: the demo succeeded when the week's
    # report was written, whatever it decided.
    return 0 if result.success or layout.decision(weeks[-1]).exists() else 1


def backfill_overrides(light: bool) -> dict[str, dict]:
    from flywheel.backfill import LIGHT

    return LIGHT if light else {}


def cmd_backfill(args: argparse.Namespace, config: FlywheelConfig) -> int:
    from flywheel.backfill import run_backfill

    overrides = backfill_overrides(args.light)
    config = load_config(**overrides)  # --light: its settings on top of the environment's
    prepare_dagster_home(config)
    # a poisoned week the labelling gate stops is run again without it (in-process runs only:
    # submitted runs use the services' settings)
    forced = {**overrides, "judge": {**overrides.get("judge", {}), "min_kappa": -1.0}}
    without_gate = None if getattr(args, "submit", False) else _week_runner(args, load_config(**forced), forced)
    figures = run_backfill(config, _sim_config(config, args), overrides=overrides,
                           run_week=_week_runner(args, config, overrides), say=say,
                           run_without_labelling_gate=without_gate)
    say(f"trend report: {figures['trend_report']}")
    print(json.dumps(figures))
    return 0


def cmd_config(args: argparse.Namespace, config: FlywheelConfig) -> int:
    """Every setting with its value and where it came from (default, environment, command)."""
    rows = config.rows()
    if args.markdown:
        from flywheel.config import settings_table_markdown

        print(settings_table_markdown())
        return 0
    if args.json:
        print(json.dumps([{**r, "value": str(r["value"]), "default": str(r["default"])} for r in rows], indent=2))
        return 0
    width = max(len(r["env"]) for r in rows)
    for section in dict.fromkeys(r["section"] for r in rows):
        print(f"[{section}]")
        for r in (r for r in rows if r["section"] == section):
            print(f"  {r['env']:<{width}}  {str(r['value']):<24}  ({r['source']})  {r['doc']}")
    return 0


def cmd_import(args: argparse.Namespace, config: FlywheelConfig) -> int:
    """Import trace/log files into the log folder; one summary per file (flywheel.capture.importers)."""
    from flywheel.capture.importers import import_paths, totals

    mapping = dict(m.split("=", 1) for m in args.map)
    results = import_paths(args.paths, config.paths.log_dir, format=args.format, mapping=mapping or None,
                           redact_pii=not args.keep_pii, retriever=args.retriever)
    report = totals(results, say=print)
    say(f"imported {report['imported']:,} of {report['retrievals']:,} retrievals from {report['files']} files "
        f"into {config.paths.log_dir}")
    return 0 if report["files_not_read"] == 0 else 1


# -- UIs ------------------------------------------------------------------------------------------

def cmd_ui(args: argparse.Namespace, config: FlywheelConfig) -> int:
    prepare_dagster_home(config)
    os.chdir(REPO_ROOT)
    cmd = [sys.executable, "-m", "dagster", "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-p", str(args.port)]
    say(f"Dagster UI on http://127.0.0.1:{args.port} (DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
    os.execv(sys.executable, cmd)


def cmd_mlflow_ui(args: argparse.Namespace, config: FlywheelConfig) -> int:
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", config.paths.mlflow_uri,
           "--port", str(args.port), "--workers", "1"]
    say(f"MLflow UI on http://127.0.0.1:{args.port}")
    os.execve(sys.executable, cmd, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


def _parser() -> argparse.ArgumentParser:
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
    sub.choices["backfill"].add_argument("--light", action="store_true",
                                         help="a quicker run: the reranker trains 5 steps and reranks the top 5 (flywheel.backfill.LIGHT)")
    rp = sub.add_parser("run")
    rp.add_argument("--week", required=True, help="the week's Monday, e.g. 2026-11-16")
    rp.add_argument("--job", default="flywheel_weekly", choices=["flywheel_weekly", "weekly_labels"])
    cp = sub.add_parser("config", help="every setting, its value and where it came from")
    cp.add_argument("--json", action="store_true")
    cp.add_argument("--markdown", action="store_true", help="the README's settings table")
    up = sub.add_parser("ui")
    up.add_argument("--port", type=int, default=3000)
    mp = sub.add_parser("mlflow-ui")
    mp.add_argument("--port", type=int, default=5000)
    ip = sub.add_parser("import", help="import traces/logs a team already has into the log folder")
    ip.add_argument("paths", nargs="+", help="files or folders (gzip and rotated files too)")
    ip.add_argument("--format", default="auto", choices=["auto", "capture", "jsonl", "csv", "openinference", "otlp",
                                                         "mlflow", "langfuse", "langsmith", "phoenix"])
    ip.add_argument("--map", action="append", default=[], metavar="FIELD=SOURCE",
                    help="jsonl/csv: where a field lives, e.g. --map query=question --map results.chunk_id=doc")
    ip.add_argument("--retriever", help="retriever name for records that carry none")
    ip.add_argument("--keep-pii", action="store_true", help="do not redact (only for data that holds none)")
    for name in ("demo", "backfill", "run"):
        sub.choices[name].add_argument("--submit", action="store_true",
                                       help="queue runs on the services (`flywheel services up`) instead of in-process")
    svc = sub.add_parser("services", help="PostgreSQL, Dagster webserver + daemon, MLflow server")
    svc.add_argument("action", choices=["up", "down", "status"])
    svc.add_argument("--webservers", type=int, default=1, help="webservers on the same instance (ports from FLYWHEEL_SERVICES_DAGSTER_PORT up)")
    svc.add_argument("--foreground", action="store_true", help="stay attached; SIGTERM or Ctrl-C stops every service")
    return p


COMMANDS = {"demo": cmd_demo, "run": cmd_run, "backfill": cmd_backfill, "config": cmd_config,
            "ui": cmd_ui, "mlflow-ui": cmd_mlflow_ui, "import": cmd_import}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config()  # every setting validated before any work starts
        if args.command in ("demo", "simulate", "run", "backfill"):
            from flywheel.lib.quiet import quiet_libraries

            quiet_libraries()  # the project's own progress lines, not library bars
        if args.command == "simulate":
            cmd_simulate(args, config)
            return 0
        if args.command == "services":
            from flywheel.services.commands import cmd_services

            return cmd_services(args, say)
        return COMMANDS[args.command](args, config)
    except ConfigError as err:
        print(f"flywheel: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or a run that Dagster reports as stopped from outside
        print(f"flywheel: stopped{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
