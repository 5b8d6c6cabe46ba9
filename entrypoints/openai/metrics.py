"""/metrics: vLLM's metric names under the `pageport:` prefix, one CollectorRegistry per app.

Gauges and counters are read at scrape time from the snapshot the engine thread publishes after every step
(no lock, no work on the engine thread). Latency histograms are observed on the server's event loop when a
request finishes, from the engine's own timestamps (time.monotonic): TTFT and queue time from the request's
arrival at the server, inter-token latency per generated token.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pageport.core.outputs import RequestOutput

PREFIX = "pageport:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0]
_REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0]


class _EngineCollector:
    """Engine gauges and counters from AsyncLLMEngine.snapshot."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def _gauge(self, name, doc, value):
        g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
        g.add_metric([self.model_name], value)
        return g

    def _counter(self, name, doc, value):
        c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
        c.add_metric([self.model_name], value)
        return c

    def collect(self):
        s = self.engine.snapshot
        yield self._gauge("num_requests_running", "Requests in the running batch.", s.num_running)
        yield self._gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield self._gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
                          s.kv_cache_usage)
        yield self._gauge("engine_dead", "1 once the engine loop has died.", 1 if self.engine.errored else 0)
        yield self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            s.prefix_cache_queries)
        yield self._counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield self._counter("mm_cache_queries", "Images looked up in the encoder cache.", s.mm_cache_queries)
        yield self._counter("mm_cache_hits", "Images found in the encoder cache (their vision tower not run).",
                            s.mm_cache_hits)
        yield self._counter("num_preemptions", "Preemptions (by recompute).", s.num_preemptions)
        yield self._counter("prompt_tokens", "Prefilled prompt tokens.", s.prompt_tokens)
        yield self._counter("generation_tokens", "Generated tokens.", s.generation_tokens)
        if s.spec_decode:  # vLLM's vllm:spec_decode_* names
            yield self._counter("spec_decode_num_drafts", "Proposals verified (one per request and step).",
                                s.spec_num_drafts)
            yield self._counter("spec_decode_num_draft_tokens", "Proposed tokens verified.", s.spec_num_draft_tokens)
            yield self._counter("spec_decode_num_accepted_tokens", "Proposed tokens accepted.",
                                s.spec_num_accepted_tokens)
            yield self._counter("spec_decode_num_emitted_tokens", "Tokens emitted by steps that verified proposals.",
                                s.spec_num_emitted_tokens)
        c = CounterMetricFamily(PREFIX + "request_success", "Finished requests (per completion), by finish reason.",
                                labels=["model_name", "finished_reason"])
        for reason in sorted(set(s.finished) | {"stop", "length", "abort"}):
            c.add_metric([self.model_name, reason], s.finished.get(reason, 0))
        yield c


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(engine, model_name))
        labels = ["model_name"]
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token (from arrival).",
                              labels, buckets=_TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between generated tokens.",
                             labels, buckets=_ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token.",
                             labels, buckets=_REQUEST_BUCKETS, registry=self.registry).labels(model_name)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds", "Arrival to first scheduling.",
                               labels, buckets=_REQUEST_BUCKETS, registry=self.registry).labels(model_name)

    def observe(self, out: RequestOutput, itls: list[float]) -> None:
        """AsyncLLMEngine's observer: one finished request."""
        m = out.metrics or {}
        arrival = m.get("arrival_time")
        if arrival is None:
            return
        if m.get("first_token_time") is not None:
            self.ttft.observe(max(0.0, m["first_token_time"] - arrival))
        if m.get("first_scheduled_time") is not None:
            self.queue.observe(max(0.0, m["first_scheduled_time"] - arrival))
        if m.get("last_token_time") is not None:
            self.e2e.observe(max(0.0, m["last_token_time"] - arrival))
        for v in itls:
            self.itl.observe(v)

    def render(self) -> bytes:
        return generate_latest(self.registry)
