"""model-zoo agent: validate an index, reconcile a host's zoo, serve its resident model."""

from zoo_agent._version import __version__
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
from zoo_agent.library import HostZoo, entry_for, open, pin_directory
from zoo_agent.store.zoo import Zoo

__all__ = [
    "HostZoo",
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
    "pin_directory",
]
