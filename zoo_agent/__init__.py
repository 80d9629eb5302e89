"""model-zoo agent: validate an index, reconcile a host's zoo, serve its resident model."""

from zoo_agent.errors import (
    IntegrityError,
    InvalidIndex,
    LockHeld,
    Problem,
    SourceError,
    StoreError,
    UsageError,
    ZooError,
)
from zoo_agent.index.load import load_index
from zoo_agent.index.model import Index

__version__ = "0.1.0"

from zoo_agent.library import entry_for, open  # noqa: E402 - below __version__, which they import
from zoo_agent.store.zoo import Zoo  # noqa: E402

__all__ = [
    "Index",
    "IntegrityError",
    "InvalidIndex",
    "LockHeld",
    "Problem",
    "SourceError",
    "StoreError",
    "UsageError",
    "Zoo",
    "ZooError",
    "__version__",
    "entry_for",
    "load_index",
    "open",
]
