"""Prometheus metrics for /metrics: requests, tokens, latency histograms, queues, models, memory.

One `Metrics` per app with its own CollectorRegistry (no process-global state, so tests can run
several apps). Gauges that mirror other owners' state are read at scrape time through callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

# What the scrape-time collector reads: {model: value} maps, the memory numbers, the config's
# validity ({"valid": 1 or 0}) and each declared model's conditions ({"model\tType": 1 or 0}).
Snapshot = Callable[[], Mapping[str, Mapping[str, float]]]


class _Live(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        specs = {
            "queue_depth": (
                "lmx_queue_depth",
                "sequences waiting for a place in the model's batch per model",
            ),
            "in_flight": ("lmx_in_flight", "requests in flight per model"),
            "resident_bytes": ("lmx_model_resident_bytes", "bytes a loaded model holds"),
            "state": ("lmx_model_ready", "1 if the model is loaded and ready"),
        }
        for key, (name, doc) in specs.items():
            g = GaugeMetricFamily(name, doc, labels=["model"])
            for model, value in snap.get(key, {}).items():
                g.add_metric([model], value)
            yield g
        counters = {
            "steps": ("lmx_engine_steps", "batch steps since the model was loaded"),
            "prefill_steps": (
                "lmx_engine_prefill_steps",
                "batch steps that also processed prompts (each an extra forward pass)",
            ),
            "step_seconds": ("lmx_engine_step_seconds", "time in the engine's batch steps"),
            "overhead_seconds": (
                "lmx_engine_overhead_seconds",
                "time the engine's stepping thread spends between steps on their results",
            ),
        }
        for key, (name, doc) in counters.items():
            c = CounterMetricFamily(name, doc, labels=["model"])
            for model, value in snap.get(key, {}).items():
                c.add_metric([model], value)
            yield c
        mem = GaugeMetricFamily("lmx_memory_bytes", "memory budget and use", labels=["kind"])
        for kind, value in snap.get("memory", {}).items():
            mem.add_metric([kind], value)
        yield mem
        if "config" in snap:
            yield GaugeMetricFamily(
                "lmx_config_valid",
                "1 if the config file validates; 0 while the last good state serves instead",
                value=snap["config"].get("valid", 1.0),
            )
        cond = GaugeMetricFamily(
            "lmx_model_condition",
            "a declared model's conditions (Ready, Quarantined, Degraded, ...): 1 if true",
            labels=["model", "condition"],
        )
        for key, value in snap.get("conditions", {}).items():
            model, _, condition = key.partition("\t")
            cond.add_metric([model, condition], value)
        yield cond


class Metrics:
    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lmx_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("lmx_prompt_tokens", "prompt tokens", ["model"], registry=r)
        self.completion_tokens = Counter(
            "lmx_completion_tokens", "generated tokens", ["model"], registry=r
        )
        self.ttft = Histogram(
            "lmx_time_to_first_token_seconds",
            "time from request to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue = Histogram(
            "lmx_request_queue_seconds",
            "time a request waited in its model's engine before its prefill began",
            ["model"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.prefill = Histogram(
            "lmx_request_prefill_seconds",
            "time from the start of a request's prefill to its first token",
            ["model"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.itl = Histogram(
            "lmx_inter_token_latency_seconds",
            "time between tokens of one sequence",
            ["model"],
            buckets=_ITL_BUCKETS_S,
            registry=r,
        )
        if snapshot is not None:
            r.register(_Live(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
