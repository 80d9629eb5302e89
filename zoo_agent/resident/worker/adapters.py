"""LoRA adapters on the resident model (issue #6): checked, loaded with peft, kept LRU.

Only adapters the index declares and the zoo verified reach here; each is checked again
against its own `adapter_config.json` (rank, base model, target modules) before peft
sees it. Every method runs on the one thread that runs the model (the batching engine's,
or the one generate() thread), so `set_adapter` being global in peft cannot leak one
request's adapter into another's; a batch that mixes adapters uses peft's `adapter_names`.

Compositions (issue #21) are cached per combination beside the single adapters, also LRU and
at most max_loras of them: a "sum" composition is peft's multiple active adapters (nothing to
build; its adapters must stay loaded while it runs), a "weighted" one is a peft adapter of its
own, built once by `add_weighted_adapter`. Either is made only of adapters the tenant declares
and that are not refused, checked here again whatever the caller chose.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from zoo_agent.errors import AdapterError
from zoo_agent.resident.config import AdapterConfig
from zoo_agent.resident.engine.base import AdaptersBusy
from zoo_agent.resident.worker.selection import Composition

__all__ = ["AdapterError", "Adapters", "check_adapter"]

log = logging.getLogger("zoo_agent.resident")


def check_adapter(adapter: AdapterConfig, base_names: tuple[str, ...], module_names: set[str]) -> dict[str, Any]:
    """The index's promises about an adapter, checked against the adapter's own config."""
    path = adapter.dir / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{adapter.label}: {path.name}: cannot be read ({exc})") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f"{adapter.label}: {path.name}: peft_type is {config.get('peft_type') if isinstance(config, dict) else None!r}, not 'LORA'")
    if config.get("r") != adapter.rank:
        raise AdapterError(f"{adapter.label}: {path.name}: r is {config.get('r')}, the index declares rank {adapter.rank}")
    base = config.get("base_model_name_or_path")
    if base and base not in base_names:
        raise AdapterError(f"{adapter.label}: {path.name}: base_model_name_or_path is '{base}', but this tenant serves {' or '.join(repr(n) for n in base_names)}")
    targets = config.get("target_modules") or []
    for target in [targets] if isinstance(targets, str) and not targets.isidentifier() else list(targets):
        if isinstance(target, str) and target.isidentifier() and not any(n == target or n.endswith("." + target) for n in module_names):
            raise AdapterError(f"{adapter.label}: {path.name}: target module '{target}' is not in the base model")
    return config


@dataclass
class AdapterStats:
    loads: int = 0
    load_failures: int = 0
    swaps: int = 0
    evictions: int = 0
    compositions_built: int = 0  # weighted compositions built with add_weighted_adapter
    last_seconds: float = 0.0
    seconds: list[float] = field(default_factory=list)  # drained into the histogram by the API


class Adapters:
    """Declared adapters, the loaded ones (least recently used first), and the model a generation runs."""

    def __init__(self, base: Any, declared: tuple[AdapterConfig, ...], *, max_loras: int, base_names: tuple[str, ...],
                 refused: dict[str, str] | None = None) -> None:  # fmt: skip
        self.base = base
        self.peft: Any = None
        self.declared = {a.id: a for a in declared}
        self.loaded: OrderedDict[str, AdapterConfig] = OrderedDict()
        self.configs: dict[str, dict[str, Any]] = {}
        self.refused: dict[str, str] = dict(refused or {})
        self.compositions: OrderedDict[str, Composition] = OrderedDict()  # by peft name, least recently used first
        self.max_loras, self.base_names = max_loras, base_names
        self.module_names = {name for name, _ in base.named_modules()}
        self.stats = AdapterStats()

    def preload(self) -> None:
        """At start: as many declared adapters as max_loras allows; a bad one is refused, the rest still load."""
        for aid in list(self.declared)[: self.max_loras]:
            try:
                self.load(aid)
            except AdapterError as exc:
                log.warning("%s", exc)

    def load(self, aid: str, busy: frozenset[str] = frozenset()) -> float:
        """Make ``aid`` resident (most recently used); returns the seconds it took (0 when it was).
        The least recently used adapter not in ``busy`` (in use by a running batch, also as part of
        a composition there) makes room."""
        if aid in self.loaded:
            self.loaded.move_to_end(aid)
            return 0.0
        adapter = self._declared(aid)
        pinned = self._pinned(busy)
        if len(self.loaded) >= self.max_loras and all(a in pinned for a in self.loaded):
            raise AdaptersBusy(aid)
        started = time.perf_counter()
        try:
            self.configs[aid] = check_adapter(adapter, self.base_names, self.module_names)
            while len(self.loaded) >= self.max_loras:
                self._evict(next(a for a in self.loaded if a not in pinned))
            self._attach(adapter)
        except AdapterError as exc:
            self.stats.load_failures += 1
            self.refused[aid] = str(exc)
            raise
        except Exception as exc:  # noqa: BLE001 - peft's errors, in one line
            self.stats.load_failures += 1
            self.refused[aid] = f"{adapter.label}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            raise AdapterError(self.refused[aid]) from exc
        self.refused.pop(aid, None)
        self.loaded[aid] = adapter
        seconds = time.perf_counter() - started
        self.stats.loads += 1
        self._timed(seconds)
        log.info("adapter %s loaded in %.0f ms", adapter.label, seconds * 1000)
        return seconds

    def unload(self, aid: str) -> None:
        if aid not in self.loaded:
            raise AdapterError(f"adapter '{aid}' is not loaded")
        self._evict(aid, counted=False)
        self._forget(aid)

    def compose(self, composition: Composition, busy: frozenset[str] = frozenset()) -> str:
        """Make ``composition`` ready to run; returns its name for `using` (and peft's adapter_names).
        Its adapters are loaded first; the least recently used composition not in ``busy`` makes room."""
        for aid in composition.ids:
            self._declared(aid)
            if aid in self.refused:
                raise AdapterError(f"adapter '{aid}' is refused, so it is never composed: {self.refused[aid]}")
        if len(composition.ids) > self.max_loras:  # the index refuses this; a hand-made config might not
            raise AdapterError(f"a composition of {len(composition.ids)} adapters needs them loaded at once, but max_loras is {self.max_loras}")
        name = composition.name
        for aid in composition.ids:
            self.load(aid, busy=busy | set(composition.ids) | {name})
        if name in self.compositions:
            self.compositions.move_to_end(name)
            return name
        if len(self.compositions) >= self.max_loras:
            pinned = self._pinned(busy)
            victim = next((n for n in self.compositions if n not in pinned), None)
            if victim is None:
                raise AdaptersBusy(name)
            self._drop(victim)
        if composition.combine == "weighted":
            started = time.perf_counter()
            # "cat" stacks the adapters' A and B matrices (rank = the sum of theirs): exactly
            # sum(weight * scale * B @ A), for any ranks and target modules; "linear" and "svd" approximate.
            self.peft.add_weighted_adapter(list(composition.ids), list(composition.weights), name, combination_type="cat")
            self.peft.eval()
            self.stats.compositions_built += 1
            log.info("composition %s of %s built in %.0f ms", name, "+".join(composition.ids), (time.perf_counter() - started) * 1000)
        self.compositions[name] = composition
        return name

    def exclusive(self, name: str | None) -> bool:
        """Whether sequences running ``name`` must be decoded in a batch of their own: a "sum"
        composition activates several adapters at once, and peft's per-row ``adapter_names`` names one."""
        composition = self.compositions.get(name) if name is not None else None
        return composition is not None and composition.combine == "sum"

    def update(self, declared: tuple[AdapterConfig, ...]) -> list[str]:
        """New versions from `apply`: swapped in place when loaded, else used from the next load. Returns what changed."""
        changed = []
        new = {a.id: a for a in declared}
        for aid in [a for a in self.loaded if a not in new]:
            self._evict(aid, counted=False)
        for aid in {a for c in self.compositions.values() for a in c.ids} - set(new):
            self._forget(aid)  # also where it was no longer loaded: a weighted composition holds its weights
        for aid, adapter in new.items():
            old = self.declared.get(aid)
            if old is not None and old.version == adapter.version and old.dir == adapter.dir:
                continue
            self.declared[aid] = adapter
            self._forget(aid)  # a composition holds the old version's weights
            if aid in self.loaded:
                try:
                    self._swap(adapter)
                except Exception as exc:  # noqa: BLE001 - the old version keeps serving
                    self.declared[aid] = self.loaded[aid]
                    self.refused[adapter.label] = str(exc) if isinstance(exc, AdapterError) else f"{adapter.label}: {type(exc).__name__}: {exc}"
                    log.warning("%s; %s keeps serving", self.refused[adapter.label], self.loaded[aid].label)
                    continue
            changed.append(adapter.label)
        for aid in [a for a in self.declared if a not in new]:
            del self.declared[aid]
        return changed

    @contextmanager
    def using(self, aid: str | None) -> Iterator[Any]:
        """The model to call generate() on: the base model, or the base with exactly ``aid`` active."""
        if aid is None:
            if self.peft is not None and self.loaded:
                with self.peft.disable_adapter():
                    yield self.peft
            else:
                yield self.base  # no LoRA layer is active (peft cannot disable when none is loaded)
            return
        if (composition := self.compositions.get(aid)) is not None:
            self.compositions.move_to_end(aid)
            if composition.combine == "sum":
                for member in composition.ids:
                    self.load(member, busy=frozenset(composition.ids))
                self.peft.base_model.set_adapter(list(composition.ids))  # PeftModel's own takes one name
            else:
                self.peft.set_adapter(aid)
            yield self.peft
            return
        self.load(aid)
        self.peft.set_adapter(aid)
        yield self.peft

    def _pinned(self, busy: frozenset[str]) -> frozenset[str]:
        """``busy`` and the adapters its "sum" compositions activate: none of them may be unloaded now."""
        members = [c.ids for n, c in self.compositions.items() if n in busy and c.combine == "sum"]
        return busy.union(*members)

    def _declared(self, aid: str) -> AdapterConfig:
        if aid not in self.declared:
            raise AdapterError(f"adapter '{aid}' is not declared for this tenant (declared: {', '.join(sorted(self.declared)) or 'none'})")
        return self.declared[aid]

    def _attach(self, adapter: AdapterConfig) -> None:
        if self.peft is None:
            from peft import PeftModel

            self.peft = PeftModel.from_pretrained(self.base, str(adapter.dir), adapter_name=adapter.id, is_trainable=False)
        else:
            self.peft.load_adapter(str(adapter.dir), adapter_name=adapter.id, is_trainable=False)
        self.peft.eval()

    def _evict(self, aid: str, counted: bool = True) -> None:
        self._delete(aid)
        del self.loaded[aid]
        if counted:
            self.stats.evictions += 1
        log.info("adapter %s unloaded", aid)

    def _forget(self, aid: str) -> None:
        """Compositions made with ``aid`` go: it was unloaded on request, changed version or left the index."""
        for name in [n for n, c in self.compositions.items() if aid in c.ids]:
            self._drop(name)

    def _drop(self, name: str) -> None:
        if self.compositions.pop(name).combine == "weighted":
            self._delete(name)
        log.info("composition %s dropped", name)

    def _delete(self, name: str) -> None:
        """An adapter (or weighted composition) out of peft."""
        others = [a for a in self.peft.peft_config if a != name]
        if others:  # never delete the active adapter: peft would warn and pick one itself
            self.peft.set_adapter(others[-1])
        with warnings.catch_warnings():
            # Deleting the last adapter leaves none active; `using` never asks peft for one then.
            warnings.simplefilter("ignore", UserWarning)
            self.peft.delete_adapter(name)

    def _swap(self, adapter: AdapterConfig) -> None:
        """In place when rank and target modules allow (peft's hotswap), else unload and load."""
        started = time.perf_counter()
        old = self.configs.get(adapter.id, {})
        config = check_adapter(adapter, self.base_names, self.module_names)
        if (config.get("r"), config.get("target_modules")) == (old.get("r"), old.get("target_modules")):
            from peft.utils.hotswap import hotswap_adapter

            hotswap_adapter(self.peft, str(adapter.dir), adapter_name=adapter.id)
            self.loaded[adapter.id] = adapter
        else:
            self._evict(adapter.id, counted=False)
            self._attach(adapter)
            self.loaded[adapter.id] = adapter
        self.configs[adapter.id] = config
        self.stats.swaps += 1
        self._timed(time.perf_counter() - started)
        log.info("adapter %s swapped in place in %.0f ms", adapter.label, self.stats.last_seconds * 1000)

    def _timed(self, seconds: float) -> None:
        self.stats.last_seconds = seconds
        self.stats.seconds.append(seconds)
