"""Prometheus metrics of the server (``GET /metrics``, text exposition format, as prometheus_client.generate_latest writes it).

One ``CollectorRegistry`` per app (tests build many apps in one process). Names:

* ``rlhflab_requests_total{endpoint, status}``: HTTP requests answered (``endpoint`` is
  ``"METHOD /path"`` for known routes, ``"other"`` for the rest; status 499 = client went away).
* ``rlhflab_request_duration_seconds{endpoint}``: latency histogram.
* ``rlhflab_generated_tokens_total`` / ``rlhflab_generated_candidates_total``: sampled tokens
  (through EOS / stop) and candidates, over all best_of rows.
* ``rlhflab_batch_rows`` / ``rlhflab_batch_requests``: histograms of rows and of requests per
  generation batch (``_count`` = batches run).
* ``rlhflab_queue_depth``: requests waiting for a batch; ``rlhflab_requests_in_flight``.
* ``rlhflab_requests_cancelled_total`` / ``rlhflab_requests_timed_out_total``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rlhflab_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("rlhflab_request_duration_seconds", "HTTP request latency",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("rlhflab_generated_tokens", "tokens sampled (all best_of candidates)", registry=r)
        self.candidates = Counter("rlhflab_generated_candidates", "candidates sampled", registry=r)
        self.batch_rows = Histogram("rlhflab_batch_rows", "rows (candidates) per generation batch",
                                    buckets=ROW_BUCKETS, registry=r)
        self.batch_requests = Histogram("rlhflab_batch_requests", "requests per generation batch",
                                        buckets=ROW_BUCKETS, registry=r)
        self.queue_depth = Gauge("rlhflab_queue_depth", "requests waiting for a generation batch", registry=r)
        self.in_flight_gauge = Gauge("rlhflab_requests_in_flight", "HTTP requests being answered", registry=r)
        self.cancelled_total = Counter("rlhflab_requests_cancelled", "requests stopped because the client went away",
                                       registry=r)
        self.timed_out = Counter("rlhflab_requests_timed_out", "requests stopped by the request timeout", registry=r)
        # Plain numbers for in-process use (tests, the drain on SIGTERM).
        self.in_flight = 0
        self.cancelled = 0

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def enter(self) -> None:
        self.in_flight += 1
        self.in_flight_gauge.set(self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1
        self.in_flight_gauge.set(self.in_flight)

    def generated(self, tokens: int, candidates: int) -> None:
        self.tokens.inc(tokens)
        self.candidates.inc(candidates)

    def cancel(self) -> None:
        self.cancelled += 1
        self.cancelled_total.inc()

    def observe_batch(self, rows: int, requests: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]
