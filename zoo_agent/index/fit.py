"""Will a host's tenants fit its memory budget? Pure arithmetic over the index and config.json (issue #20).

A tenant's footprint is the bytes of its weight files plus a KV-cache budget sized for
its worst case (full context for every sequence of a full batch). ``plan`` and ``apply``
prove the fit before anything switches; the resident uses the same numbers (and the
larger of estimate and measurement once a tenant has loaded) to decide what to evict.
Nothing here imports torch or reads weights: only ``read_config`` touches the disk, to parse a
version's ``config.json`` or, for a GGUF model, the header of its file (read with ``gguf``,
llama.cpp's own reader, which maps the file and parses only the metadata and tensor table).
The context budgeted is the tenant's declared ``max_context`` (default: the model's own, at
most ``DEFAULT_MAX_CONTEXT``; issue #33).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from zoo_agent.errors import Problem
from zoo_agent.formats import human_bytes, parse_memory
from zoo_agent.index.model import DEFAULT_MAX_CONTEXT, ArtifactEntry, Index, ModelEntry, Resources
from zoo_agent.jsonbound import loads

__all__ = [
    "CACHE_TYPE_BYTES", "DEFAULT_CONTEXT", "WEIGHT_SUFFIXES", "Footprint", "check_host", "context", "estimate", "first_gguf",
    "gguf_config", "kv_bytes", "pinned_tenants", "positions", "read_config", "tenant_footprint", "weight_bytes",
]  # fmt: skip

#: Files whose bytes are loaded into memory as weights; tokenizers and configs are noise.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".onnx", ".pkl", ".pickle", ".h5", ".msgpack")
#: Context assumed when config.json names none (an old GPT-2-style config without n_positions).
DEFAULT_CONTEXT = 2048
_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
#: A config.json number is counted up to this: beyond any real model's layers, heads or
#: context, and small enough that their product stays a number ``human_bytes`` can print
#: (a config of 10^400 layers was an OverflowError; issue #31).
_MAX_CONFIG_VALUE = 2**40
_MAX_CONFIG_BYTES = 16 << 20  # a config.json is kilobytes
#: Bytes per cached value of llama.cpp's KV cache types: q8_0 stores 32 values in 34 bytes.
CACHE_TYPE_BYTES: dict[str, Fraction] = {"f16": Fraction(2), "q8_0": Fraction(34, 32)}
#: A GGUF header is refused beyond these counts before the reader walks it (real models have
#: hundreds to a few thousand tensors and tens of metadata keys, plus the tokenizer's arrays).
_MAX_GGUF_TENSORS = 1 << 16
_MAX_GGUF_KEYS = 1 << 12
_FIRST_SPLIT = re.compile(r"-00001-of-\d{5}\.gguf$")



@dataclass(frozen=True)
class Footprint:
    """What one tenant needs in memory: its weights and the KV cache of a full batch at full context."""

    weights: int
    kv: int

    @property
    def total(self) -> int:
        return self.weights + self.kv

    def describe(self) -> str:
        return f"{human_bytes(self.total)} (weights {human_bytes(self.weights)} + KV {human_bytes(self.kv)})"


def weight_bytes(entry: ArtifactEntry) -> int:
    """Declared bytes of the entry's weight files (an ``ollama`` entry declares none: 0)."""
    return sum(f.size for f in entry.files if f.path.lower().endswith(WEIGHT_SUFFIXES))


def _field(config: dict[str, Any], *names: str) -> int | None:
    """The first positive integer among ``names``, in the text model's config first: a
    multimodal config keeps its language model (the part with a KV cache) in ``text_config``."""
    text = config.get("text_config")
    for where in (text, config) if isinstance(text, dict) else (config,):
        for name in names:
            value = where.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return min(value, _MAX_CONFIG_VALUE)
    return None


def _dtype(config: dict[str, Any], dtype: str) -> int:
    if dtype == "auto":
        text = config.get("text_config")
        for where in (text, config) if isinstance(text, dict) else (config,):
            named = where.get("torch_dtype") or where.get("dtype")
            if isinstance(named, str) and named.removeprefix("torch.") in _DTYPE_BYTES:
                return _DTYPE_BYTES[named.removeprefix("torch.")]
        return _DTYPE_BYTES["float32"]  # what transformers loads when nothing says otherwise
    return _DTYPE_BYTES.get(dtype, 4)


