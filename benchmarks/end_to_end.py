"""End to end: the demo on any BEIR-layout folder, with per-stage wall time and the test split.

    python benchmarks/end_to_end.py [--dataset DIR] [--results DIR] [--weeks 8] [--seed 0]

Simulates ``--weeks`` weeks of searches over the dataset's train queries (served by the base
model), labels every week, runs the whole flywheel for the last week through Dagster (the same
definitions and resources as ``flywheel demo``), and prints per-stage wall time and base vs
trained (and reranked) NDCG@10 / Recall@10 on the dataset's test split (human labels). Other
settings come from the environment as usual (``flywheel config``). Defaults: the bundled SciFact
and a results folder under .flywheel/. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


INFO_LOGS = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}  # the stages' own lines, not Dagster's debug events


def say(msg: str) -> None:
    print(f"[end_to_end {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def step_seconds(instance, run_id: str) -> dict[str, float]:
    """Wall time of each step (asset) of a run, from Dagster's event log."""
    started, out = {}, {}
    for entry in instance.all_logs(run_id):
        ev = entry.dagster_event
        if ev is None or not ev.step_key:
            continue
        if ev.event_type_value == "STEP_START":
            started[ev.step_key] = entry.timestamp
        elif ev.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and ev.step_key in started:
            out[ev.step_key] = round(entry.timestamp - started[ev.step_key], 1)
    return out


