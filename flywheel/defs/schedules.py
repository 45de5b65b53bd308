"""Jobs and the weekly schedule."""

import dagster as dg

# Cheap stages for every week: logs in, labels, the three tiers.
weekly_labels_job = dg.define_asset_job(
    "weekly_labels",
    selection=dg.AssetSelection.assets("raw_logs", "relevance_labels", "eval_set", "fewshot_set"),
    description="Ingest a week's logs, judge them and cut the eval / few-shot sets.",
)

# The whole flywheel for one week, training and benchmark included.
flywheel_job = dg.define_asset_job(
    "flywheel_weekly",
    selection=dg.AssetSelection.all(),
    description=(
        "raw logs -> labels -> datasets -> trained model + reranker -> benchmark report -> gate -> champion, "
        "for one week."
    ),
)

# Runs on Monday for the week that just ended (the schedule targets the last complete partition).
weekly_retrain = dg.build_schedule_from_partitioned_job(flywheel_job, hour_of_day=2)

defs = dg.Definitions(jobs=[weekly_labels_job, flywheel_job], schedules=[weekly_retrain])
