"""One rate budget (requests and tokens per minute) shared through Redis by every worker.

    limiter = RateLimiter(redis.Redis.from_url(url))
    limiter.configure(key, Limits(rpm=500))        # optional: else learnt from headers, else fallback
    while (wait := limiter.reserve(key, tokens)) > 0:
        time.sleep(wait)
    response = call()                              # then:
    limiter.observe(key, response.headers)         # learn limits; take no more than is left
    limiter.settle(key, tokens, used_tokens)       # refund or charge the estimate's error
    limiter.cool_down(key, retry_after)            # after a 429: every worker waits

`key` names one provider budget, e.g. a model name plus a short hash of the API key (never the key
itself). Redis keys are `<namespace>:<key>` hashes that expire when idle.

`NullLimiter` has the same methods and never limits (`reserve` always returns 0.0): use it where no
limit applies. Both implement the abstract `Limiter`.

The algorithm (GCRA, in the `.lua` files next to this module) guarantees, per budget: in any
60 s window at most rpm + burst requests and tpm + burst + one request's tokens, where burst is
`burst_seconds` worth of the rate (at least one unit). A new budget offers one burst, not a minute.

Headroom (`headroom=True`, the default): the burst grows with the evidence of
`x-ratelimit-remaining-*` (doubling each second while the provider reports more than our burst
left), up to the most it ever reported, so a token bucket that holds a minute is spent early; the
bound above is then rpm + that much. A 429 while the latest headers reported room marks the
budget quantized (`quantized(key)`, shared in Redis): back to `burst_seconds`, for good. After
every cool-down the schedules resume at the rate, without a fresh burst.

`observe` reads `x-ratelimit-limit-*` (the learnt limits) and `x-ratelimit-remaining-*`: when
fewer remain than the burst our schedule would allow now, only those are admitted. The
`x-ratelimit-reset-*` headers add nothing to that (reset = what is used / the rate), and reading
remaining/reset as a backlog to wait out throttles a client that paces at exactly the limit.
`parse_go_duration` reads them; `wait_hint_seconds` is the one reader of every wait a refused
request asks for (retry-after-ms, retry-after, "try again in 1m30s").

Beside the rate budget, `spend.py` holds the spend budget (money, for a sweep's spend cap):
the abstract `SpendLimiter` with a Redis backend (Lua in `spend_*.lua`) and an in-memory one.
"""

from .durations import parse_go_duration, wait_hint_seconds
from .limiter import IDLE_EXPIRY_SECONDS, Limiter, Limits, NullLimiter, RateLimiter
from .spend import MemorySpendLimiter, RedisSpendLimiter, Spend, SpendLimiter

__all__ = ["IDLE_EXPIRY_SECONDS", "Limiter", "Limits", "MemorySpendLimiter", "NullLimiter", "RateLimiter",
           "RedisSpendLimiter", "Spend", "SpendLimiter", "parse_go_duration", "wait_hint_seconds"]
