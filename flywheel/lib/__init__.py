"""Plain logic for every stage of the flywheel. Nothing in here imports Dagster."""
