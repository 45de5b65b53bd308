"""The one partitioning of the flywheel: weeks starting on Monday."""

from datetime import date, timedelta

import dagster as dg

from flywheel.defs.resources import CONFIG

weekly_partitions = dg.WeeklyPartitionsDefinition(
    start_date=CONFIG.tiers.start_date.isoformat(),
    day_offset=1,  # Monday; Dagster's default is Sunday
)


def week_bounds(partition_key: str) -> tuple[date, date]:
    """[start, end) of the week a partition key names."""
    start = date.fromisoformat(partition_key)
    return start, start + timedelta(days=7)
