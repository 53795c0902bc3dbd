"""Replica metrics under vLLM's names, so existing vLLM dashboards and routers read them.

Names, labels (`model_name`, `engine`) and histogram buckets follow vLLM v1
(`vllm/v1/metrics/loggers.py`, PrometheusStatLogger). Each server owns its registry. Counters
are written with their `_total` suffix, as PromQL and the dashboards name them.

Two things `promtool check metrics` flags are vLLM's choices, kept for compatibility: the `:` in
every name (Prometheus reserves colons for recording rules) and the `_total` on the histogram
`vllm:iteration_tokens_total`. tests/test_observability_prometheus.py allows exactly these and
nothing else.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Bucket boundaries as in vLLM v1's PrometheusStatLogger.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# KV hand-over (prefill/decode disaggregation): vLLM's NixlConnector metrics
# (vllm/distributed/kv_transfer/kv_connector/v1/nixl_connector.py, NixlPromMetrics): transfer time
# buckets 5 ms..5 s, bytes 2 KiB..8 GiB in powers of four, recorded on the decode side per transfer.
XFER_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
XFER_BYTES_BUCKETS = tuple(2 ** (10 + i) for i in range(1, 25, 2))
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class ReplicaMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ("model_name", "engine")
        lv = (model_name, "0")
        r = self.registry
        self.num_running = Gauge("vllm:num_requests_running", "Requests in the running batch.", labels, registry=r).labels(*lv)
        self.num_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", labels, registry=r).labels(*lv)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = full.", labels, registry=r).labels(*lv)
        self.prefix_queries = Counter("vllm:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.", labels, registry=r).labels(*lv)
        self.prefix_hits = Counter("vllm:prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", labels, registry=r).labels(*lv)
        self.preemptions = Counter("vllm:num_preemptions_total", "Requests preempted (recomputed later).", labels, registry=r).labels(*lv)
        self.prompt_tokens = Counter("vllm:prompt_tokens_total", "Prompt tokens of admitted requests.", labels, registry=r).labels(*lv)
        self.generation_tokens = Counter("vllm:generation_tokens_total", "Generated tokens.", labels, registry=r).labels(*lv)
        self._success = Counter("vllm:request_success_total", "Finished requests by reason.", labels + ("finished_reason",), registry=r)
        self._lv = lv
        for reason in ("stop", "length", "abort"):  # as vLLM: every finish reason is a series from the start
            self._success.labels(*lv, reason)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels, buckets=TTFT_BUCKETS, registry=r).labels(*lv)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between generated tokens.", labels, buckets=ITL_BUCKETS, registry=r).labels(*lv)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.", labels, buckets=REQUEST_LATENCY_BUCKETS, registry=r).labels(*lv)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time from arrival to first scheduling.", labels, buckets=REQUEST_LATENCY_BUCKETS, registry=r).labels(*lv)
        self.request_prompt_tokens = Histogram("vllm:request_prompt_tokens", "Prompt length per request.", labels, buckets=TOKEN_BUCKETS, registry=r).labels(*lv)
        self.request_generation_tokens = Histogram("vllm:request_generation_tokens", "Generated tokens per request.", labels, buckets=TOKEN_BUCKETS, registry=r).labels(*lv)
        self.iteration_tokens = Histogram("vllm:iteration_tokens_total", "Tokens processed per engine step.", labels, buckets=TOKEN_BUCKETS, registry=r).labels(*lv)

        # KV hand-over under vLLM's NIXL names, so P/D dashboards built for vLLM read kvfleet's too
        # (the transport is ZMQ here, the meaning the same: one observation per pull).
        self.kv_xfer_time = Histogram("vllm:nixl_xfer_time_seconds", "Duration of KV-cache transfers (pulls of a "
                                      "prefill's blocks).", labels, buckets=XFER_TIME_BUCKETS, registry=r).labels(*lv)
        self.kv_xfer_bytes = Histogram("vllm:nixl_bytes_transferred", "Bytes per KV-cache transfer.", labels,
                                       buckets=XFER_BYTES_BUCKETS, registry=r).labels(*lv)
        self.kv_xfer_failed = Counter("vllm:nixl_num_failed_transfers", "KV-cache transfers that failed (bad "
                                      "checksum, dead or stuck peer): the prompt was computed here instead.",
                                      labels, registry=r).labels(*lv)
        self.kv_expired = Counter("vllm:nixl_num_kv_expired_reqs", "Prefills whose kept KV expired before a decode "
                                  "replica pulled it.", labels, registry=r).labels(*lv)
        self.kv_recomputed_blocks = Counter("kvfleet_kv_transfer_recomputed_blocks_total", "Prompt blocks a decode "
                                            "replica computed itself because their transfer failed.", labels,
                                            registry=r).labels(*lv)

        # LoRA adapters (kvfleet's names: vLLM exports only an info gauge, vllm:lora_requests_info)
        self.loras_loaded = Gauge("kvfleet_replica_lora_adapters_loaded", "LoRA adapters resident now.", labels,
                                  registry=r).labels(*lv)
        self.lora_loads = Counter("kvfleet_replica_lora_loads_total", "LoRA adapter loads (a batch needed one that "
                                  "was not resident).", labels, registry=r).labels(*lv)
        self.lora_load_seconds = Counter("kvfleet_replica_lora_load_seconds_total", "Seconds spent loading LoRA "
                                         "adapters.", labels, registry=r).labels(*lv)
        self._lora_resident = Gauge("kvfleet_replica_lora_resident", "1 while the LoRA adapter is resident, else 0.",
                                    labels + ("lora_name",), registry=r)
        self._lora_exported = (0, 0.0)  # loads and seconds already counted

    def update_loras(self, slots) -> None:
        """Export a `replica.lora.AdapterSlots`' state (after a step)."""
        resident = set(slots.resident)
        self.loras_loaded.set(len(resident))
        for name in slots.modules:
            self._lora_resident.labels(*self._lv, name).set(1 if name in resident else 0)
        loads, secs = self._lora_exported
        self.lora_loads.inc(slots.loads_total - loads)
        self.lora_load_seconds.inc(max(slots.load_seconds_total - secs, 0.0))
        self._lora_exported = (slots.loads_total, slots.load_seconds_total)

    def success(self, finished_reason: str) -> None:
        self._success.labels(*self._lv, finished_reason).inc()
