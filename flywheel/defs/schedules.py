"""Jobs, the weekly schedule, and how a run Dagster launches executes its steps."""

from datetime import timedelta

import dagster as dg

from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.resources import CONFIG
from flywheel.services.submit import execution_config


def run_executor(default: str) -> dg.ExecutorDefinition:
    """Dagster's own executor (``multi_or_in_process_executor``: every step in the run's process,
    or a process per step), with ``default`` (``FLYWHEEL_SERVICES_EXECUTOR``) where a run's config
    names none: a run launched from the UI executes like a scheduled or --submit run. Dagster's own
    default is a process per step, a Python start and imports per step."""
    dagster_default = dg.multi_or_in_process_executor
    return dg.ExecutorDefinition(
        name=dagster_default.name,
        config_schema=dg.Field(dagster_default.config_field.config_type, default_value={default: {}}),
        requirements=dagster_default.get_requirements,
        executor_creation_fn=dagster_default.executor_creation_fn,
        description=f"{dagster_default.description} Here the default is {default}.",
    )


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


@dg.schedule(
    name=f"{flywheel_job.name}_schedule",
    job=flywheel_job,
    cron_schedule=weekly_partitions.get_cron_schedule(minute_of_hour=0, hour_of_day=2),
    execution_timezone=weekly_partitions.timezone,
    description="Monday 02:00: the whole flywheel for the week that just ended, its steps executed as "
                "FLYWHEEL_SERVICES_EXECUTOR says (as a --submit run).",
)
def weekly_retrain(context: dg.ScheduleEvaluationContext):
    """The last complete week at the tick (as ``build_schedule_from_partitioned_job`` picks it),
    executed in one process or a process per step as ``ServicesSettings.executor`` says."""
    ended = context.scheduled_execution_time - timedelta(days=7)  # a moment of the week that just ended
    week = weekly_partitions.get_partition_key_for_timestamp(ended.timestamp())
    if week < weekly_partitions.get_first_partition_key():
        return dg.SkipReason(f"no complete week yet (the first starts {weekly_partitions.get_first_partition_key()})")
    return dg.RunRequest(run_key=week, partition_key=week, run_config=execution_config(CONFIG.services.executor))


defs = dg.Definitions(jobs=[weekly_labels_job, flywheel_job], schedules=[weekly_retrain],
                      executor=run_executor(CONFIG.services.executor))