def positions(config: dict[str, Any]) -> int | None:
    """The positions the model was built for (``max_position_embeddings``, ``n_positions``,
    ``max_seq_len``), uncapped; None when its config names none."""
    return _field(config, "max_position_embeddings", "n_positions", "max_seq_len")


def context(config: dict[str, Any], max_context: int | None = None) -> int:
    """The tokens one sequence may hold: the declared ``max_context``, else the model's own
    (``max_position_embeddings``, ``n_positions``, ``max_seq_len``; else ``DEFAULT_CONTEXT``)
    capped at ``DEFAULT_MAX_CONTEXT``."""
    if max_context is not None:
        return max_context
    own = positions(config) or DEFAULT_CONTEXT
    return min(own, DEFAULT_MAX_CONTEXT)


def kv_bytes(config: dict[str, Any], *, dtype: str, max_batch: int, max_context: int | None = None,
             cache_type: str | None = None) -> int:
    """2 (K and V) x layers x KV heads x head size x bytes per value x context x ``max_batch``.

    From config.json: ``num_hidden_layers`` (``n_layer``), ``num_key_value_heads`` (else
    ``num_attention_heads``: no grouped-query attention), ``head_dim`` (else ``hidden_size``
    / heads); the context is ``context(config, max_context)``. Bytes per value: llama.cpp's
    ``cache_type`` when given (``CACHE_TYPE_BYTES``), else ``dtype`` ("auto" takes config's
    ``torch_dtype``, else float32). A config that names no layers or heads (not a decoder we
    know) counts 0.
    """
    layers = _field(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _field(config, "num_attention_heads", "n_head")
    if layers is None or heads is None:
        return 0
    kv_heads = _field(config, "num_key_value_heads") or heads
    head_dim = _field(config, "head_dim")
    if head_dim is None:
        hidden = _field(config, "hidden_size", "n_embd", "d_model")
        if hidden is None:
            return 0
        head_dim = hidden // heads
    per_value = CACHE_TYPE_BYTES[cache_type] if cache_type is not None else Fraction(_dtype(config, dtype))
    values = 2 * layers * kv_heads * head_dim * context(config, max_context) * max_batch
    return int(values * per_value)


def estimate(model: ModelEntry, resources: Resources, config: dict[str, Any] | None) -> Footprint:
    """The model's declared weight bytes and, when its config (config.json, or a GGUF model's
    header: ``gguf_config``) is known, the KV budget for ``resources.max_context`` x ``max_batch``.

    A GGUF model is served by llama.cpp, whose cache is ``resources.kv_cache_type`` (f16 unless
    declared). ``config`` None (an Ollama model, or a version not fetched yet) counts the KV
    cache as 0: a lower bound, which is what ``validate`` can check without the files."""
    cache_type = (resources.kv_cache_type or "f16") if model.format == "gguf" else None
    kv = kv_bytes(config, dtype=resources.dtype, max_batch=resources.max_batch, max_context=resources.max_context,
                  cache_type=cache_type) if config else 0  # fmt: skip
    return Footprint(weight_bytes(model), kv)


def tenant_footprint(idx: Index, tenant_id: str, config: dict[str, Any] | None) -> Footprint:
    """The tenant's model (``estimate``) plus what loads beside it: its adapters and the
    embedding model of adapter selection. ``config`` is the model's config.json. An embedding
    tenant (issue #36) keeps no KV cache: one forward pass's activations are transient, part of
    the documented slack, like the interpreter's."""
    tenant = idx.tenants[tenant_id]
    if tenant.is_remote:
        return Footprint(0, 0)  # a server elsewhere answers for it (backend 'openai'): nothing is loaded here
    base = estimate(idx.models[tenant.model], tenant.resources, config if tenant.kind != "embedding" else None)
    extra = sum(weight_bytes(idx.loras[lid]) for lid in tenant.loras if lid in idx.loras)
    if tenant.adapter_selection is not None and (embedder := idx.models.get(tenant.adapter_selection.embedding_model)):
        extra += weight_bytes(embedder)
    return Footprint(base.weights + extra, base.kv)


def read_config(version_dir: Path) -> dict[str, Any] | None:
    """config.json of a published or staged version, else (a GGUF model: no config.json) the
    config-shaped facts of its GGUF header (``gguf_config``); None when absent, unreadable or
    not a JSON object."""
    try:
        with open(version_dir / "config.json", "rb") as f:
            config = loads(f.read(_MAX_CONFIG_BYTES + 1), limit=_MAX_CONFIG_BYTES)  # the bounded reader: a deep one is refused
    except FileNotFoundError:
        gguf = first_gguf(version_dir)
        return gguf_config(gguf) if gguf is not None else None
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def first_gguf(version_dir: Path) -> Path | None:
    """The GGUF file whose header describes the model: the only one, or part 1 of a split set
    (``NAME-00001-of-0000N.gguf``, where llama.cpp keeps the metadata)."""
    try:
        found = sorted(p for p in version_dir.rglob("*.gguf") if p.is_file() and not p.is_symlink())
    except OSError:
        return None
    first = [p for p in found if _FIRST_SPLIT.search(p.name)]
    return (first or found)[0] if found else None


def gguf_config(path: Path) -> dict[str, Any] | None:
    """The facts of a GGUF file's header in config.json's names, for ``kv_bytes``: layers
    (``<arch>.block_count``), heads and KV heads (``<arch>.attention.head_count[_kv]``), head
    size (``<arch>.attention.key_length``, else ``embedding_length`` / heads), context
    (``<arch>.context_length``), plus ``gguf_architecture``, ``gguf_tensor_bytes`` (the
    tensors' bytes as the header lays them out) and, when the header names it, ``gguf_file_type``
    (``q4_k_m``, ``f32``). None for a file that is not a readable GGUF.

    The counts at the start of the file are checked before ``gguf.GGUFReader`` walks the
    header, so a file claiming billions of entries costs nothing; the reader maps the file
    and touches only the header's pages."""
    import gguf  # numpy and llama.cpp's reader, only when a GGUF model is fitted

    try:
        if (reader := _gguf_reader(path)) is None:
            return None
        arch = _gguf_value(reader, "general.architecture")
        if not isinstance(arch, str):
            return None
        config: dict[str, Any] = {"gguf_architecture": arch, "gguf_tensor_bytes": sum(int(t.n_bytes) for t in reader.tensors)}
        file_type = _gguf_value(reader, "general.file_type")
        if isinstance(file_type, int) and file_type in gguf.LlamaFileType._value2member_map_:
            config["gguf_file_type"] = gguf.LlamaFileType(file_type).name.lower().removeprefix("mostly_").removeprefix("all_")
        for name, key in (("num_hidden_layers", "block_count"), ("num_attention_heads", "attention.head_count"),
                          ("num_key_value_heads", "attention.head_count_kv"), ("head_dim", "attention.key_length"),
                          ("hidden_size", "embedding_length"), ("max_position_embeddings", "context_length")):  # fmt: skip
            value = _gguf_value(reader, f"{arch}.{key}")
            if isinstance(value, int) and not isinstance(value, bool):
                config[name] = value
        return config
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, OSError, struct.error):
        return None