DEFAULT_RESULTS = (REPO / ".flywheel" / "bench-end-to-end").resolve()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(REPO / "data" / "scifact"), help="a BEIR-layout folder (qrels/train.tsv, else dev.tsv, else test.tsv split in two)")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="a fresh folder for everything written")
    p.add_argument("--weeks", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    results = Path(args.results).resolve()
    if results.exists() and any(results.iterdir()):
        # an earlier run's registry would change what this week is compared with: start fresh
        if results != DEFAULT_RESULTS:
            raise SystemExit(f"--results {results} is not empty: give a fresh folder (an earlier run's champion "
                             "in its registry would change what this week's challenger is compared with)")
        shutil.rmtree(results)
        say(f"cleared the previous run's results in {results}")

    import dagster as dg

    from flywheel.backfill import component_gate_errors
    from flywheel.config import load_config
    from flywheel.defs import build_definitions
    from flywheel.defs.resources import resources_for
    from flywheel.layout import FINETUNE_SET, Layout
    from flywheel.lib import store
    from flywheel.lib.beir import load_beir
    from flywheel.lib.evaluation.weekly import gate_error
    from flywheel.lib.quiet import quiet_libraries
    from flywheel.lib.simulate.traffic import SimulationConfig, simulate, week_starts

    quiet_libraries()
    config = load_config(paths={"home": args.results, "dataset": args.dataset, "log_dir": ""}, tiers={"seed": args.seed})
    layout = Layout.of(config.paths)
    started = time.monotonic()
    stages: dict[str, float] = {}
    ds = load_beir(config.paths.dataset)
    split_note = ds.split_note
    say(f"dataset {config.paths.dataset}; results under {layout.home}" + (f"; {ds.notes}" if ds.notes else ""))
    t0 = time.monotonic()
    weeks = [w.isoformat() for w in week_starts(config.tiers.start_date, args.weeks)]
    if not layout.simulation_marker.exists():
        summary = simulate(SimulationConfig(
            dataset_dir=config.paths.dataset, log_dir=layout.log_dir, lancedb_uri=layout.lancedb,
            openvino_cache=layout.openvino_cache, model_path=config.paths.base_model, start=config.tiers.start_date,
            weeks=args.weeks, seed=args.seed,
            top_k=config.tiers.top_k, encode_max_seq_length=config.training.encode_max_seq_length,
            precision=config.training.inference_precision, query_precision=config.training.query_precision,
            sentence_units=config.training.sentence_units,
        ), progress=say)
        layout.simulation_marker.write_text(json.dumps({"summary": vars(summary)}, default=str))
    stages["simulate"] = round(time.monotonic() - t0, 1)

    layout.dagster_home.mkdir(parents=True, exist_ok=True)
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions(resources_for(config))
    t0 = time.monotonic()
    for week in weeks[:-1]:
        say(f"labelling week {week}")
        if not defs.resolve_job_def("weekly_labels").execute_in_process(partition_key=week, instance=instance, raise_on_error=False,
                                                                    run_config=INFO_LOGS).success:
            say(f"weekly_labels failed for {week}")
            return 1
    stages["earlier_weeks_labels"] = round(time.monotonic() - t0, 1)
    say(f"the whole flywheel for {weeks[-1]}")
    result = defs.resolve_job_def("flywheel_weekly").execute_in_process(partition_key=weeks[-1], instance=instance, raise_on_error=False,
                                                                      run_config=INFO_LOGS)
    stages.update(step_seconds(instance, result.run_id))
    for name, secs in stages.items():
        say(f"  {name}: {secs:.0f}s")

    decision_path = layout.decision(weeks[-1])
    if not decision_path.exists():
        say("the run stopped before the benchmark report: see the failed stage above")
        return 1
    decision = json.loads(decision_path.read_text())
    pq = store.read_table(layout.per_query(weeks[-1]))
    test = pq[pq["suite"].str.startswith("test")]
    if test.empty:
        say("the dataset has no qrels/test.tsv: no human-labelled figures")
    mean = lambda model, metric: round(float(test.loc[test["model"] == model, metric].mean()), 4) if len(test) else None  # noqa: E731
    reranked = f"{decision.get('serving_retriever', decision['serving_first_stage'])}+reranker"
    # what serves after the week: the reranker if one passed, else the retriever that passed
    serving = decision["serving_reranker"] or decision.get("serving_retriever", decision["serving_first_stage"])
    figures = {
        "dataset": str(config.paths.dataset),
        "split_note": split_note,
        "load_notes": list(ds.load_notes),
        "test_queries": int(test["query_id"].nunique()) if len(test) else 0,
        "ndcg10_base": mean("base", "ndcg@10"),
        "ndcg10_trained": mean("challenger", "ndcg@10"),
        "ndcg10_reranked": mean(reranked, "ndcg@10"),
        "ndcg10_hybrid": mean(decision["hybrid"]["candidate"], "ndcg@10") if decision.get("hybrid") else None,
        "serving": serving,
        "ndcg10_serving": mean(serving, "ndcg@10"),
        "recall10_base": mean("base", "recall@10"),
        "recall10_trained": mean("challenger", "recall@10"),
        "recall10_reranked": mean(reranked, "recall@10"),
        "train_examples": len(store.read_table(layout.asset(FINETUNE_SET, weeks[-1]))),
        "promoted": bool(decision["promote"]),
        "reranker_serves": decision["serving_reranker"],
        "decision": layout.report(weeks[-1]).read_text().split("\n\n")[1].strip("*"),
        "test_challenger_vs_base": (decision.get("test") or {}).get("challenger_vs_base"),
        # each decision against the test split's verdict, as the backfill counts them
        "gate_errors": [e for e in [gate_error(bool(decision["promote"]), (decision.get("test") or {}).get("first_stage"))]
                        if e] + component_gate_errors(decision),
        "stage_seconds": stages,
        "total_seconds": round(time.monotonic() - started, 1),
    }
    say(f"test split NDCG@10: base {figures['ndcg10_base']} -> trained {figures['ndcg10_trained']} -> "
        f"keyword fusion {figures['ndcg10_hybrid']} -> reranked {figures['ndcg10_reranked']}; serving after the week: "
        f"{serving} {figures['ndcg10_serving']}; Recall@10 {figures['recall10_base']} -> {figures['recall10_trained']}")
    say(figures["decision"])
    say("gate errors (each decision against the test split's verdict): " + ("; ".join(figures["gate_errors"]) or "none"))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
