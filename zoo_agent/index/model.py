"""The index.json contract: pydantic models, the one source of truth for schema.json.

Entries are objects keyed by id (``models``, ``loras``, ``tenants``, ``hosts``), so ids
are unique by construction, diffs stay small and the NixOS module can type them as
``attrsOf submodule``. Loading and checking live in ``validate.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from zoo_agent.formats import MEMORY_PATTERN, parse_timespan

__all__ = [
    "DEFAULT_MAX_CONTEXT",
    "MAX_CONTEXT",
    "ArtifactEntry",
    "CheckpointRetention",
    "FileEntry",
    "FileSource",
    "Generation",
    "HfSource",
    "HostEntry",
    "Index",
    "LoraEntry",
    "ModelEntry",
    "OllamaSource",
    "Priority",
    "Provenance",
    "RemoteEntry",
    "Resources",
    "Retention",
    "RouteEntry",
    "RouteRule",
    "RouteWhen",
    "Source",
    "TenantEntry",
    "UrlSource",
]

ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
REVISION_PATTERN = r"^[0-9a-f]{40}$"
# A version label becomes a directory name; ".tmp" is reserved for staging directories.
VERSION_PATTERN = r"^(?!.*\.tmp)[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
HF_REPO_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
OLLAMA_NAME_PATTERN = r"^[a-z0-9][a-z0-9._/-]{0,127}:[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
OLLAMA_DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
URL_PATTERN = r"^https?://[^\s/]+(/\S*)?$"
#: A remote tenant's base URL: https, or http to this machine only (the tenant's key travels with
#: every request and poll, and its answers reach our clients: neither crosses a network in clear).
REMOTE_URL_PATTERN = r"^(?:https://[^\s/?#@]+|http://(?:localhost|127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}|\[::1\])(?::[0-9]{1,5})?)(?:/[^\s?#]*)?$"
#: The name a remote serves a model under: 'gpt-4o-mini', 'meta-llama/Llama-3.1-8B-Instruct', 'qwen2.5:7b'.
REMOTE_MODEL_PATTERN = r"^[\x21-\x7e]+$"
#: A systemd credential's name, as the resident's unit loads it (``LoadCredential=NAME:PATH``).
CREDENTIAL_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
#: A remote tenant's key: an absolute path, or the name of a systemd credential.
KEY_FILE_PATTERN = r"^(?:/[^\x00-\x1f\x7f]*|" + CREDENTIAL_PATTERN + ")$"
#: The credentials the resident's own unit loads (``systemd/units.py``): a remote tenant's key is never one of
#: them, or an index could send the fleet's or the clients' key to a server of its choosing.
OWN_CREDENTIALS = frozenset({"api-key", "fleet-key", "priority-key", "hf-token"})
#: A tag: lowercase words joined by hyphens ("code-review"), as adapters and models carry them.
TAG_PATTERN = r"^[a-z0-9]+(?:-[a-z0-9]+)*$"
#: A source-control commit: 7 to 64 lowercase hex characters (git's short or full id, sha1 or sha256).
COMMIT_PATTERN = r"^[0-9a-f]{7,64}$"
#: An ISO 8601 date, or date and time with an optional offset ('2026-01-31', '2026-01-31T12:00:00Z').
TIMESTAMP_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?(?:Z|[+-][0-9]{2}:?[0-9]{2})?)?$"
#: The largest integer every JSON reader holds exactly (JavaScript's, jq's); Nix's too. A
#: field that counts bytes, a seed: nothing real comes near it (issue #31).
MAX_EXACT_INT = 2**53 - 1
#: Words, messages, top-k: a 1 MiB request holds fewer than a million of any of them.
MAX_COUNT = 1_000_000
#: The least cosine similarity that counts when the index names none (adapter selection, route rules).
DEFAULT_SIMILARITY = 0.7

#: Common SPDX identifiers; anything else is ``other`` or an SPDX ``LicenseRef-``.
LICENSES: tuple[str, ...] = (
    "Apache-2.0", "MIT", "BSD-2-Clause", "BSD-3-Clause", "ISC", "Unlicense", "CC0-1.0",
    "MPL-2.0", "GPL-2.0-only", "GPL-2.0-or-later", "GPL-3.0-only", "GPL-3.0-or-later",
    "LGPL-2.1-only", "LGPL-3.0-only", "AGPL-3.0-only", "CC-BY-4.0", "CC-BY-SA-4.0",
    "CC-BY-NC-4.0", "CC-BY-NC-SA-4.0", "CC-BY-NC-ND-4.0", "OpenRAIL", "OpenRAIL-M",
    "CreativeML-OpenRAIL-M", "Llama-2", "Llama-3", "Gemma", "other",
)  # fmt: skip
LICENSE_PATTERN = (
    "^(?:" + "|".join(name.replace(".", r"\.") for name in LICENSES) + r"|LicenseRef-[A-Za-z0-9.-]+)$"
)

Id = Annotated[str, Field(pattern=ID_PATTERN)]


def _not_null(value: object) -> object:
    """Optional fields are left out, never null: the published schema says the same."""
    if value is None:
        raise ValueError("must not be null; leave the field out instead")
    return value


NotNull = BeforeValidator(_not_null)
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN, description="sha256 of the file: 64 lowercase hex characters.")]


class _Strict(BaseModel):
    """Unknown keys are errors: a typo such as ``verison`` must not pass silently."""

    # python-re: the same regex dialect jsonschema uses (the Rust engine lacks look-ahead).
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, regex_engine="python-re")


class FileEntry(_Strict):
    """One file of an artifact, pinned by size and digest."""

    path: str = Field(
        min_length=1,
        max_length=4096,
        description="Path inside the version directory: relative, normalized, '/' separated, no '..'.",
    )
    sha256: Sha256
    size: int = Field(gt=0, le=MAX_EXACT_INT, description="Size in bytes; a positive integer (at most 2^53-1).")


class HfSource(_Strict):
    """A Hugging Face hub repository (or a mirror at HF_ENDPOINT), pinned to a commit."""

    type: Literal["hf"] = Field(description="Fetch from the Hugging Face hub.")
    repo: str = Field(pattern=HF_REPO_PATTERN, description="Repository id, 'org/name'.")
    revision: str = Field(
        pattern=REVISION_PATTERN,
        description="Full 40-hex commit id; branches and tags move, so they are refused.",
    )


class OllamaSource(_Strict):
    """A model pulled by an Ollama daemon, pinned to its manifest digest."""

    type: Literal["ollama"] = Field(description="Pull through an Ollama daemon.")
    name: str = Field(pattern=OLLAMA_NAME_PATTERN, description="Model name with tag, 'name:tag'.")
    digest: str = Field(
        pattern=OLLAMA_DIGEST_PATTERN,
        description="Manifest digest the tag must resolve to, 'sha256:<64 hex>'.",
    )


class UrlSource(_Strict):
    """Plain HTTP(S): each file is fetched from ``base_url`` + '/' + its path."""

    type: Literal["url"] = Field(description="Fetch each file over HTTP(S).")
    base_url: str = Field(pattern=URL_PATTERN, description="URL the file paths are appended to.")


class FileSource(_Strict):
    """A local directory (air-gapped hosts, shared storage, training pipelines, tests)."""

    type: Literal["file"] = Field(description="Copy from a local directory.")
    path: str = Field(
        min_length=1,
        description="Directory holding the files; relative paths are relative to the index file.",
    )


Source = Annotated[HfSource | OllamaSource | UrlSource | FileSource, Field(discriminator="type")]
SOURCE_TYPES: tuple[str, ...] = ("hf", "ollama", "url", "file")

Tag = Annotated[str, Field(pattern=TAG_PATTERN, max_length=64)]
#: Any JSON number; ``int | float`` so that 1000 stays 1000 on its way into manifest.json.
Number = Annotated[int | float, WithJsonSchema({"type": "number"})]
Text = Annotated[str, Field(min_length=1, max_length=1000)]


class ProvenanceDataset(_Strict):
    """The data an artifact was trained on (issue #35)."""

    id: Text = Field(description="Dataset name, e.g. a hub id 'org/name' or an internal name.")
    revision: Annotated[Annotated[str, Field(min_length=1, max_length=100)] | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="The dataset's commit, version or snapshot id.")
    url: Annotated[Annotated[str, Field(pattern=URL_PATTERN, max_length=1000)] | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="Where the dataset can be found.")


class ProvenanceTraining(_Strict):
    """The code that produced an artifact."""

    repository: Text = Field(description="Repository of the training code (URL or name).")
    commit: Annotated[Annotated[str, Field(pattern=COMMIT_PATTERN)] | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="Commit of the training code: 7 to 64 lowercase hex characters.")
    command: Annotated[Text | SkipJsonSchema[None], NotNull] = Field(default=None, description="The command line that trained it.")


class ProvenanceRun(_Strict):
    """One training run and what it measured."""

    id: Annotated[Text | SkipJsonSchema[None], NotNull] = Field(default=None, description="Run id in the tracker (MLflow, W&B, ...).")
    metrics: dict[Annotated[str, Field(min_length=1, max_length=64)], Number] = Field(
        default={}, max_length=256, description="Final metrics by name, each a number, e.g. {\"loss\": 2.143}.")


class ProvenanceReproducibility(_Strict):
    """What a rerun needs to give the same artifact."""

    seed: Annotated[Annotated[int, Field(ge=0)] | SkipJsonSchema[None], NotNull] = Field(default=None, description="Random seed of the run.")
    environment: dict[Annotated[str, Field(min_length=1, max_length=100)], Annotated[str, Field(max_length=1000)]] = Field(
        default={}, max_length=256,
        description="Package or tool -> version or image digest, e.g. {\"torch\": \"2.4.0\", \"image\": \"sha256:...\"}.")


class Provenance(_Strict):
    """Where an artifact came from, typed (issue #35). Keys other than the typed ones are
    free-form facts whose values are strings: the provenance maps indexes wrote before keep
    validating unchanged."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Annotated[str, Field(max_length=1000)]] = Field(init=False)

    dataset: Annotated[ProvenanceDataset | SkipJsonSchema[None], NotNull] = Field(default=None, description="The training data.")
    training: Annotated[ProvenanceTraining | SkipJsonSchema[None], NotNull] = Field(default=None, description="The training code.")
    run: Annotated[ProvenanceRun | SkipJsonSchema[None], NotNull] = Field(default=None, description="The training run and its metrics.")
    reproducibility: Annotated[ProvenanceReproducibility | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="Seed and environment of the run.")
    created_by: Annotated[Text | SkipJsonSchema[None], NotNull] = Field(default=None, description="Who or what made it (a person, a CI job).")
    created_at: Annotated[Annotated[str, Field(pattern=TIMESTAMP_PATTERN)] | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="When it was made: an ISO 8601 date or date and time.")


Format = Literal["safetensors", "gguf", "onnx", "pickle", "ollama"]
#: The most tokens a tenant may declare as its context (``resources.max_context``), and the
#: context a tenant that declares none gets when its model's own is longer (issue #33).
MAX_CONTEXT = 1 << 20
DEFAULT_MAX_CONTEXT = 4096
#: Request classes, highest first: waiting requests are served in this order (issue #20).
Priority = Literal["system", "realtime", "default", "batch"]


class ArtifactEntry(_Strict):
    """What models and LoRA adapters share: a versioned, pinned set of files."""

    version: str = Field(
        pattern=VERSION_PATTERN,
        description=(
            "Version label. A published version is immutable: new bytes need a new label. "
            "Letters, digits, '.', '_', '+', '-'; at most 64; must not contain '.tmp'."
        ),
    )
    source: Source = Field(description="Where the files come from, pinned.")
    files: list[FileEntry] = Field(
        default=[],
        description="Every file with its size and sha256; empty only for an 'ollama' source.",
    )
    format: Format = Field(default="safetensors", description="Weight format of the files.")
    license: str = Field(
        pattern=LICENSE_PATTERN,
        description="SPDX license identifier (e.g. Apache-2.0, MIT), 'LicenseRef-...', or 'other'.",
    )
    description: str = Field(default="", max_length=1000, description="What it is for, in a sentence.")
    provenance: Provenance = Field(
        default=Provenance(),
        description="Where it came from: typed dataset, training, run (with numeric metrics), reproducibility, created_by, "
        "created_at; any other key is a free-form fact whose value is a string.",
    )
    allow_pickle: bool = Field(
        default=False,
        description="Allow pickle weight files (.bin, .pt, .pth, .ckpt, .pkl); loading pickle runs code.",
    )
    allow_code: bool = Field(default=False, description="Allow Python files from the repository to be loaded.")

    def metadata(self) -> dict[str, Any]:
        """The declared facts the zoo records beside the files (manifest.json, model-info.json), as the index wrote them."""
        return {"description": self.description, "license": self.license, "format": self.format,
                "tags": list(getattr(self, "tags", ())),  # models and adapters declare tags; the base has none
                "provenance": self.provenance.model_dump(mode="json", by_alias=True, exclude_defaults=True)}  # fmt: skip


class ModelEntry(ArtifactEntry):
    """A base model."""

    tags: list[Tag] = Field(default=[], max_length=64, description="Keywords: lowercase words joined by hyphens, e.g. 'code-review'.")
    aliases: list[Id] = Field(
        default=[], max_length=64,
        description="Other names for this model: apply links models/<alias> to models/<id> (read-only), and zoo_agent.open(...) "
        "resolves them. Each is unique among model, adapter, tenant and route ids and other aliases.",
    )  # fmt: skip


class LoraEntry(ArtifactEntry):
    """A LoRA adapter (a PEFT adapter directory) for one base model."""

    base_model: Id = Field(description="Id of the model this adapter was trained for.")
    rank: int = Field(ge=1, le=4096, description="LoRA rank r, as in adapter_config.json.")
    tags: list[Tag] = Field(
        default=[], max_length=64, description="Keywords for choosing the adapter by task: lowercase words joined by hyphens.")


class Generation(_Strict):
    """Generation defaults; a request may override them."""

    max_tokens: int = Field(default=256, ge=1, le=1_000_000, description="Default completion length.")
    temperature: float = Field(default=0.7, ge=0, le=2, description="0 means greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(default=0, ge=0, le=MAX_COUNT, description="Top-k sampling; 0 turns it off.")
    seed: Annotated[Annotated[int, Field(ge=0, le=MAX_EXACT_INT)] | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="Seed for reproducible sampling."
    )


class Resources(_Strict):
    """Limits of the resident serving this tenant."""

    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where the model runs.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(default="auto", description="Weight dtype.")
    memory_max: Annotated[Annotated[str, Field(pattern=MEMORY_PATTERN)] | SkipJsonSchema[None], NotNull] = Field(
        default=None,
        description="Memory ceiling in systemd's notation (e.g. '8G'); decides whether a swap may load two at once.",
    )
    max_batch: int = Field(
        default=16, ge=1, le=256,
        description="Sequences decoded together (continuous batching); 1 serves one request at a time. KV cache memory grows with it.",
    )  # fmt: skip
    max_context: Annotated[Annotated[int, Field(ge=1, le=MAX_CONTEXT)] | SkipJsonSchema[None], NotNull] = Field(
        default=None,
        description="Tokens one sequence may hold (prompt plus completion), for every backend: the memory fit budgets the KV "
                    f"cache for it (x max_batch). Default: the model's own context, at most {DEFAULT_MAX_CONTEXT}.",
    )  # fmt: skip
    gpu_layers: Annotated[Annotated[int, Field(ge=0, le=4096)] | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="backend 'llama.cpp' only: layers offloaded to the GPU (llama-server --n-gpu-layers); default none.")
    kv_cache_type: Annotated[Literal["f16", "q8_0"] | SkipJsonSchema[None], NotNull] = Field(
        default=None,
        description="backend 'llama.cpp' only: the KV cache's type (llama-server --cache-type-k/-v); default f16. "
                    "q8_0 takes about half the memory.",
    )  # fmt: skip
    max_queue: int = Field(default=16, ge=1, le=4096, description="Requests waiting behind a full batch before 429.")
    max_loras: int = Field(default=8, ge=1, le=1024, description="Adapters kept loaded at once (LRU).")


class AdapterSelection(_Strict):
    """`model: "<tenant>:auto"`: the adapters whose description and tags are nearest the request,
    composed when more than one passes the threshold (issue #21)."""

    embedding_model: Id = Field(description="Id of a sentence-embedding model in 'models' (fetched with the tenant).")
    threshold: float = Field(
        default=DEFAULT_SIMILARITY, ge=-1, le=1, description="Least cosine similarity for an adapter to be chosen; below it, the base model answers."
    )
    max_adapters: int = Field(
        default=3, ge=1, le=8,
        description="Most adapters composed for one request: those at or above the threshold, most similar first; "
                    "1 answers with the single nearest adapter. At most resources.max_loras.",
    )  # fmt: skip
    combine: Literal["sum", "weighted"] = Field(
        default="sum",
        description="How chosen adapters are composed. 'sum': peft's multiple active adapters (set_adapter with a list), each at "
                    "its own scale, their outputs added; such a request is decoded in a batch of its own composition. 'weighted': "
                    "one adapter built by peft's add_weighted_adapter (combination_type 'cat', exact for any ranks and target "
                    "modules), weights the similarities normalised to sum 1 and rounded to 0.05; it batches with other requests.",
    )  # fmt: skip


def _timespan(spec: str | None) -> str | None:
    """A time span systemd would read, of at least a second."""
    if spec is None:
        return None
    try:
        seconds = parse_timespan(spec)
    except ValueError as exc:
        raise PydanticCustomError("timespan", str(exc).replace("{", "(").replace("}", ")")) from None
    if seconds < 1:
        raise PydanticCustomError("timespan", "'{spec}' is shorter than a second", {"spec": spec})
    return spec


def _idle_span(spec: str | None) -> str | None:
    """keep_alive (issue #34): a time span systemd would read; 0 is allowed (unloaded as soon as it is idle)."""
    if spec is not None:
        try:
            parse_timespan(spec)
        except ValueError as exc:
            raise PydanticCustomError("timespan", str(exc).replace("{", "(").replace("}", ")")) from None
    return spec


class CheckpointRetention(_Strict):
    """Named checkpoints of each session (`zoo-agent sessions checkpoint`, issue #36): how many each
    session keeps, and how often one is taken on its own."""

    keep: int = Field(default=10, ge=1, le=1000, description="Checkpoints kept per session; the oldest go first.")
    every: Annotated[Annotated[str, Field(min_length=1, max_length=100)] | SkipJsonSchema[None], NotNull, AfterValidator(_timespan)] = Field(
        default=None,
        description="Take a checkpoint on its own, after a turn, once the session's newest checkpoint (or its start) is this old, "
                    "in systemd's time-span notation ('1h', '30min', '1h 30min'); an idle session is not checkpointed again.",
    )  # fmt: skip

    @property
    def seconds(self) -> float | None:
        """``every`` in seconds (None: no timed checkpoints)."""
        return None if self.every is None else parse_timespan(self.every)


class SessionRetention(_Strict):
    """How many conversations a tenant keeps, and for how long (`zoo-agent sessions prune`)."""

    keep: int = Field(default=1000, ge=0, le=1_000_000, description="Sessions kept, most recently used first.")
    max_age_days: int = Field(default=90, ge=1, le=36500, description="Sessions unused for longer are removed.")
    checkpoints: CheckpointRetention = Field(default=CheckpointRetention(), description="Named checkpoints of each session.")


class RemoteEntry(_Strict):
    """An OpenAI-compatible server elsewhere that answers for a tenant (``backend: "openai"``, issue #36):
    a cloud provider, a vLLM server, another llama-server. Nothing to fetch, no memory here, never paged."""

    base_url: str = Field(
        pattern=REMOTE_URL_PATTERN, max_length=300,
        description="The server's OpenAI base URL, as an OpenAI client takes it (e.g. 'https://api.openai.com/v1'): requests go to "
                    "<base_url>/chat/completions and <base_url>/completions, its health to <base_url>/models. 'https://', or 'http://' "
                    "to this machine only (localhost, 127.x.x.x, [::1]): the key travels with every request.",
    )  # fmt: skip
    model: str = Field(
        min_length=1, max_length=200, pattern=REMOTE_MODEL_PATTERN,
        description="The model name the remote serves it under (what its /models lists, e.g. 'gpt-4o-mini'); requests go out with it.",
    )
    key_file: Annotated[Annotated[str, Field(pattern=KEY_FILE_PATTERN, max_length=4096)] | SkipJsonSchema[None], NotNull] = Field(
        default=None,
        description="The remote's API key, sent as 'Authorization: Bearer' to base_url only: an absolute path, or the name of a "
                    "systemd credential of the resident's unit (read from $CREDENTIALS_DIRECTORY; NixOS: "
                    "services.model-zoo.resident.credentials). Read at start and at every reload. None: no key is sent.",
    )  # fmt: skip
    max_concurrent: int = Field(
        default=4, ge=1, le=1024, description="Requests sent to the remote at once; more wait here (best priority first), "
                                               "up to resources.max_queue, then 429.")  # fmt: skip
    max_tokens: Annotated[Annotated[int, Field(ge=1, le=MAX_COUNT)] | SkipJsonSchema[None], NotNull] = Field(
        default=None,
        description="The most a request may ask for (max_tokens, max_completion_tokens): more is lowered to it, and a request "
                    "that names none asks for this many (or generation.max_tokens when the index sets it, at most this).",
    )  # fmt: skip
    first_token_seconds: float = Field(
        default=60, gt=0, le=3600,
        description="No answer (a streamed one: no first token) within this: the request fails with 503, or a route's next "
                    "candidate answers (a route's own first_token_seconds wins).",
    )  # fmt: skip
    timeout_seconds: float = Field(
        default=600, gt=0, le=86400, description="The most one answer may take, stream included; a longer one ends with an error.")
    poll_seconds: float = Field(
        default=30, ge=1, le=3600,
        description="How often <base_url>/models is asked (with the key, within 5 s) whether the remote serves 'model'; while it "
                    "fails, the tenant is unavailable (503 at once, /health says why) and it is asked again sooner (1 s, 2 s, 4 s, ... "
                    "up to this).",
    )  # fmt: skip


class TenantEntry(_Strict):
    """What one resident serves: a model, its adapters and serving settings."""

    #: "" only for a remote tenant (``backend: "openai"``), which names none (``index/checks.py`` says so).
    model: Id = Field(default="", description="Id of the model to serve; required, except for backend 'openai' (see 'remote').")
    kind: Literal["generation", "embedding"] = Field(
        default="generation",
        description="'generation': chat and completions; 'embedding': a sentence-embedding model served at /v1/embeddings "
                    "(pooled as its modules.json declares; no adapters, sessions or generation settings). Issue #36.",
    )  # fmt: skip
    loras: list[Id] = Field(default=[], description="Ids of the adapters to attach; built for 'model'.")
    backend: Literal["transformers", "ollama", "llama.cpp", "openai"] = Field(
        default="transformers",
        description="Inference backend: 'transformers' loads safetensors, 'llama.cpp' a 'gguf' model (llama-server), "
                    "'ollama' needs an 'ollama' model source, 'openai' is a remote OpenAI-compatible server (needs 'remote', "
                    "no 'model').",
    )  # fmt: skip
    remote: Annotated[RemoteEntry | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="backend 'openai' only: the server that answers for this tenant, its key and its limits.")
    generation: Generation = Field(default=Generation(), description="Generation defaults.")
    resources: Resources = Field(default=Resources(), description="Resource limits.")
    adapter_selection: Annotated[AdapterSelection | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="Lets requests ask for '<tenant>:auto' (an adapter chosen by the request's text)."
    )
    sessions: SessionRetention = Field(default=SessionRetention(), description="Retention of conversations.")
    description: str = Field(default="", max_length=1000, description="What the tenant is for.")
    pinned: bool = Field(
        default=False,
        description="Never evicted from memory: loaded at start, and the resident is READY only once it answers.",
    )
    keep_alive: Annotated[Annotated[str, Field(min_length=1, max_length=100)] | SkipJsonSchema[None], NotNull, AfterValidator(_idle_span)] = Field(
        default=None,
        description="Unload its worker once it has served nothing for this long, in systemd's time-span notation (e.g. '5min', "
                    "'1h 30min'; '0': as soon as it is idle; Ollama's keep_alive, llama-swap's ttl). Default: never. "
                    "Not for a pinned tenant.",
    )  # fmt: skip
    priority: Priority = Field(
        default="default", description="Class of this tenant's requests unless a request names one (X-Zoo-Priority)."
    )
    fetch: Literal["eager", "on-demand"] = Field(
        default="eager",
        description="'eager': apply fetches it; 'on-demand': declared, fetched by its first request (never for a pinned tenant).",
    )
    overflow: Literal["peers", "never"] = Field(
        default="never",
        description="'peers': when this host's queue for it is full or it does not fit right now, a peer that accepts it answers "
        "(issue #22); 'never': such a request waits or gets 429 here.",
    )

    @property
    def is_remote(self) -> bool:
        """Answered by a remote server (``backend: "openai"``): no model files, no footprint, no worker."""
        return self.remote is not None


class RouteWhen(_Strict):
    """Conditions over a request; every one that is set must hold (none set: every request).
    Words, keywords and code are read from the last user message (a completion: its prompt)."""

    min_words: Annotated[Annotated[int, Field(ge=0, le=MAX_COUNT)] | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="At least this many words.")
    max_words: Annotated[Annotated[int, Field(ge=0, le=MAX_COUNT)] | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="At most this many words.")
    keywords: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default=[], max_length=64, description="Any of these words (case-insensitive, whole words) is present.")
    code: Annotated[bool | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="true: the message holds code (a ``` fence or code-like lines); false: it does not.")
    min_messages: Annotated[Annotated[int, Field(ge=1, le=MAX_COUNT)] | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="The conversation has at least this many messages (a completion has 1).")
    max_messages: Annotated[Annotated[int, Field(ge=1, le=MAX_COUNT)] | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="The conversation has at most this many messages.")
    similar_to: Annotated[Annotated[str, Field(min_length=1, max_length=1000)] | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="A described task: the message's cosine similarity to it, by the route's embedding_model, is at least min_similarity.")
    min_similarity: Annotated[Annotated[float, Field(ge=-1, le=1)] | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="The least similarity to 'similar_to' that matches (default 0.7); needs 'similar_to'.")

    @property
    def threshold(self) -> float:
        """The similarity a ``similar_to`` rule needs: ``min_similarity``, else AdapterSelection's default."""
        return DEFAULT_SIMILARITY if self.min_similarity is None else self.min_similarity


class RouteRule(_Strict):
    """If the request matches ``when``, ``tenant`` answers it."""

    tenant: Id = Field(description="Id of the tenant that answers a matching request.")
    when: RouteWhen = Field(default=RouteWhen(), description="The conditions; all must hold.")
    name: Annotated[Annotated[str, Field(min_length=1, max_length=64)] | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="Its label in answers and metrics (default: the conditions, e.g. 'words<=12').")


class RouteEntry(_Strict):
    """A model name clients may ask for: rules choose the tenant that answers (issue #21).
    Evaluated in order, the first match wins, ``default`` closes the list."""

    rules: list[RouteRule] = Field(default=[], description="Tried in order; the first that matches chooses the tenant.")
    default: Id = Field(description="Id of the tenant that answers when no rule matches.")
    fallback: list[Id] = Field(
        default=[], description="Tenants tried in order (after the default) when the chosen one cannot answer before its first token.")
    first_token_seconds: Annotated[Annotated[float, Field(gt=0, le=3600)] | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="A streaming request whose first token takes longer goes to the next candidate.")
    embedding_model: Annotated[Id | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="Id of a sentence-embedding model in 'models' for 'similar_to' rules (fetched on every host serving the route).")
    description: str = Field(default="", max_length=1000, description="What the route is for.")
    summarizer: Annotated[Id | SkipJsonSchema[None], NotNull] = Field(
        default=None,
        description="Id of a tenant that summarizes a route session's oldest turns when they no longer fit the tenant answering "
        "(the summary is kept in the session and reused); none: those turns are left out, with a marker.",
    )

    def tenants(self) -> list[str]:
        """Every tenant the route may send a request to, once each: the rules', the default, the fallbacks."""
        return list(dict.fromkeys([*(r.tenant for r in self.rules), self.default, *self.fallback]))


class Retention(_Strict):
    """How much history each artifact keeps on this host."""

    keep_versions: int = Field(
        default=2, ge=1, le=100, description="Versions kept per artifact, current included (2 allows rollback)."
    )


class HostEntry(_Strict):
    """One machine: what it serves and what it keeps on disk."""

    resident: Annotated[Id | SkipJsonSchema[None], NotNull] = Field(
        default=None, description="Id of the one tenant this host serves; the same as 'tenants': [id]. Exclusive with 'tenants'."
    )
    tenants: list[Id] = Field(default=[], description="Ids of the tenants this host serves, in order (the first is the default).")
    memory_budget: Annotated[Annotated[str, Field(pattern=MEMORY_PATTERN)] | SkipJsonSchema[None], NotNull] = Field(
        default=None,
        description=(
            "Memory the served tenants share, in systemd's notation (e.g. '8G'; K/M/G/T are powers of 1024): device memory "
            "on a CUDA host, RAM otherwise. plan/apply refuse tenants whose weights and KV cache cannot fit."
        ),
    )
    max_loaded: Annotated[Annotated[int, Field(ge=1, le=1024)] | SkipJsonSchema[None], NotNull] = Field(
        default=None,
        description="Most tenants loaded at once (OLLAMA_MAX_LOADED_MODELS, llama-server's --models-max): loading one more pages "
                    "out the least recently used idle one, beside the memory budget. At least the number of pinned tenants. "
                    "Default: no cap.",
    )  # fmt: skip
    routes: list[Id] = Field(default=[], description="Ids of the routes this host answers (their tenants must be served here).")
    available: list[Id] = Field(default=[], description="Model ids kept on disk for fast swaps.")
    retention: Retention = Field(default=Retention(), description="Version retention.")
    description: str = Field(default="", max_length=1000, description="What the machine is.")
    endpoint: Annotated[Annotated[str, Field(min_length=1, max_length=300)] | SkipJsonSchema[None], NotNull] = Field(
        default=None,
        description=(
            "Base URL at which peers (and `zoo-agent fleet status`) reach this host's resident: 'http://' or 'https://', "
            "a host and an optional port, no path, query or user (e.g. 'http://sprout.lan:8000'). Issue #22."
        ),
    )
    accept_from_peers: list[Id] = Field(
        default=[],
        description=(
            "Ids of served tenants this host answers for peers (needs 'endpoint'). Default none: taking other hosts' "
            "load costs this host's memory and queue, so it is declared, never implied by serving a tenant."
        ),
    )

    def served(self) -> tuple[str, ...]:
        """The tenants this host serves, in order: ``tenants``, else the one ``resident``, else none
        (issue #20; ``resident`` stays the spelling of a single-tenant host)."""
        if self.tenants:
            return tuple(self.tenants)
        return (self.resident,) if self.resident is not None else ()


class Index(_Strict):
    """A fleet's models, adapters, tenants and hosts."""

    schema_: Annotated[str | SkipJsonSchema[None], NotNull] = Field(
        default=None, alias="$schema", description="Path or URL of schema.json, for editors."
    )
    models: dict[Id, ModelEntry] = Field(default={}, description="Base models by id.")
    loras: dict[Id, LoraEntry] = Field(default={}, description="LoRA adapters by id.")
    tenants: dict[Id, TenantEntry] = Field(default={}, description="Tenants (what a resident serves) by id.")
    routes: dict[Id, RouteEntry] = Field(default={}, description="Routes by id: model names whose rules choose a tenant per request.")
    hosts: dict[Id, HostEntry] = Field(default={}, description="Hosts by id (their host names, lowercase).")

    def model_named(self, name: str) -> str | None:
        """The id of the model ``name`` is the id or an alias of, or None (issue #35)."""
        if name in self.models:
            return name
        return next((mid for mid, entry in self.models.items() if name in entry.aliases), None)
