"""The server's counters, as GET /metrics returns them (JSON): requests and their statuses, the
model's work (images, prompt positions evaluated and taken from the cache, tokens) and the
queue's. Only the event loop's thread writes them (no lock needed)."""

from __future__ import annotations

from collections import Counter

from owl2_edge.stats import Stats


class Metrics:
    def __init__(self):
        self.requests = 0
        self.statuses: Counter[int] = Counter()   # every answered request by HTTP status
        self.answers = 0                          # answers the model started
        self.disconnects = 0                      # answers stopped because the client left
        self.stream_errors = 0                    # errors after a stream's 200 went out
        self.images = 0                           # images received in answered requests
        self.vision_runs = 0                      # vision model runs (each encodes <= 4 new images)
        self.image_cache_hits = 0                 # see add_answer
        self.prompt_positions = 0
        self.evaluated_positions = 0
        self.reused_positions = 0
        self.tokens_generated = 0
        self.queue_waits = 0                      # requests that had to wait for the model
        self.queue_wait_seconds = 0.0
        self.queue_rejected = 0                   # 429s
        self.timeouts = 0                         # requests that ran into their time limit

    def waited(self, seconds: float) -> None:
        if seconds > 1e-3:
            self.queue_waits += 1
        self.queue_wait_seconds += seconds

    def add_answer(self, stats: Stats, n_images: int) -> None:
        """One answer's counts from its Stats. Image cache hits: Stats counts vision runs, not
        images, so a request's images count as hits when it needed no run at all."""
        self.answers += 1
        self.images += n_images
        self.vision_runs += stats.images_encoded
        if stats.images_encoded == 0:
            self.image_cache_hits += n_images
        self.prompt_positions += stats.prompt_positions
        self.evaluated_positions += stats.evaluated_positions
        self.reused_positions += stats.reused_positions
        self.tokens_generated += stats.generated_tokens

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
            "queue": {"busy": queue.busy, "waiting": queue.waiting,
                      "max_waiting": queue.max_waiting,
                      "waits": self.queue_waits,
                      "wait_seconds": round(self.queue_wait_seconds, 3),
                      "rejected": self.queue_rejected},
        }


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
