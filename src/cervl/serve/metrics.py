"""Prometheus metrics for the server: requests, latency, batch sizes, errors (``prometheus-client``).

Each server has its own registry (tests run several apps in one process). ``prometheus-client``
handles the text format, label escaping and the content type; a server run under a process manager
with several workers can use its multi-process mode (``PROMETHEUS_MULTIPROC_DIR``) unchanged.
"""

from __future__ import annotations

import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's counters and histograms in a registry of its own; :meth:`render` gives the text format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cervl_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("cervl_request_latency_seconds", "Request latency.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("cervl_errors", "Error responses by kind.", ["kind"], registry=r)
        self.batch = Histogram("cervl_batch_size", "Images per model call (dynamic batching).",
                               buckets=BATCH_BUCKETS, registry=r)
        self.calls = Counter("cervl_model_calls", "Model calls.", registry=r)
        self.images = Counter("cervl_images_scored", "Images scored.", registry=r)
        self.lock = threading.Lock()
        self.model_calls = self.images_scored = 0  # plain numbers too, for the tests and the load benchmark

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels("server" if status >= 500 else "client").inc()

    def batch_size(self, n: int) -> None:
        self.batch.observe(n)
        self.calls.inc()
        self.images.inc(n)
        with self.lock:
            self.model_calls += 1
            self.images_scored += n

    def render(self) -> str:
        return generate_latest(self.registry).decode()
