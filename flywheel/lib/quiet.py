"""Keep the terminal for people: silence the libraries' progress bars and load reports.

Loading or saving a model through transformers draws "Loading weights" / "Writing model shards"
bars and prints a load report (a table of missing keys: expected for a cross-encoder's new head);
huggingface_hub and datasets draw their own bars; sentence-transformers logs each model it
converts; MLflow announces its database set-up. None of it helps someone watching the flywheel,
and it buries the project's own per-stage progress lines (``flywheel.lib.progress``).
:func:`quiet_libraries` turns those off once per process: the CLI calls it at start-up and the
Dagster definitions call it when loaded. Library errors (and MLflow's warnings) still show.

Turned off where they start instead: the trainers' tqdm bars and ``{'loss': ...}`` dicts
(``disable_tqdm=True`` and the project's progress callback, flywheel.lib.training.callbacks),
sentence-transformers' "Computing widget examples" bar (the embedder picks its model card's
examples itself), ``encode`` bars (``show_progress_bar=False``) and Lance's warning on
overwriting a table that is not there yet (``registry.index.replace_table``).
"""

from __future__ import annotations

import logging
import warnings

# Loggers of libraries that report routine work at INFO/WARNING (model conversions, new heads).
NOISY_LOGGERS = (
    "sentence_transformers",
    "transformers",
    "huggingface_hub",
    "datasets",
    "accelerate",
)

_done = False


def quiet_libraries() -> None:
    """Silence library progress bars and load reports for this process (idempotent)."""
    global _done
    if _done:
        return
    _done = True
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # "Creating initial MLflow database tables...": MLflow resets its root logger's level when
    # imported, not its children's
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # transformers keeps its own logging tree and tqdm switch (load reports, weight bars)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from huggingface_hub.utils import disable_progress_bars as hub_disable_progress_bars

    hub_disable_progress_bars()
    from datasets.utils import logging as ds_logging

    ds_logging.set_verbosity_error()
    ds_logging.disable_progress_bar()
    # a fresh classification head is the point of starting a cross-encoder from an embedder
    warnings.filterwarnings("ignore", message=".*were not initialized from the model checkpoint.*")
