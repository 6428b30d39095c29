"""Prometheus metrics of the API and the ring (prometheus-client), on a private registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mlxring_requests", "Requests served", ["endpoint", "status"], registry=r
        )
        self.errors = Counter(
            "mlxring_error_responses", "Error responses (4xx, 5xx)", ["status"], registry=r
        )
        # every answer, whatever the route (access.AccessLog); 499: the client left first
        self.responses = Counter(
            "mlxring_http_responses", "HTTP responses by status code", ["code"], registry=r
        )
        self.prompt_tokens = Counter("mlxring_prompt_tokens", "Prompt tokens", registry=r)
        self.generated_tokens = Counter("mlxring_generated_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "mlxring_time_to_first_token_seconds", "Time to first token", registry=r
        )
        self.token_latency = Histogram(
            "mlxring_inter_token_latency_seconds",
            "Time between tokens of a request",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.queue_depth = Gauge(
            "mlxring_queue_depth", "Requests waiting for admission", registry=r
        )
        self.live = Gauge("mlxring_live_sequences", "Sequences being generated", registry=r)
        self.step_time = Gauge(
            "mlxring_rank_step_seconds", "Mean step time per rank", ["rank", "layers"], registry=r
        )
        self.cache_bytes = Gauge(
            "mlxring_rank_cache_bytes", "KV cache bytes per rank", ["rank", "layers"], registry=r
        )
