"""Where LanceDB lives, and the one place that connects to it.

A local folder (the embedded default, ``<home>/lancedb``) or an object-store URI (``s3://``,
``gs://``, ``az://``) with the storage options LanceDB's object store takes (region, endpoint,
timeouts). Credentials are not options: the object store reads the provider's own environment
variables (``AWS_ACCESS_KEY_ID``, ...) itself. Every function in ``registry.index`` connects through
:func:`connect`, so a table written by one pod is read by the next with the same options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union


@dataclass(frozen=True)
class LanceStore:
    """A LanceDB location: ``uri`` and the object store's options as (key, value) pairs."""

    uri: str
    storage_options: tuple[tuple[str, str], ...] = ()

    @property
    def is_local(self) -> bool:
        return "://" not in self.uri

    def __str__(self) -> str:  # what progress lines and errors show: the URI, never the options
        return self.uri


Where = Union[str, Path, LanceStore]


def as_store(where: Where) -> LanceStore:
    return where if isinstance(where, LanceStore) else LanceStore(str(where))


def connect(where: Where):
    """A LanceDB connection; a local folder is created first."""
    import lancedb

    store = as_store(where)
    if store.is_local:
        Path(store.uri).mkdir(parents=True, exist_ok=True)
    return lancedb.connect(store.uri, storage_options=dict(store.storage_options) or None)
