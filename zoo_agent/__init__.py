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

__all__ = [
    "Index",
    "IntegrityError",
    "InvalidIndex",
    "LockHeld",
    "Problem",
    "SourceError",
    "StoreError",
    "UsageError",
    "ZooError",
    "__version__",
    "load_index",
]
