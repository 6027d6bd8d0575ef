"""The server's Prometheus metrics (prometheus-client), in a registry of its own so that
two servers in one process (tests) keep separate counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: time to first token spans a queue wait and a prefill; inter-token is one step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gptjax_requests", "HTTP requests answered, by endpoint and "
                                "status code", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("gptjax_prompt_tokens", "prompt tokens admitted", registry=r)
        self.completion_tokens = Counter("gptjax_completion_tokens", "tokens generated",
                                         registry=r)
        self.waiting = Gauge("gptjax_queue_depth", "requests waiting for a slot", registry=r)
        self.live = Gauge("gptjax_batch_occupancy", "share of the decode slots in use",
                          registry=r)
        self.ttft = Histogram("gptjax_time_to_first_token_seconds", "submission to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("gptjax_inter_token_latency_seconds", "between a request's tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.steps = Counter("gptjax_decode_steps", "decode steps run", registry=r)
        self.step_rows = Histogram("gptjax_decode_step_rows", "requests advanced per decode step",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self._slots = 1

    # the scheduler's reports (gptjax.serve.scheduler.NullMetrics)
    def queue_depth(self, n: int) -> None:
        self.waiting.set(n)

    def occupancy(self, live: int, slots: int) -> None:
        self._slots = slots
        self.live.set(live / slots)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.completion_tokens.inc()

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.completion_tokens.inc()

    def step(self, live: int) -> None:
        self.steps.inc()
        self.step_rows.observe(live)
        self.live.set(live / self._slots)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
