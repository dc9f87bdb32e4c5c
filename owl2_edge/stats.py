"""What one answer did: exact counts and stage timings, as `owl.stats` and `--json` report them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    """Counts (exact) and timings (seconds) of the last generation."""
    prompt_positions: int = 0      # spliced positions of the prompt (images count n_visual each)
    reused_positions: int = 0      # of those, already in the KV cache
    disk_positions: int = 0        # of the reused, those read from the disk cache
    evaluated_positions: int = 0   # prompt positions the decoder actually ran
    generated_tokens: int = 0
    tokens: list[int] = field(default_factory=list)  # the generated ids, eos excluded
    # With logprobs: one sampling.TokenLogprob per generated token (eos excluded)
    logprobs: list = field(default_factory=list)
    images_encoded: int = 0        # vision model runs it took (0: every image came from the cache)
    finish_reason: str = ""        # "stop" (eos), "length" (max_tokens) or "context" (cache full)
    # "vision", "prefill", "decode"; "load_wait" (waiting for the decoder's weights after a
    # load that did not wait) and "first_token" (from the call to the first logits). The vision
    # model runs while the text before the first image is prefilled: the stages overlap.
    timings: dict = field(default_factory=dict)

    def rates(self, load_seconds: float = 0.0) -> dict:
        """Stage times rounded for people, and prefill / decode speeds (positions or tokens per
        second of the stage; 0.0 where a stage did not run)."""
        t = self.timings
        prefill, decode = t.get("prefill", 0.0), t.get("decode", 0.0)
        return {"load_s": round(load_seconds, 3), "vision_s": round(t.get("vision", 0.0), 3),
                "load_wait_s": round(t.get("load_wait", 0.0), 3),
                "first_token_s": round(t.get("first_token", 0.0), 3),
                "prefill_s": round(prefill, 3), "decode_s": round(decode, 3),
                "prefill_tok_per_s": round(self.evaluated_positions / prefill, 2) if prefill else 0.0,
                "decode_tok_per_s": round(self.generated_tokens / decode, 2) if decode else 0.0}
