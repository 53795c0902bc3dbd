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

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protocol.events import MEDIUM_CPU, MEDIUM_DISK, MEDIUM_GPU

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
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None,
                 kv_tiers: Sequence[str] = ()) -> None:
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
        self._offload: _OffloadMetrics | None = _OffloadMetrics(r, labels, lv, kv_tiers) if kv_tiers else None

    def update_offload(self, offload, block_size: int, external_queries: int, external_hits: int) -> None:
        """Export a `replica.kv_offload.OffloadTiers`' state and the scheduler's external
        prefix-cache counters (after a step); a no-op for a replica without tiers."""
        if self._offload is not None:
            self._offload.update(offload, block_size, external_queries, external_hits)

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


class _OffloadMetrics:
    """KV offload tiers (replica/kv_offload.py). vLLM's names where vLLM has the series: the KV
    connector's prefix-cache counters (`vllm:external_prefix_cache_queries` / `_hits`, vLLM v1
    loggers.py) and the offloading connector's transfer counters (`vllm:kv_offload_total_bytes`
    / `_total_time` by `transfer_type`, e.g. GPU_to_CPU, CPU_to_GPU; vLLM's offloading/metrics.py).
    Per-tier block counts are kvfleet's (`medium` = "CPU" or "STORAGE", as in the KV events). Every
    series exists from the start (zero), so rates and dashboards have data before the first spill."""

    def __init__(self, r: CollectorRegistry, labels: tuple[str, ...], lv: tuple[str, ...], media: Sequence[str]) -> None:
        self.media = tuple(media)
        self.external_queries = Counter("vllm:external_prefix_cache_queries", "Prompt tokens looked up in the KV "
                                        "offload tiers (the whole prompt of each admitted request).", labels,
                                        registry=r).labels(*lv)
        self.external_hits = Counter("vllm:external_prefix_cache_hits", "Prompt tokens found in a KV offload tier "
                                     "and loaded back instead of recomputed.", labels, registry=r).labels(*lv)
        mlabels = labels + ("medium",)
        tlabels = labels + ("transfer_type",)
        self._bytes = Counter("vllm:kv_offload_total_bytes", "Bytes copied between the KV pool and the offload "
                              "tiers, by transfer type.", tlabels, registry=r)
        self._time = Counter("vllm:kv_offload_total_time", "Seconds spent copying between the KV pool and the "
                             "offload tiers, by transfer type (a sim replica: modelled).", tlabels, registry=r)
        self._hits = Counter("kvfleet_replica_kv_offload_hits", "Prompt tokens found in this tier and loaded back.",
                             mlabels, registry=r)
        self._stores = Counter("kvfleet_replica_kv_offload_stores", "Blocks that entered this tier (spilled from "
                               "the tier above).", mlabels, registry=r)
        self._loads = Counter("kvfleet_replica_kv_offload_loads", "Blocks loaded from this tier into the KV pool.",
                              mlabels, registry=r)
        self._evictions = Counter("kvfleet_replica_kv_offload_evictions", "Blocks this tier evicted (least "
                                  "recently used; spilled into the tier below, if any).", mlabels, registry=r)
        self._skipped = Counter("kvfleet_replica_kv_offload_skipped_stores", "Blocks not stored because every "
                                "block of the full tier was pinned by a load.", mlabels, registry=r)
        self._blocks = Gauge("kvfleet_replica_kv_offload_blocks", "Blocks held in this tier now.", mlabels, registry=r)
        self._capacity = Gauge("kvfleet_replica_kv_offload_capacity_blocks", "Blocks this tier can hold.", mlabels,
                               registry=r)
        self._lv = lv
        pairs = [(MEDIUM_GPU, MEDIUM_CPU), (MEDIUM_CPU, MEDIUM_GPU)]
        if MEDIUM_DISK in self.media:
            pairs += [(MEDIUM_CPU, MEDIUM_DISK), (MEDIUM_DISK, MEDIUM_GPU)]
        types = [f"{src}_to_{dst}" for src, dst in pairs]  # Transfer.transfer_type
        for t in types:
            self._bytes.labels(*lv, t)
            self._time.labels(*lv, t)
        for m in self.media:
            for c in (self._hits, self._stores, self._loads, self._evictions, self._skipped, self._blocks,
                      self._capacity):
                c.labels(*lv, m)
        self._seen: dict[tuple[str, str], float] = {}  # totals already counted

    def _inc(self, metric: Counter, label: str, key: str, total: float) -> None:
        done = self._seen.get((key, label), 0)
        if total > done:
            metric.labels(*self._lv, label).inc(total - done)
            self._seen[(key, label)] = total

    def update(self, offload, block_size: int, external_queries: int, external_hits: int) -> None:
        self._inc_plain(self.external_queries, "queries", external_queries)
        self._inc_plain(self.external_hits, "hits", external_hits)
        for t in offload.tiers:
            st = t.stats
            self._inc(self._hits, t.medium, "hits", st.loaded_blocks * block_size)
            self._inc(self._stores, t.medium, "stores", st.stored_blocks)
            self._inc(self._loads, t.medium, "loads", st.loaded_blocks)
            self._inc(self._evictions, t.medium, "evictions", st.evicted_blocks)
            self._inc(self._skipped, t.medium, "skipped", st.skipped_stores)
            self._blocks.labels(*self._lv, t.medium).set(len(t))
            self._capacity.labels(*self._lv, t.medium).set(t.num_blocks)
        totals = offload.totals
        for kind, n in totals.bytes.items():
            self._inc(self._bytes, kind, "bytes", n)
        for kind, sec in totals.seconds.items():
            self._inc(self._time, kind, "seconds", sec)

    def _inc_plain(self, metric, key: str, total: int) -> None:
        done = self._seen.get((key, ""), 0)
        if total > done:
            metric.inc(total - done)
            self._seen[(key, "")] = total
