"""Where LanceDB lives, and the one place that connects to it.

A local folder (the embedded default, ``<home>/lancedb``) or an object-store URI (``s3://``,
``gs://``, ``az://``) with the storage options LanceDB's object store takes (region, endpoint,
timeouts). Credentials are not options: the object store reads the provider's own environment
variables (``AWS_ACCESS_KEY_ID``, ...) itself. Every function in ``registry.index`` connects through
:func:`connect`, so a table written by one pod is read by the next with the same options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Union


LANCEDB_SCHEMES = ("s3", "s3+ddb", "gs", "az", "file")
SECRET_WORDS = ("secret", "key", "token", "password")
NOT_SECRET = {"aws_sse_kms_key_id", "aws_sse_bucket_key_enabled"}  # names with "key" that hold no secret


def parse_storage_options(text: str) -> dict[str, str]:
    """A JSON object of string values, with no credential in it (the error never repeats a value)."""
    try:
        options = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(options, dict):
        raise ValueError(f"a JSON object is needed, not a JSON {type(options).__name__}")
    for key, value in options.items():
        if not isinstance(value, str):
            raise ValueError(f"option {key!r} must be a JSON string (e.g. \"60s\", \"true\"), not {type(value).__name__}")
        if key.lower() not in NOT_SECRET and any(w in key.lower() for w in SECRET_WORDS):
            raise ValueError(f"option {key!r} looks like a credential: set the provider's own environment variable "
                             "instead (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, GOOGLE_SERVICE_ACCOUNT, AZURE_STORAGE_ACCOUNT_KEY, ...)")
    return options


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


def search_connection(where: Where):
    """A connection kept for searches: its session caches a table's vector index between queries
    (a fresh connection loads the index again for every query). Tables are still opened per
    search, so a table replaced since is read at its latest version."""
    return _kept(as_store(where))


@lru_cache(maxsize=32)
def _kept(store: LanceStore):
    return connect(store)
