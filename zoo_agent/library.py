"""The zoo for programs on the host (agents, training pipelines), without the CLI (issue #18).

Readers get verified directories; writers get the exact index entry to commit. Nothing
here publishes: only ``apply`` does, and only what the index declares. With the package
imported as ``zoo_agent``::

    zoo = zoo_agent.open("/var/lib/model-zoo")
    path = zoo.current("model", "qwen2-0.5b")          # verified, or raises naming the fix; an alias resolves too
    model, tokenizer = zoo.load_transformers("qwen2-0.5b", dtype="auto")
    entry = zoo_agent.entry_for("out/adapter", version="2026-12-01", license="MIT", lora_for="qwen2-0.5b")
    entry = zoo_agent.pin_directory("out/model", id="nightly", index="index.json", update=True,
                                    provenance={"run": {"id": "r7", "metrics": {"loss": 1.9}}})  # written to the index
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zoo_agent import pin
from zoo_agent.errors import StoreError, UsageError
from zoo_agent.index.load import load_index
from zoo_agent.pin import Selection, adapter_rank, file_source
from zoo_agent.store.zoo import Zoo

__all__ = ["HostZoo", "entry_for", "load_transformers", "open", "pin_directory"]


class HostZoo(Zoo):
    """The layout object plus what an application loads from it (the store stays torch-free)."""

    def load_transformers(self, aid: str, **kwargs: Any) -> tuple[Any, Any]:
        """(model, tokenizer) of a model's current version, with the index's safety rules."""
        return load_transformers(self, aid, **kwargs)


def open(root: str | Path = "/var/lib/model-zoo") -> HostZoo:  # noqa: A001 - zoo_agent.open, as the issue names it
    """The zoo at ``root``; it must exist (``zoo-agent apply`` makes it)."""
    path = Path(root)
    if not path.is_dir():
        raise StoreError(f"{path}: no zoo here; run: zoo-agent apply --root {path}")
    return HostZoo(path)


def entry_for(directory: str | Path, *, version: str, license: str, index: str | Path = "index.json",  # noqa: A002
              lora_for: str | None = None, rank: int | None = None, include: tuple[str, ...] = (),
              exclude: tuple[str, ...] = (), allow_pickle: bool = False, allow_code: bool = False) -> dict[str, Any]:  # fmt: skip
    """The index entry ``zoo-agent add file:DIRECTORY`` would write: files, sizes, sha256.

    ``index`` is where the entry will live; the source path is written relative to it
    when the directory is below it, absolute otherwise."""
    directory = Path(directory)
    files = pin.pin_directory(directory, Selection(include, exclude, allow_pickle, allow_code))
    entry: dict[str, Any] = {"version": version, "source": file_source(directory, Path(index)), "files": files, "license": license}
    if allow_pickle:
        entry["allow_pickle"] = True
    if allow_code:
        entry["allow_code"] = True
    if lora_for is not None:
        entry.update(base_model=lora_for, rank=rank or adapter_rank(directory))
        if entry["rank"] is None:
            raise UsageError(f"{directory}: a LoRA needs rank= (no adapter_config.json with 'r' was found)")
    return entry


def pin_directory(directory: str | Path | None = None, *, id: str, index: str | Path = "index.json", update: bool = False,  # noqa: A002
                  version: str | None = None, license: str | None = None, lora_for: str | None = None, rank: int | None = None,  # noqa: A002
                  provenance: Mapping[str, Any] | None = None, tags: Sequence[str] = (), description: str | None = None,
                  include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), allow_pickle: bool = False,
                  allow_code: bool = False) -> dict[str, Any]:  # fmt: skip
    """``zoo-agent add file:DIRECTORY`` as a call (issue #35): pin the files, write the entry into
    ``index`` (only if the whole index stays valid) and return the entry written.

    ``update=True``: entry ``id`` exists; ``directory`` defaults to its file source, the version is
    bumped unless given, and unchanged files are refused (UsageError). Nothing is published:
    commit the index and run ``zoo-agent apply``."""
    _, entry = pin.add_directory(Path(index), Path(directory) if directory is not None else None, id, update=update, version=version,
                                 license_=license, lora_for=lora_for, rank=rank, sel=Selection(include, exclude, allow_pickle, allow_code),
                                 provenance=provenance, tags=tags, description=description)  # fmt: skip
    return entry


def load_transformers(zoo: Zoo, aid: str, **kwargs: Any) -> tuple[Any, Any]:
    """Load a model's current version the way the resident does: local files only,
    safetensors unless the index allows pickle, repository code only if it allows code."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UsageError("loading a model needs the 'resident' extra: pip install 'zoo-agent[resident]'") from None
    if not zoo.applied_index.is_file():
        raise StoreError(f"{zoo.applied_index}: no applied index; run: zoo-agent apply")
    idx = load_index(zoo.applied_index, str(zoo.applied_index))
    mid = idx.model_named(aid)  # an id or one of its aliases (issue #35)
    if mid is None:
        raise UsageError(f"model '{aid}' is not in the applied index (models: {', '.join(sorted(idx.models)) or 'none'})")
    model = idx.models[mid]
    path = zoo.current("model", mid)
    safety = {"local_files_only": True, "use_safetensors": not model.allow_pickle, "trust_remote_code": model.allow_code}
    return (AutoModelForCausalLM.from_pretrained(path, **safety, **kwargs),
            AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=model.allow_code))  # fmt: skip
