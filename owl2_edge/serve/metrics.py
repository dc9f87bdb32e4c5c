"""The server's counters: GET /metrics in Prometheus' text format (as llama-server), or as JSON
with ?format=json. Requests and their statuses, the model's work (images, prompt positions
evaluated and taken from the cache, tokens), the slots and the queue, and how long clients
wait: time to the first token and between tokens, as histograms. Only the event loop's thread
writes them (no lock needed); the engine's own numbers are read when rendered."""

from __future__ import annotations

import time
from collections import Counter, deque

from owl2_edge.engine import Job
from owl2_edge.serve.prometheus import INTER_TOKEN_BUCKETS, TTFT_BUCKETS, Exposition, Histogram

# The window of the tokens-per-second gauges (seconds).
RATE_WINDOW_S = 10.0
# Prometheus names start with this (llama-server's start with "llamacpp:").
PREFIX = "owl2:"


class _Rate:
    """Events (a count at a time) over the last RATE_WINDOW_S seconds, per second."""

    def __init__(self):
        self.events: deque[tuple[float, int]] = deque()

    def add(self, at: float, n: int) -> None:
        if n:
            self.events.append((at, n))

    def per_second(self, now: float) -> float:
        while self.events and self.events[0][0] < now - RATE_WINDOW_S:
            self.events.popleft()
        return sum(n for _, n in self.events) / RATE_WINDOW_S


class Metrics:
    def __init__(self):
        self.requests = 0
        self.statuses: Counter[int] = Counter()   # every answered request by HTTP status
        self.answers = 0                          # answers the engine started
        self.disconnects = 0                      # answers stopped because the client left
        self.stream_errors = 0                    # errors after a stream's 200 went out
        self.images = 0                           # images received in answered requests
        self.vision_runs = 0                      # vision model runs (each encodes <= 4 new images)
        self.image_cache_hits = 0                 # see add_answer
        self.prompt_positions = 0
        self.evaluated_positions = 0
        self.reused_positions = 0
        self.tokens_generated = 0
        self.queue_waits = 0                      # requests that had to wait for a slot
        self.queue_wait_seconds = 0.0
        self.queue_rejected = 0                   # 429s
        self.timeouts = 0                         # requests that ran into their time limit
        self.answer_seconds = 0.0                 # summed over answers (Retry-After's estimate)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.inter_token = Histogram(INTER_TOKEN_BUCKETS)
        self._generated_rate, self._prompt_rate = _Rate(), _Rate()

    def add_answer(self, job: Job, n_images: int) -> None:
        """One answer's counts. Image cache hits: Stats counts vision runs, not images, so a
        request's images count as hits when it needed no run of its own."""
        stats = job.stats
        self.answers += 1
        self.images += n_images
        self.vision_runs += stats.images_encoded
        if stats.images_encoded == 0:
            self.image_cache_hits += n_images
        self.prompt_positions += stats.prompt_positions
        self.evaluated_positions += stats.evaluated_positions
        self.reused_positions += stats.reused_positions
        self.tokens_generated += stats.generated_tokens
        queued = stats.timings.get("queue", 0.0)
        if queued > 1e-3:
            self.queue_waits += 1
        self.queue_wait_seconds += queued
        self.answer_seconds += time.perf_counter() - job.submitted_at
        token_times = list(job.token_times)
        if job.first_token_at is not None:
            self.ttft.observe(job.first_token_at - job.started)
            self._prompt_rate.add(job.first_token_at, stats.evaluated_positions)
        for before, after in zip(token_times, token_times[1:]):
            self.inter_token.observe(after - before)
        for t in token_times:
            self._generated_rate.add(t, 1)

    def mean_answer_seconds(self) -> float | None:
        return self.answer_seconds / self.answers if self.answers else None

    def to_dict(self, queue) -> dict:
        return {
            "requests": self.requests,
            "responses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": {str(k): v for k, v in sorted(self.statuses.items()) if k >= 400},
            "answers": self.answers, "disconnects": self.disconnects,
            "stream_errors": self.stream_errors, "timeouts": self.timeouts,
            "images": self.images, "vision_runs": self.vision_runs,
            "image_cache_hits": self.image_cache_hits,
            "prompt_positions": self.prompt_positions,
            "prompt_positions_evaluated": self.evaluated_positions,
            "prompt_positions_reused": self.reused_positions,
            "tokens_generated": self.tokens_generated,
            "queue": {**queue.to_dict(), "waits": self.queue_waits,
                      "wait_seconds": round(self.queue_wait_seconds, 3),
                      "rejected": self.queue_rejected},
        }

    def prometheus(self, queue) -> str:
        """The same, in Prometheus' text format."""
        now = time.perf_counter()
        out = Exposition()
        p = PREFIX
        out.counter(p + "requests_total", "HTTP requests received.", self.requests)
        for status, n in sorted(self.statuses.items()):
            out.counter(p + "responses_total", "HTTP responses by status.", n,
                        {"status": str(status)})
        out.counter(p + "answers_total", "Answers the engine started.", self.answers)
        out.counter(p + "disconnects_total", "Answers stopped because the client left.",
                    self.disconnects)
        out.counter(p + "timeouts_total", "Requests that ran into their time limit.",
                    self.timeouts)
        out.counter(p + "requests_rejected_total", "Requests refused with 429 (queue full).",
                    self.queue_rejected)
        out.counter(p + "images_total", "Images received in answered requests.", self.images)
        out.counter(p + "vision_runs_total", "Vision model runs.", self.vision_runs)
        out.counter(p + "prompt_tokens_total", "Prompt positions evaluated (images count "
                    "n_visual).", self.evaluated_positions)
        out.counter(p + "prompt_tokens_reused_total", "Prompt positions taken from the KV cache.",
                    self.reused_positions)
        out.counter(p + "tokens_predicted_total", "Tokens generated.", self.tokens_generated)
        out.gauge(p + "prompt_tokens_seconds", f"Prompt positions evaluated per second over the "
                  f"last {RATE_WINDOW_S:g} s.", self._prompt_rate.per_second(now))
        out.gauge(p + "predicted_tokens_seconds", f"Tokens generated per second over the last "
                  f"{RATE_WINDOW_S:g} s.", self._generated_rate.per_second(now))
        out.gauge(p + "slots_busy", "Requests being answered.", queue.busy)
        out.gauge(p + "slots_total", "Requests answered at once at most (--parallel).",
                  queue.owl.parallel)
        out.gauge(p + "requests_waiting", "Requests queued for a slot.", queue.waiting)
        out.histogram(p + "time_to_first_token_seconds", "From a request's arrival to its "
                      "first token.", self.ttft)
        out.histogram(p + "inter_token_seconds", "Between two tokens of one answer.",
                      self.inter_token)
        return out.text()


class CountingMiddleware:
    """Pure ASGI middleware: counts each HTTP request and the status it was answered with."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.metrics.requests += 1

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.statuses[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counting_send)
