"""What the server saw: counters, and the busiest 60 s of accepted traffic (to check clients' pacing)."""

from __future__ import annotations

import time
from collections import Counter, deque

from .budget import WINDOW_SECONDS


class ServerStats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0  # chat completion requests received
        self.accepted = 0
        self.rate_limited = 0  # refused by the RPM/TPM budget (not the injected "429" fault)
        self.rejected = 0  # refused for auth, quota or a bad request
        self.faults: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.first_accepted_at: float | None = None
        self.last_accepted_at: float | None = None
        self.max_requests_per_60s = 0
        self.max_tokens_per_60s = 0
        self._window: deque[tuple[float, int]] = deque()  # (monotonic time, tokens charged)
        self._window_tokens = 0

    def record_accepted(self, now: float, charged_tokens: int, prompt_tokens: int, completion_tokens: int) -> None:
        """Count an accepted request; `charged_tokens` is what the TPM budget was charged."""
        self.accepted += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        wall = time.time()
        if self.first_accepted_at is None:
            self.first_accepted_at = wall
        self.last_accepted_at = wall

        window = self._window
        window.append((now, charged_tokens))
        self._window_tokens += charged_tokens
        cutoff = now - WINDOW_SECONDS
        while window[0][0] <= cutoff:
            self._window_tokens -= window.popleft()[1]
        self.max_requests_per_60s = max(self.max_requests_per_60s, len(window))
        self.max_tokens_per_60s = max(self.max_tokens_per_60s, self._window_tokens)

    def snapshot(self) -> dict:
        return {
            "requests": self.requests,
            "accepted": self.accepted,
            "rate_limited": self.rate_limited,
            "rejected": self.rejected,
            "faults": dict(self.faults),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "max_requests_per_60s": self.max_requests_per_60s,
            "max_tokens_per_60s": self.max_tokens_per_60s,
            "first_accepted_at": self.first_accepted_at,
            "last_accepted_at": self.last_accepted_at,
        }