def _gguf_reader(path: Path) -> Any:
    """llama.cpp's reader of ``path``'s header (a ``gguf.GGUFReader``), or None for a file that is not
    a GGUF or whose counts (checked first, from its first 24 bytes) would cost more than a header."""
    try:
        with open(path, "rb") as f:
            start = f.read(24)
    except OSError:
        return None
    if len(start) < 24 or start[:4] != b"GGUF":
        return None
    _version, tensors, keys = struct.unpack("<IQQ", start[4:24])
    if tensors > _MAX_GGUF_TENSORS or keys > _MAX_GGUF_KEYS:
        return None
    import gguf

    return gguf.GGUFReader(path, "r")


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF file's header says: its scalar and string metadata, and each tensor's shape (ggml's order: inner size first)."""

    fields: dict[str, object]
    shapes: dict[str, tuple[int, ...]]


def gguf_header(path: Path) -> GgufHeader | None:
    """The header of a GGUF file (an adapter's, whose facts ``gguf_config`` does not name); None for a
    file that is not a readable GGUF. Bounded as ``gguf_config`` is: only the header's pages are read."""
    import gguf

    try:
        if (reader := _gguf_reader(path)) is None:
            return None
        scalar = [key for key, field in reader.fields.items() if field.types and field.types[0] != gguf.GGUFValueType.ARRAY]  # not a vocabulary
        fields = {key: value for key in scalar if (value := _gguf_value(reader, key)) is not None}
        return GgufHeader(fields, {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors})
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, OSError, struct.error):
        return None


