"""A worker's Prometheus metrics (issue #5): names follow vLLM's, prefixed ``zoo:``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "TOKEN_BUCKETS", "Metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("zoo:time_to_first_token_seconds", "Time to first token.", registry=r, buckets=LATENCY_BUCKETS)
        self.itl = Histogram("zoo:inter_token_latency_seconds", "Time between streamed pieces.", registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("zoo:e2e_request_latency_seconds", "Request latency, end to end.", registry=r, buckets=LATENCY_BUCKETS)
        self.queue = Histogram("zoo:request_queue_time_seconds", "Time waiting for the model.", registry=r, buckets=LATENCY_BUCKETS)
        self.prompt_tokens = Counter("zoo:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("zoo:generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("zoo:request_success", "Finished requests.", ["finished_reason"], registry=r)
        self.cancelled = Counter("zoo:request_cancelled", "Requests whose client went away; generation stopped early.", registry=r)
        self.running = Gauge("zoo:num_requests_running", "Requests generating now (prefilling or in the decode batch).", registry=r)
        self.batch = Histogram("zoo:decode_batch_size", "Sequences decoded together per engine step.", registry=r, buckets=BATCH_BUCKETS)
        self.iteration_tokens = Histogram("zoo:iteration_tokens_total", "Tokens fed to the model per engine step (prompt chunk plus decoded rows).",
                                          registry=r, buckets=TOKEN_BUCKETS)  # fmt: skip
        self.waiting = Gauge("zoo:num_requests_waiting", "Requests waiting for the model.", registry=r)
        self.waiting_by_priority = Gauge("zoo:num_requests_waiting_by_priority", "Requests waiting for the model, by priority class (X-Zoo-Priority).",
                                         ["priority"], registry=r)  # fmt: skip
        self.swap_seconds = Gauge("zoo:model_swap_seconds", "Load time of the serving version.", registry=r)
        self.reloads = Counter("zoo:reloads", "Reloads of this tenant, by result.", ["result"], registry=r)
        self.lora_loaded = Gauge("zoo:lora_adapters_loaded", "LoRA adapters resident now.", registry=r)
        self.lora_loads = Counter("zoo:lora_loads", "LoRA adapter loads, by result.", ["result"], registry=r)
        self.lora_swaps = Counter("zoo:lora_swaps", "LoRA adapters swapped to a new version in place.", registry=r)
        self.lora_seconds = Histogram("zoo:lora_load_seconds", "Seconds to load or swap a LoRA adapter.", registry=r, buckets=LATENCY_BUCKETS)
        self.session_restores = Counter("zoo:session_cache_restores", "Session turns continued from a saved KV cache.", registry=r)
        self.session_reprefills = Counter("zoo:session_reprefills", "Session turns prefilled again from the transcript.", registry=r)
        self.session_corrupt = Counter("zoo:session_cache_corrupt", "Damaged session caches ignored.", registry=r)
        self.session_restore_seconds = Histogram("zoo:session_restore_seconds", "Seconds to load a session's KV cache.", registry=r, buckets=LATENCY_BUCKETS)
        self.lora_selections = Counter("zoo:lora_selections", "Adapters chosen for '<tenant>:auto' ('base' when none qualified), "
                                       "each adapter of a composition counted.", ["adapter"], registry=r)  # fmt: skip
        # As vLLM's lora_requests_info names its adapters: one label, comma-joined (sorted, so one set is one series).
        self.lora_compositions = Counter("zoo:lora_composition_requests", "Requests answered by a composition of adapters.",
                                         ["combine", "adapters"], registry=r)  # fmt: skip
        self.lora_compositions_cached = Gauge("zoo:lora_compositions_cached", "Adapter compositions cached now.", registry=r)
        self.lora_compositions_built = Counter("zoo:lora_compositions_built", "Weighted compositions built (add_weighted_adapter).", registry=r)
