"""Alias links (issue #35): ``models/<alias>`` a relative link to a sibling model id, made only by ``apply``.

Only links recorded in ``host/aliases.json`` are ever followed, replaced or removed, and only to a sibling
id: a link the zoo did not make, or a directory, is never written through.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from zoo_agent import jsonbound
from zoo_agent.errors import StoreError, UsageError
from zoo_agent.index.model import ID_PATTERN
from zoo_agent.store.durable import DIR_MODE, FILE_MODE, fsync_dir, makedirs_durable, temp_name, write_atomic
from zoo_agent.store.layout import Layout

__all__ = ["Aliases"]

log = logging.getLogger("zoo_agent")


class Aliases(Layout):
    """The zoo's alias links: resolved for readers, made and removed by ``apply``."""

    def resolve_alias(self, name: str) -> str:
        """The model id ``name`` names: itself, or the id an alias link apply made points at (issue #35).
        Only links recorded in host/aliases.json count, and only to a sibling id: never a path elsewhere."""
        path = self.root / "models" / name
        if "/" in name or name in (".", "..") or not path.is_symlink():
            return name
        target = _alias_target(path) if name in self.recorded_aliases() else None
        if target is None:
            raise StoreError(f"{path}: is a link the zoo did not make; remove it, or name the model by its id")
        return target

    def recorded_aliases(self) -> dict[str, str]:
        """alias -> model id, as host/aliases.json records the links apply made."""
        try:
            doc = jsonbound.loads(self.aliases_record.read_bytes(), limit=1 << 20)
        except (OSError, ValueError):
            return {}
        models = doc.get("models") if isinstance(doc, dict) else None
        if not isinstance(models, dict):
            return {}
        return {k: v for k, v in models.items() if isinstance(v, str) and _ALIAS_NAME.match(k) and _ALIAS_NAME.match(v)}

    def alias_links(self, names: Iterable[str]) -> dict[str, str | None]:
        """What ``models/<name>`` is now, for each name given and each alias recorded: the id a
        link apply made names, "" when nothing is there, None when something it did not make is."""
        recorded = self.recorded_aliases()
        present: dict[str, str | None] = {}
        for name in sorted(set(names) | set(recorded)):
            path = self.root / "models" / name
            if not os.path.lexists(path):
                present[name] = ""
            else:
                present[name] = _alias_target(path) if name in recorded else None
        return present

    def link_alias(self, name: str, target: str) -> None:
        """Point ``models/<name>`` at ``models/<target>`` (a relative link, replaced atomically). Refuses,
        changing nothing, when anything but a link apply made is there: a directory is never replaced."""
        if not (_ALIAS_NAME.match(name) and _ALIAS_NAME.match(target)):
            raise UsageError(f"alias {name!r} -> {target!r}: not model ids")
        models = self.root / "models"
        path = models / name
        recorded = self.recorded_aliases()
        if os.path.lexists(path) and (name not in recorded or _alias_target(path) is None):
            raise StoreError(f"{path}: exists and the zoo did not make it; nothing there was changed. "
                             "Move it away (or run zoo-agent gc if it is an old model) or rename the alias")  # fmt: skip
        # The record first: a kill in between leaves a record of a link not made yet, never a link we forget.
        self._record_aliases({**recorded, name: target})
        makedirs_durable(models, DIR_MODE)
        tmp = temp_name(path)
        os.symlink(target, tmp)
        try:
            if os.path.lexists(path) and _alias_target(path) is None:  # taken since the check above: leave it
                raise StoreError(f"{path}: appeared while linking the alias; nothing there was changed")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(models)

    def unlink_alias(self, name: str) -> None:
        """Remove ``models/<name>`` if it is a link apply made; anything else there stays."""
        recorded = self.recorded_aliases()
        path = self.root / "models" / name
        if name in recorded and _alias_target(path) is not None:
            path.unlink()
            fsync_dir(path.parent)
        elif os.path.lexists(path):
            log.warning("%s: not an alias link the zoo made; left as it is", path)
        self._record_aliases({k: v for k, v in recorded.items() if k != name})

    def _record_aliases(self, aliases: Mapping[str, str]) -> None:
        makedirs_durable(self.host_dir, DIR_MODE)
        write_atomic(self.aliases_record, (json.dumps({"models": dict(sorted(aliases.items()))}, indent=2) + "\n").encode(), FILE_MODE)



_ALIAS_NAME = re.compile(ID_PATTERN)


def _alias_target(path: Path) -> str | None:
    """The sibling model id a link names ("qwen", never "../x" or "/x"), or None: not such a link."""
    try:
        target = os.readlink(path)
    except OSError:
        return None
    return target if _ALIAS_NAME.match(target) and target not in (".", "..") else None
