"""Prometheus text metrics for the server: requests, latency, batch sizes, errors (no extra dependency)."""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets: tuple):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        out += [f"{name}_sum{{{labels}}} {self.sum:.6f}" if labels else f"{name}_sum {self.sum:.6f}",
                f"{name}_count{{{labels}}} {self.n}" if labels else f"{name}_count {self.n}"]
        return out


class Metrics:
    """Thread-safe counters and histograms, rendered in the Prometheus text format."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status) -> n
        self.errors: Counter = Counter()  # kind -> n
        self.latency: dict[str, Histogram] = {}
        self.batch = Histogram(BATCH_BUCKETS)
        self.model_calls = 0
        self.images_scored = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)
            if status >= 400:
                self.errors["server" if status >= 500 else "client"] += 1

    def batch_size(self, n: int) -> None:
        with self.lock:
            self.batch.observe(n)
            self.model_calls += 1
            self.images_scored += n

    def render(self) -> str:
        with self.lock:
            out = ["# HELP cervl_requests_total HTTP requests by endpoint and status.",
                   "# TYPE cervl_requests_total counter"]
            out += [f'cervl_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP cervl_request_latency_seconds Request latency.",
                    "# TYPE cervl_request_latency_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                out += h.lines("cervl_request_latency_seconds", f'endpoint="{e}"')
            out += ["# HELP cervl_batch_size Images per model call (dynamic batching).",
                    "# TYPE cervl_batch_size histogram", *self.batch.lines("cervl_batch_size"),
                    "# HELP cervl_model_calls_total Model calls.", "# TYPE cervl_model_calls_total counter",
                    f"cervl_model_calls_total {self.model_calls}",
                    "# HELP cervl_images_scored_total Images scored.", "# TYPE cervl_images_scored_total counter",
                    f"cervl_images_scored_total {self.images_scored}",
                    "# HELP cervl_errors_total Error responses by kind.", "# TYPE cervl_errors_total counter"]
            out += [f'cervl_errors_total{{kind="{k}"}} {n}' for k, n in sorted(self.errors.items())]
            return "\n".join(out) + "\n"
