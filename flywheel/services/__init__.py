"""Service mode: the flywheel on PostgreSQL, a Dagster webserver and daemon, and an MLflow server.

The embedded default (SQLite, runs in-process) suits one person on one machine. Service mode
(`flywheel services up`) runs the same code location as long-lived processes that several people
share and that survive restarts: see ``stack`` (start/stop/status), ``postgres`` (a local server
from the distribution's package), ``instance`` (the dagster.yaml it writes), ``launcher`` (run
health checks for run monitoring) and ``submit`` (queueing runs from the command line).
"""

from flywheel.services.stack import ServiceStack

__all__ = ["ServiceStack"]