def gguf_lora_rank(header: GgufHeader) -> int | None:
    """A GGUF adapter's rank (``convert_lora_to_gguf.py``'s): the outer size of its first ``*.lora_a`` tensor ([in, r])."""
    if header.fields.get("adapter.type") != "lora":
        return None
    shape = next((shape for name, shape in header.shapes.items() if name.endswith(".lora_a")), None)
    return shape[1] if shape is not None and len(shape) == 2 and shape[1] >= 1 else None


def _gguf_value(reader: Any, key: str) -> object:
    """A scalar or string metadata value; None when absent or an array (per-layer head counts
    are arrays in some architectures: the largest then counts, an upper bound)."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.contents()
    if isinstance(value, list):
        numbers = [v for v in value if isinstance(v, int)]
        return max(numbers) if numbers else None
    return value


def pinned_tenants(idx: Index, host_id: str) -> tuple[str, ...]:
    """The host's served tenants that are pinned, in the host's order."""
    return tuple(t for t in dict.fromkeys(idx.hosts[host_id].served()) if t in idx.tenants and idx.tenants[t].pinned)


def check_host(idx: Index, host_id: str, footprints: dict[str, Footprint], *, weights_only: bool = False) -> list[Problem]:
    """Refuse a served tenant that cannot fit the budget alone, and pinned tenants that cannot fit together.

    A tenant missing from ``footprints`` counts its weights only; ``weights_only`` says so
    in the messages (what ``validate`` knows without config.json). No budget, no problems."""
    host = idx.hosts[host_id]
    if host.memory_budget is None:
        return []
    budget = parse_memory(host.memory_budget)
    at = f"/hosts/{host_id}/memory_budget"
    shown = f"the budget is {host.memory_budget} ({human_bytes(budget)})"
    served = [t for t in dict.fromkeys(host.served()) if t in idx.tenants and idx.tenants[t].model in idx.models]
    sizes = {t: footprints.get(t) or tenant_footprint(idx, t, None) for t in served}
    problems = []
    for t, f in sizes.items():
        if f.total > budget:
            need = human_bytes(f.weights) + " of weights alone" if weights_only else f.describe()
            over = f.total - budget
            by = f"{over:,} byte{'s' if over > 1 else ''} " if human_bytes(f.total) == human_bytes(budget) else ""  # same rounded figure
            problems.append(Problem(at, f"tenant {t} needs {need}, {by}more than the whole budget; {shown}"))
    pinned = [t for t in pinned_tenants(idx, host_id) if t in sizes]
    together = sum(sizes[t].total for t in pinned)
    need = "of weights alone" if weights_only else "together"
    if len(pinned) > 1 and together > budget:
        problems.append(Problem(at, f"pinned tenants {_named(pinned, sizes)} need {human_bytes(together)} {need}; {shown}"))
    elif pinned and together <= budget:
        # Pinned tenants are never evicted: another tenant only ever loads beside them.
        for t, f in sizes.items():
            if t not in pinned and f.total <= budget < f.total + together:
                what = f"{human_bytes(f.weights)} of weights alone" if weights_only else f.describe()
                problems.append(Problem(at, f"tenant {t} needs {what}, which cannot load beside the pinned "
                                            f"{'tenant' if len(pinned) == 1 else 'tenants'} {_named(pinned, sizes)} "
                                            f"(never evicted); {shown}"))
    return problems


def _named(tenants: list[str], sizes: dict[str, Footprint]) -> str:
    """'a (1.0 GB), b (2.0 GB) and c (3.0 GB)'."""
    each = [f"{t} ({human_bytes(sizes[t].total)})" for t in tenants]
    return each[0] if len(each) == 1 else ", ".join(each[:-1]) + f" and {each[-1]}"
