"""kvfleet's Grafana dashboards, built as code with Grafana's grafana-foundation-sdk.

    python dashboards/build.py          # rewrite fleet-overview.json, replica-detail.json, prometheus.yml
    python dashboards/build.py --check  # exit 1 if a committed file differs from what this builds

- fleet-overview.json: the balancer (`kvfleet_*`) beside every replica (`vllm:*`): traffic,
  TTFT / E2E percentiles, predicted vs reported cache hits, routing decision latency, per-replica
  load, KV usage and queue, retries, failovers, resyncs, health.
- replica-detail.json: one replica (the `replica` variable: a scrape `instance`), its vLLM
  metrics, and how the balancer sees it. Any vLLM server scraped by Prometheus works here too.
- picker-overview.json: `kvfleet picker` behind Envoy: picks by outcome, streams open and aborted,
  decision and response latency seen by the picker, predicted vs reported cache hits.
- prometheus.yml: the scrape config (file-based service discovery), from kvfleet/prometheus.py.
- deploy/helm/kvfleet/dashboards/: the three dashboards again, for the Helm chart's ConfigMap.

Every panel's queries use only `$__rate_interval` and `$replica`; the acceptance test
(tests/test_observability_prometheus.py) substitutes them and runs each query on a real
Prometheus scraping a loaded fleet, so no panel here may be empty or name an unknown metric.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from grafana_foundation_sdk.builders import dashboard as gdash
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from kvfleet.prometheus import scrape_config  # noqa: E402

DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
TAGS = ["kvfleet", "llm-inference"]
QUANTILES = (0.5, 0.9, 0.99)
STATIC_SCRAPE_INTERVAL_S = 5.0  # dashboards/prometheus.yml, for a Prometheus of your own
CHART_DASHBOARDS = os.path.join("..", "deploy", "helm", "kvfleet", "dashboards")  # relative to dashboards/


# ---------------------------------------------------------------------------------- helpers
def _query(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS)


def _targets(panel, queries: list[tuple[str, str]]):
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + i)))
    return panel


def graph(title: str, description: str, unit: str, queries: list[tuple[str, str]], w: int = 8, h: int = 8,
          min0: bool = True):
    p = (timeseries.Panel().title(title).description(description).datasource(DS).unit(unit).span(w).height(h)
         .line_width(1).fill_opacity(10).show_points(common.VisibilityMode.NEVER))
    if min0:
        p = p.min(0)
    return _targets(p, queries)


def quantiles(title: str, description: str, bucket: str, selector: str = "", unit: str = "s", w: int = 8):
    """p50 / p90 / p99 of a Prometheus histogram, over everything the selector matches."""
    queries = [(f"histogram_quantile({q}, sum by (le) (rate({bucket}{selector}[{RATE}])))", f"p{round(q * 100)}")
               for q in QUANTILES]
    return graph(title, description, unit, queries, w=w)


def ratio(num: str, den: str, by: str = "") -> str:
    """sum(rate(num)) / sum(rate(den)), optionally per label."""
    grp = f" by ({by})" if by else ""
    return f"sum{grp} (rate({num}[{RATE}])) / sum{grp} (rate({den}[{RATE}]))"


def state(title: str, description: str, expr: str, legend: str, mapping: dict[str, tuple[str, str]], w: int = 12):
    """A state timeline: one row per series, colored by value mappings {value: (text, color)}."""
    vm = dm.ValueMap(options={v: dm.ValueMappingResult(text=t, color=c, index=i)
                              for i, (v, (t, c)) in enumerate(mapping.items())})
    p = (statetimeline.Panel().title(title).description(description).datasource(DS).span(w).height(6)
         .mappings([vm]).show_value(common.VisibilityMode.NEVER))
    return _targets(p, [(expr, legend)])


def build_dashboard(builder) -> dict:
    """Build, number panels in order (Grafana wants unique ids), and return plain JSON data."""
    model = builder.build()
    for i, panel in enumerate(model.panels or [], start=1):
        panel.id_val = i
    return json.loads(json.dumps(model, cls=JSONEncoder))


def _datasource_variable():
    return gdash.DatasourceVariable("datasource").label("Data source").type("prometheus")


def _base(title: str, uid: str, description: str):
    return (gdash.Dashboard(title).uid(uid).description(description).tags(TAGS).refresh("10s")
            .time("now-30m", "now").timezone("browser").tooltip(dm.DashboardCursorSync.CROSSHAIR)
            .link(gdash.DashboardLink("kvfleet dashboards").type(dm.DashboardLinkType.DASHBOARDS).tags(["kvfleet"])
                  .as_dropdown(True).include_vars(False).keep_time(True))
            .with_variable(_datasource_variable()))


# ---------------------------------------------------------------------------------- fleet overview
def fleet_overview() -> dict:
    d = _base("kvfleet / Fleet overview", "kvfleet-fleet-overview",
              "The kvfleet balancer and its replicas: traffic, latency, KV-cache hits, load, reliability.")

    d = d.with_row(gdash.Row("Traffic"))
    d = d.with_panel(graph("Requests by status", "Requests answered by the balancer per second, by status class "
                           "(`none` replica: no replica was usable).", "reqps",
                           [(f"sum by (status) (rate(kvfleet_requests_total[{RATE}]))", "{{status}}")]))
    d = d.with_panel(graph("Requests by replica", "Requests per second, by the replica that served them.", "reqps",
                           [(f"sum by (replica) (rate(kvfleet_requests_total[{RATE}]))", "{{replica}}")]))
    d = d.with_panel(graph("Token throughput", "Prompt tokens admitted and tokens generated per second, whole fleet "
                           "(replica metrics).", "short",
                           [(f"sum(rate(vllm:prompt_tokens_total[{RATE}]))", "prompt"),
                            (f"sum(rate(vllm:generation_tokens_total[{RATE}]))", "generated")]))

    d = d.with_row(gdash.Row("Latency (at the balancer)"))
    d = d.with_panel(quantiles("Time to first token", "Request arrival at the balancer to the first byte relayed "
                               "to the client.", "kvfleet_time_to_first_token_seconds_bucket"))
    d = d.with_panel(quantiles("End-to-end latency", "Request arrival at the balancer to the end of the response.",
                               "kvfleet_e2e_request_latency_seconds_bucket"))
    d = d.with_panel(quantiles("Routing decision", "Tokenize, hash, prefix-index lookup and policy scoring of one "
                               "request.", "kvfleet_routing_decision_seconds_bucket"))

    d = d.with_row(gdash.Row("KV cache"))
    d = d.with_panel(graph(
        "Cache hit rate: predicted vs reported", "Share of routed prompt tokens the prefix index predicted the chosen "
        "replica holds, what the replicas reported as cached (usage.cached_tokens), and the replicas' own "
        "prefix-cache hit rate. Predicted far above reported: the index is stale.", "percentunit",
        [(ratio("kvfleet_predicted_cached_tokens_total", "kvfleet_prompt_tokens_total"), "predicted (balancer)"),
         (ratio("kvfleet_reported_cached_tokens_total", "kvfleet_prompt_tokens_total"), "reported (balancer)"),
         (ratio("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"), "prefix cache (replicas)")]))
    d = d.with_panel(graph(
        "Index and engine disagree", "Share of requests per replica where the prefix index predicted a cached "
        "prefix and the replica delivered less than half of it (hit/miss), or the replica delivered one the index "
        "did not predict (unseen) (balancer/audit.py). A few are evictions between routing and serving; a replica "
        "that stays high hashes differently from the balancer (tokenizer, cache salt, prefix caching off) or its "
        "events do not reach the index (another block size): the balancer logs a warning with a request id, and "
        "GET /admin/decisions shows the decisions.", "percentunit",
        [(ratio("kvfleet_cache_mismatch_total", "kvfleet_cache_accounted_requests_total", "replica"),
          "hit/miss {{replica}}"),
         (ratio("kvfleet_cache_unseen_total", "kvfleet_cache_accounted_requests_total", "replica"),
          "unseen {{replica}}")]))
    d = d.with_panel(graph("Prefix-cache hit rate by replica", "Prompt tokens found cached / looked up, per replica.",
                           "percentunit",
                           [(ratio("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "instance"),
                             "{{instance}}")]))
    d = d.with_panel(graph("Prefix index", "KV blocks the balancer's prefix index holds per replica.", "short",
                           [("sum by (replica) (kvfleet_indexed_blocks)", "{{replica}}")]))
    # KV offload tiers (issue #19): where cached prompt tokens came from, whole fleet
    d = d.with_panel(graph("Cached prompt tokens by tier", "Prompt tokens per second found in the replicas' KV pool "
                           "(device) and loaded back from their offload tiers (CPU: host memory, Disk) instead of "
                           "recomputed (replicas started with --kv-offload-host-blocks).", "short",
                           [(f"sum(rate(vllm:prefix_cache_hits_total[{RATE}]))", "device"),
                            (f"sum by (medium) (rate(kvfleet_replica_kv_offload_hits_total[{RATE}]))", "{{medium}}")]))
    d = d.with_panel(graph("Prefix warm-ups", "Prefill-only warm-ups per second, by outcome: a prompt prefix the "
                           "policy had computed on a second replica instead of moving a request off its cache "
                           "(predictive's `replicate`). Failed or refused warm-ups cost nothing but the replica's time; "
                           "many of them: check that replica's logs.", "short",
                           [(f"sum by (outcome) (rate(kvfleet_warmups_total[{RATE}]))", "{{outcome}}")]))

    d = d.with_row(gdash.Row("Load"))
    d = d.with_panel(graph("In flight at the balancer", "Requests the balancer has sent to each replica and not "
                           "finished, and requests waiting for admission (when the guard caps in-flight requests per "
                           "replica).", "short",
                           [("sum by (replica) (kvfleet_replica_inflight_requests)", "{{replica}}"),
                            ("sum(kvfleet_admission_queue_requests)", "waiting for admission")]))
    d = d.with_panel(graph("Running and waiting", "Requests in each replica's running batch and in its queue.",
                           "short",
                           [("sum by (instance) (vllm:num_requests_running)", "running {{instance}}"),
                            ("sum by (instance) (vllm:num_requests_waiting)", "waiting {{instance}}")]))
    d = d.with_panel(graph("KV-cache usage", "Share of each replica's KV blocks in use (1 = full).", "percentunit",
                           [("max by (instance) (vllm:kv_cache_usage_perc)", "{{instance}}")]))

    # --- sticky sessions (issue #17 part 3, balancer/sessions.py) -----------------------------
    d = d.with_row(gdash.Row("Sticky sessions"))
    d = d.with_panel(graph(
        "Session routing", "Requests with a session key per second, by outcome: stuck (kept on its home), new (no "
        "home known), followed (another replica holds more of it: another balancer moved it), moved_overloaded (its "
        "home was above the overload bar), moved_gone (its home left, failed or is unhealthy). Many moves: the "
        "overload bar (--session-overload-factor) is tight or replicas are failing.", "reqps",
        [(f"sum by (outcome) (rate(kvfleet_session_routed_total[{RATE}]))", "{{outcome}}")]))
    d = d.with_panel(graph(
        "Sessions", "Sessions with a remembered home (used within the TTL), and sessions forgotten per interval by "
        "reason: expired, released (DELETE /admin/sessions), evicted (over --session-max-sessions).", "short",
        [("sum(kvfleet_sessions_active)", "active"),
         (f"sum by (reason) (increase(kvfleet_sessions_ended_total[{RATE}]))", "ended {{reason}}")]))
    # --- end of sticky sessions ---------------------------------------------------------------

    # --- request classes and fairness (issue #17 part 4, balancer/fairness.py; --fairness) ---
    d = d.with_row(gdash.Row("Classes and fairness"))
    d = d.with_panel(graph(
        "Admitted and shed by class", "Requests per second the fair admission queue admitted, and refused with 429 + "
        "Retry-After by reason: predicted_wait (the estimated TTFT passed the class's target: shed early, before the "
        "fleet saturates), queue_timeout, queue_full. A class within its fair share is never shed early.", "reqps",
        [(f"sum by (class) (rate(kvfleet_fairness_admitted_requests_total[{RATE}]))", "admitted {{class}}"),
         (f"sum by (class, reason) (rate(kvfleet_fairness_shed_requests_total[{RATE}]))", "shed {{class}} {{reason}}")]))
    d = d.with_panel(graph(
        "Goodput by class", "Admitted requests per second whose first byte came within their class's TTFT target "
        "(every answered request of a class without one), beside the admitted rate.", "reqps",
        [(f"sum by (class) (rate(kvfleet_fairness_goodput_requests_total[{RATE}]))", "goodput {{class}}")]))
    d = d.with_panel(graph(
        "TTFT p99 by class", "Arrival to first byte, p99 per class (queue wait included); compare with each class's "
        "ttft target.", "s",
        [(f"histogram_quantile(0.99, sum by (class, le) (rate(kvfleet_fairness_time_to_first_token_seconds_bucket"
          f"[{RATE}])))", "p99 {{class}}"),
         (f"histogram_quantile(0.99, sum by (class, le) (rate(kvfleet_fairness_queue_wait_seconds_bucket[{RATE}])))",
          "queue wait p99 {{class}}")]))
    d = d.with_panel(graph(
        "Fleet share by class", "Tokens (prompt + predicted output) admitted per second per class: the share of the "
        "fleet each class gets (weighted fair queueing in tokens, per tenant), and the tokens in flight.", "short",
        [(f"sum by (class) (rate(kvfleet_fairness_admitted_tokens_total[{RATE}]))", "admitted tok/s {{class}}"),
         ("sum by (class) (kvfleet_fairness_inflight_tokens)", "in flight {{class}}")]))
    d = d.with_panel(graph(
        "Admission queue", "Requests waiting per class, and the latest queue-wait estimate made for each class "
        "(what early shedding compares with the class's TTFT target).", "short",
        [("sum by (class) (kvfleet_fairness_queue_requests)", "waiting {{class}}"),
         ("max by (class) (kvfleet_fairness_estimated_wait_seconds)", "estimated wait s {{class}}")]))
    d = d.with_panel(graph(
        "Wait estimate's inputs", "The queue's measured drain rate (tokens/s while requests wait: 0 until measured, "
        "nothing is shed early before) and the calibration factor (measured over estimated wait, applied to the "
        "estimates).", "short",
        [("max(kvfleet_fairness_drain_rate_tokens_per_second)", "drain tok/s"),
         ("max(kvfleet_fairness_estimate_calibration)", "calibration")]))
    # --- end of classes and fairness ----------------------------------------------------------

    d = d.with_row(gdash.Row("Reliability"))
    d = d.with_panel(graph("Retries and failovers", "Attempts that failed before the first byte (retried elsewhere), "
                           "streams continued on another replica after theirs was lost, streams no replica could "
                           "continue, and requests refused for want of a usable replica; per interval.", "short",
                           [(f"sum by (replica) (increase(kvfleet_retries_total[{RATE}]))", "retry {{replica}}"),
                            (f"sum by (replica) (increase(kvfleet_failovers_total[{RATE}]))", "failover {{replica}}"),
                            (f"sum(increase(kvfleet_failover_errors_total[{RATE}]))", "failover error"),
                            (f"sum(increase(kvfleet_no_replica_total[{RATE}]))", "no usable replica")]))
    d = d.with_panel(graph("KV-index resyncs", "Times the balancer rebuilt a replica's index entries from a snapshot, "
                           "by reason (startup, restart, gap_no_replay, ...); per interval.", "short",
                           [(f"sum by (replica, reason) (increase(kvfleet_kv_resyncs_total[{RATE}]))",
                             "{{replica}} {{reason}}")]))
    d = d.with_panel(graph("Preemptions", "Requests preempted per second on each replica (KV cache full).", "short",
                           [(f"sum by (instance) (rate(vllm:num_preemptions_total[{RATE}]))", "{{instance}}")]))
    d = d.with_panel(state("Replica health (balancer's checks)", "1 healthy, 0 failing its /health checks.",
                           "max by (replica) (kvfleet_replica_healthy)", "{{replica}}",
                           {"1": ("healthy", "green"), "0": ("unhealthy", "red")}))
    d = d.with_panel(state("Circuit breaker", "The balancer's circuit breaker per replica.",
                           "max by (replica) (kvfleet_replica_circuit_state)", "{{replica}}",
                           {"0": ("closed", "green"), "1": ("half-open", "yellow"), "2": ("open", "red")}))
    d = d.with_panel(state("Scrape targets up", "Prometheus' view: 1 when a target's /metrics was scraped.",
                           'up{job=~"kvfleet-.*"}', "{{job}} {{instance}}",
                           {"1": ("up", "green"), "0": ("down", "red")}, w=24))

    # --- LoRA-aware routing (issue #17 part 5): where adapter requests went, what replicas hold
    d = d.with_row(gdash.Row("LoRA adapters"))
    d = d.with_panel(graph("LoRA routing", "Requests naming a LoRA adapter per second: sent to a replica that held "
                           "it resident, sent to one that must load it first, or refused with 404 because no replica "
                           "serves that model. Many loads: raise the replicas' --max-loras or the balancer's "
                           "--lora-slack.", "reqps",
                           [(f"sum by (outcome) (rate(kvfleet_lora_routed_total[{RATE}]))", "{{outcome}}")], w=12))
    d = d.with_panel(graph("Adapters resident", "LoRA adapters each replica reports resident (its load reports), and "
                           "adapter loads per second on the replicas.", "short",
                           [("max by (replica) (kvfleet_replica_lora_adapters)", "resident {{replica}}"),
                            (f"sum by (instance) (rate(kvfleet_replica_lora_loads_total[{RATE}]))",
                             "loads/s {{instance}}")], w=12))
    # --- compact cache digests (issue #17 part 2: balancer/digest_feed.py, digest_index.py) ---
    d = d.with_row(gdash.Row("Cache digests"))
    d = d.with_panel(graph("Cache digests received", "Digests received per interval from each replica (periodic, "
                           "every --kv-digest-interval, and on request), and whether the replica's cached prefix is "
                           "read from its digest (1: index_source digests, or both before the event index is "
                           "exact).", "short",
                           [(f"sum by (replica) (increase(kvfleet_digest_received_total[{RATE}]))",
                             "received {{replica}}"),
                            ("max by (replica) (kvfleet_digest_in_use)", "in use {{replica}}")]))
    d = d.with_panel(graph("Digest age", "Seconds since each replica's latest digest arrived. Routing ignores a "
                           "digest older than --digest-max-age; a growing age means the replica stopped publishing "
                           "or the link is cut.", "s",
                           [("max by (replica) (kvfleet_digest_age_seconds)", "{{replica}}")]))
    d = d.with_panel(graph("Digest size", "Size on the wire of each replica's latest digest and the KV blocks it "
                           "covers (binary_fuse8: ~1.13 bytes per block).", "bytes",
                           [("max by (replica) (kvfleet_digest_size_bytes)", "bytes {{replica}}"),
                            ("max by (replica) (kvfleet_digest_blocks)", "blocks {{replica}}")]))
    # --- end of cache digests ---
    # --- prefill/decode disaggregation (issue #19 part 3: balancer/handover.py, replica/kv_transfer.py)
    d = d.with_row(gdash.Row("Prefill/decode disaggregation"))
    d = d.with_panel(graph("Disaggregated requests", "Requests sent to a prefill/decode pair per second, by outcome: "
                           "served by the pair, or by one replica because the prefill or the decode member failed "
                           "(fallback_prefill / fallback_decode) or no pair was usable (fallback_no_pair).", "reqps",
                           [(f"sum by (outcome) (rate(kvfleet_disagg_requests_total[{RATE}]))", "{{outcome}}")]))
    d = d.with_panel(graph("KV hand-over", "Bytes per second pulled by decode replicas from prefill replicas "
                           "(vLLM's vllm:nixl_* names), and failed transfers per second (bad checksum, dead or stuck "
                           "prefill replica: the decode replica computed the prompt itself).", "Bps",
                           [(f"sum(rate(vllm:nixl_bytes_transferred_sum[{RATE}]))", "bytes/s"),
                            (f"sum(rate(vllm:nixl_num_failed_transfers_total[{RATE}]))", "failed/s")]))
    d = d.with_panel(graph("Prefill leg and transfer time", "Mean seconds of a disaggregated request's prefill leg "
                           "at the balancer, and of one KV transfer at the decode replica (0 while there are none).",
                           "s",
                           [(f"sum(increase(kvfleet_disagg_prefill_seconds_sum[{RATE}])) / "
                             f"clamp_min(sum(increase(kvfleet_disagg_prefill_seconds_count[{RATE}])), 1)", "prefill leg"),
                            (f"sum(increase(vllm:nixl_xfer_time_seconds_sum[{RATE}])) / "
                             f"clamp_min(sum(increase(vllm:nixl_xfer_time_seconds_count[{RATE}])), 1)", "KV transfer")]))
    d = d.with_panel(graph("Replica roles", "Replicas per role, as their load reports say (`kvfleet replica --role`).",
                           "short", [("sum by (role) (kvfleet_replica_role_info)", "{{role}}")], w=24))
    return build_dashboard(d)


# ---------------------------------------------------------------------------------- replica detail
def replica_detail() -> dict:
    sel = '{instance="$replica"}'
    d = _base("kvfleet / Replica detail", "kvfleet-replica-detail",
              "One inference replica (kvfleet or vLLM): its vLLM metrics and the balancer's view of it.")
    d = d.with_variable(gdash.QueryVariable("replica").label("Replica").datasource(DS)
                        .query("label_values(vllm:num_requests_running, instance)")
                        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
                        .include_all(False).multi(False))

    d = d.with_row(gdash.Row("Scheduler"))
    d = d.with_panel(graph("Running and waiting", "Requests in the running batch and in the queue.", "short",
                           [(f"vllm:num_requests_running{sel}", "running"),
                            (f"vllm:num_requests_waiting{sel}", "waiting")]))
    d = d.with_panel(graph("KV-cache usage", "Share of KV blocks in use (1 = full).", "percentunit",
                           [(f"vllm:kv_cache_usage_perc{sel}", "usage")]))
    d = d.with_panel(graph("Preemptions", "Requests preempted per second (KV cache full; recomputed later).", "short",
                           [(f"rate(vllm:num_preemptions_total{sel}[{RATE}])", "preemptions")]))

    d = d.with_row(gdash.Row("Prefix cache"))
    d = d.with_panel(graph("Prefix-cache hit rate", "Prompt tokens found cached / prompt tokens looked up.",
                           "percentunit",
                           [(f"sum(rate(vllm:prefix_cache_hits_total{sel}[{RATE}])) / "
                             f"sum(rate(vllm:prefix_cache_queries_total{sel}[{RATE}]))", "hit rate")]))
    d = d.with_panel(graph("Prefix-cache tokens", "Prompt tokens looked up and found per second.", "short",
                           [(f"rate(vllm:prefix_cache_queries_total{sel}[{RATE}])", "queried"),
                            (f"rate(vllm:prefix_cache_hits_total{sel}[{RATE}])", "hit")]))
    d = d.with_panel(graph("Token throughput", "Prompt tokens admitted and tokens generated per second.", "short",
                           [(f"rate(vllm:prompt_tokens_total{sel}[{RATE}])", "prompt"),
                            (f"rate(vllm:generation_tokens_total{sel}[{RATE}])", "generated")]))

    d = d.with_row(gdash.Row("Latency (at the replica)"))
    d = d.with_panel(quantiles("Time to first token", "Arrival at the replica to the first token.",
                               "vllm:time_to_first_token_seconds_bucket", sel))
    d = d.with_panel(quantiles("Inter-token latency", "Time between consecutive tokens of a request.",
                               "vllm:inter_token_latency_seconds_bucket", sel))
    d = d.with_panel(quantiles("End-to-end latency", "Arrival at the replica to the last token.",
                               "vllm:e2e_request_latency_seconds_bucket", sel))

    d = d.with_row(gdash.Row("Requests"))
    d = d.with_panel(graph("Finished requests by reason", "Requests finished per second: stop (EOS or stop string), "
                           "length (max_tokens), abort.", "reqps",
                           [(f"sum by (finished_reason) (rate(vllm:request_success_total{sel}[{RATE}]))",
                             "{{finished_reason}}")]))
    d = d.with_panel(quantiles("Prompt length", "Prompt tokens per request.", "vllm:request_prompt_tokens_bucket",
                               sel, unit="short"))
    d = d.with_panel(quantiles("Tokens per engine step", "Prefill + decode tokens computed per step (batch size "
                               "in tokens).", "vllm:iteration_tokens_total_bucket", sel, unit="short"))

    d = d.with_row(gdash.Row("The balancer's view"))
    rsel = '{replica="http://$replica"}'
    d = d.with_panel(graph("In flight at the balancer", "Requests the kvfleet balancer has sent here and not "
                           "finished (the balancer names a replica by its URL, http://instance).", "short",
                           [(f"sum(kvfleet_replica_inflight_requests{rsel})", "in flight")]))
    d = d.with_panel(graph("Routed here", "Requests per second the balancer answered from this replica, by status.",
                           "reqps",
                           [(f"sum by (status) (rate(kvfleet_requests_total{rsel}[{RATE}]))", "{{status}}")]))
    d = d.with_panel(graph("Cache hits: predicted vs reported", "Share of the prompt tokens routed here that the "
                           "balancer's index predicted cached, and that the replica reported cached.",
                           "percentunit",
                           [(f"sum(rate(kvfleet_predicted_cached_tokens_total{rsel}[{RATE}])) / "
                             f"sum(rate(kvfleet_prompt_tokens_total{rsel}[{RATE}]))", "predicted"),
                            (f"sum(rate(kvfleet_reported_cached_tokens_total{rsel}[{RATE}])) / "
                             f"sum(rate(kvfleet_prompt_tokens_total{rsel}[{RATE}]))", "reported")]))

    # --- KV offload tiers (issue #19 part 1): the host (CPU) and disk tiers below the KV pool
    d = d.with_row(gdash.Row("KV offload tiers"))
    d = d.with_panel(graph("Tier hits", "Prompt tokens per second loaded back from each offload tier instead of "
                           "recomputed, and prompt tokens looked up in the tiers (vLLM's external prefix cache).",
                           "short",
                           [(f"sum by (medium) (rate(kvfleet_replica_kv_offload_hits_total{sel}[{RATE}]))",
                             "hit {{medium}}"),
                            (f"rate(vllm:external_prefix_cache_queries_total{sel}[{RATE}])", "queried")]))
    d = d.with_panel(graph("Tier traffic", "Bytes per second copied between the KV pool and the tiers, by vLLM's "
                           "transfer_type (GPU_to_CPU: spills; CPU_to_GPU: loads; a sim replica models them).",
                           "Bps",
                           [(f"sum by (transfer_type) (rate(vllm:kv_offload_total_bytes_total{sel}[{RATE}]))",
                             "{{transfer_type}}")]))
    d = d.with_panel(graph("Tier fill and churn", "Share of each tier's blocks in use (left), and blocks per second "
                           "entering and evicted from it.", "short",
                           [(f"sum by (medium) (kvfleet_replica_kv_offload_blocks{sel}) / sum by (medium) "
                             f"(kvfleet_replica_kv_offload_capacity_blocks{sel})", "fill {{medium}}"),
                            (f"sum by (medium) (rate(kvfleet_replica_kv_offload_stores_total{sel}[{RATE}]))",
                             "stored/s {{medium}}"),
                            (f"sum by (medium) (rate(kvfleet_replica_kv_offload_evictions_total{sel}[{RATE}]))",
                             "evicted/s {{medium}}")]))

    # --- LoRA adapters (issue #17 part 5): which are resident here, and what loading them costs
    d = d.with_row(gdash.Row("LoRA adapters"))
    d = d.with_panel(graph("Adapters resident", "1 while the LoRA adapter is resident on this replica (at most "
                           "--max-loras at once; the least recently used is evicted for another).", "short",
                           [(f"max by (lora_name) (kvfleet_replica_lora_resident{sel})", "{{lora_name}}")], w=12))
    d = d.with_panel(graph("Adapter loads", "Adapter loads per second and the mean seconds one took (a sim replica "
                           "models it, --lora-load-s).", "short",
                           [(f"rate(kvfleet_replica_lora_loads_total{sel}[{RATE}])", "loads/s"),
                            (f"kvfleet_replica_lora_load_seconds_total{sel} / "
                             f"clamp_min(kvfleet_replica_lora_loads_total{sel}, 1)", "mean load s")], w=12))

    # --- KV hand-over (issue #19 part 3): what this replica pulled as a decode replica
    d = d.with_row(gdash.Row("KV hand-over"))
    d = d.with_panel(graph("KV pulled", "Bytes per second this replica pulled from prefill replicas, and its failed "
                           "transfers per second (it then computed those prompt blocks itself).", "Bps",
                           [(f"rate(vllm:nixl_bytes_transferred_sum{sel}[{RATE}])", "bytes/s"),
                            (f"rate(vllm:nixl_num_failed_transfers_total{sel}[{RATE}])", "failed/s")], w=12))
    d = d.with_panel(graph("KV transfer time", "Mean seconds per transfer (0 while there are none), and prefills "
                           "whose kept KV expired before a decode replica pulled it (--kv-transfer-keep).", "s",
                           [(f"increase(vllm:nixl_xfer_time_seconds_sum{sel}[{RATE}]) / "
                             f"clamp_min(increase(vllm:nixl_xfer_time_seconds_count{sel}[{RATE}]), 1)", "mean transfer"),
                            (f"increase(vllm:nixl_num_kv_expired_reqs_total{sel}[{RATE}])", "expired")], w=12))
    return build_dashboard(d)


# ---------------------------------------------------------------------------------- endpoint picker
# `kvfleet picker` (balancer/picker/, issue #18): its own series (`kvfleet_picker_*`) beside the
# balancer metrics it shares (the picker books requests through the same Router, so the
# `kvfleet_requests_total`, decision and cache series mean the same). Scrape the picker's HTTP
# port as a balancer target. Proven on a real Prometheus by tests/test_picker_prometheus.py.
def picker_overview() -> dict:
    d = _base("kvfleet / Endpoint picker", "kvfleet-endpoint-picker",
              "kvfleet picker behind an Envoy gateway: what it picked, refused and lost, how long the picks "
              "took, and what the requests it placed delivered.")
    d = d.with_row(gdash.Row("Picks"))
    d = d.with_panel(graph("Picks by outcome", "ext_proc requests answered per second: `policy` (a generation "
                           "placed by the routing policy), `load` (another route, by load), or the refusal sent "
                           "instead (bad_request, not_found, too_large, no_replica, misconfigured).", "reqps",
                           [(f"sum by (outcome) (rate(kvfleet_picker_picks_total[{RATE}]))", "{{outcome}}")]))
    d = d.with_panel(graph("Requests by replica", "Requests per second whose response ended, by the replica the "
                           "picker chose and its status class.", "reqps",
                           [(f"sum by (replica, status) (rate(kvfleet_requests_total[{RATE}]))",
                             "{{replica}} {{status}}")]))
    d = d.with_panel(graph("ext_proc streams", "Streams open now (one per request in Envoy) and streams that "
                           "closed before their response ended, per interval (client gone, upstream reset, "
                           "Envoy timeout).", "short",
                           [("sum(kvfleet_picker_streams)", "open"),
                            (f"sum(increase(kvfleet_picker_aborted_total[{RATE}]))", "aborted")]))
    d = d.with_row(gdash.Row("Latency (seen by the picker)"))
    d = d.with_panel(quantiles("Routing decision", "Tokenize, hash, prefix-index lookup and policy scoring of one "
                               "request.", "kvfleet_routing_decision_seconds_bucket"))
    d = d.with_panel(quantiles("To the first response byte", "The request's headers at the picker to the first "
                               "response body chunk Envoy passed to it.", "kvfleet_time_to_first_token_seconds_bucket"))
    d = d.with_panel(quantiles("To the response's end", "The request's headers at the picker to the end of its "
                               "response.", "kvfleet_e2e_request_latency_seconds_bucket"))
    d = d.with_row(gdash.Row("Cache and load"))
    d = d.with_panel(graph("Cache hit rate: predicted vs reported", "Share of picked prompt tokens the prefix index "
                           "predicted the chosen replica holds, and what the replicas reported (usage.cached_tokens, "
                           "read from the responses through Envoy).", "percentunit",
                           [(ratio("kvfleet_predicted_cached_tokens_total", "kvfleet_prompt_tokens_total"),
                             "predicted"),
                            (ratio("kvfleet_reported_cached_tokens_total", "kvfleet_prompt_tokens_total"),
                             "reported")]))
    d = d.with_panel(graph("In flight by replica", "Requests the picker placed on each replica whose response has "
                           "not ended.", "short",
                           [("sum by (replica) (kvfleet_replica_inflight_requests)", "{{replica}}")]))
    d = d.with_panel(graph("Prefix index", "KV blocks the picker's prefix index holds per replica (from the "
                           "replicas' KV events).", "short",
                           [("sum by (replica) (kvfleet_indexed_blocks)", "{{replica}}")]))
    return build_dashboard(d)
# ---------------------------------------------------------------------------------- end of endpoint picker


# ---------------------------------------------------------------------------------- files
def render() -> dict[str, str]:
    """Every generated file: name (relative to dashboards/) -> content."""
    def dump(d: dict) -> str:
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    dashboards = {
        "fleet-overview.json": dump(fleet_overview()),
        "replica-detail.json": dump(replica_detail()),
        "picker-overview.json": dump(picker_overview()),  # kvfleet picker (issue #18)
    }
    # The Helm chart ships the same dashboards in a ConfigMap (Helm reads only files inside a chart).
    in_chart = {os.path.join(CHART_DASHBOARDS, name): text for name, text in dashboards.items()}
    return {**dashboards, "prometheus.yml": scrape_config("targets", STATIC_SCRAPE_INTERVAL_S), **in_chart}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if a file is out of date")
    args = ap.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = os.path.join(HERE, name)
        try:
            with open(path) as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current == text:
            continue
        stale.append(name)
        if not args.check:
            with open(path, "w") as f:
                f.write(text)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run `python dashboards/build.py`", file=sys.stderr)
        return 1
    print(("stale: " if args.check else "wrote: ") + (", ".join(stale) or "nothing (up to date)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
