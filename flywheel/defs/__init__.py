"""Dagster wiring only: assets, checks, resources, schedules. Logic lives in flywheel.lib."""

from __future__ import annotations

import warnings

import dagster as dg

# Checks are partitioned like their assets so the UI shows each week's gate result. Dagster
# marks per-partition checks as a preview feature; we rely on it knowingly, and keep the
# warning from drowning every `dagster` command's output. (Deprecation warnings stay on.)
warnings.filterwarnings(
    "ignore", category=dg.PreviewWarning, message="Specifying a partitions_def on an AssetCheckSpec"
)


def build_definitions(resources: dict | None = None) -> dg.Definitions:
    """Every stage's definitions plus resources (the defaults, or a test's own)."""
    from flywheel.defs import datasets, labels, logs, report, schedules, training
    from flywheel.defs.loggers import LOGGERS
    from flywheel.defs.resources import default_resources
    from flywheel.lib.quiet import quiet_libraries

    quiet_libraries()  # the run's logs show the stages' own progress lines, not library bars

    return dg.Definitions.merge(
        logs.defs,
        labels.defs,
        datasets.defs,
        training.defs,
        report.defs,
        schedules.defs,
        dg.Definitions(resources=resources if resources is not None else default_resources(), loggers=LOGGERS),
    )
