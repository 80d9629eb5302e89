"""Where artifact bytes come from: one small protocol, one module per source type.

A source only streams bytes; the store hashes them as it writes and decides whether they
are right. Foreign errors (OSError, HTTP) become ``SourceError`` here, so nothing above
this package sees them. The protocol and what the sources share live in ``base.py``.
"""

from __future__ import annotations

from pathlib import Path

from zoo_agent.errors import SourceError
from zoo_agent.index import model as index
from zoo_agent.sources.base import ATTEMPTS, CHUNK, TOKEN_HELP, FetchSettings, Source, Transient, resolve_token, retried, with_retries

__all__ = ["ATTEMPTS", "CHUNK", "TOKEN_HELP", "FetchSettings", "Source", "Transient", "open_source", "resolve_token", "retried", "with_retries"]


def open_source(spec: index.Source, index_dir: Path, settings: FetchSettings) -> Source:
    if isinstance(spec, index.FileSource):
        from zoo_agent.sources.file import FileDir

        return FileDir(index_dir / spec.path)
    if isinstance(spec, index.UrlSource):
        if settings.offline:
            raise SourceError(f"{spec.base_url}: offline mode (--offline / HF_HUB_OFFLINE) forbids fetching over the network")
        from zoo_agent.sources.url import UrlFiles

        return UrlFiles(spec.base_url)
    if isinstance(spec, index.HfSource):
        from zoo_agent.sources.hf import HfRepo  # imports huggingface_hub: only when something must be fetched

        return HfRepo(spec.repo, spec.revision, settings)
    from zoo_agent.sources.ollama import OllamaDaemon  # imports the ollama client: only when something must be pulled

    return OllamaDaemon(spec, settings)
