"""A sweep's money: what each request costs, and the spend cap that no request may pass.

Costs come from the price table (`gridtune.pricing`) at the online price. With a cap
(`Sweep.max_cost_usd`), every API call first reserves its worst case — its prompt tokens at the
input price plus `max_output_tokens` at the output price — in the sweep's shared spend budget
(`worker.ratelimit.spend`), and settles the actual cost from `usage` afterwards. A reservation
that would pass the cap is refused and the sweep stops, so the cap can be exceeded by nothing.

A call that failed with an HTTP status cost nothing and is released; one whose fate is unknown
(timeout, dropped connection, unreadable body) may have been billed and keeps its worst case.
"""

from __future__ import annotations

from dataclasses import dataclass

from gridtune import pricing
from gridtune.errors import UserError
from gridtune.sweep import SweepConfig
from models.schema import Sweep
from worker.ratelimit.spend import Spend, SpendLimiter, sweep_budget_key

# Failure kinds (worker.llm.classify) after which the provider may still have run, and billed, the request.
MAYBE_BILLED = frozenset({"timeout", "connection", "malformed", "unexpected"})


def worst_case_cost(config: SweepConfig, prompt_tokens: int) -> float | None:
    """USD the request can cost at most: its prompt plus `max_output_tokens`; None if unpriced."""
    return pricing.inference_cost(config.model.name, prompt_tokens, config.model.max_output_tokens)


def require_price(config: SweepConfig) -> None:
    """A spend cap needs a price: UserError naming the model and the table otherwise."""
    if pricing.price(config.model.name) is None:
        raise UserError(f"a spend cap needs a price for model {config.model.name!r}: add it to the price "
                        "table (GRIDTUNE_PRICES) or run without --max-cost / max_cost_usd")


@dataclass
class RequestSpend:
    """One request's money. `reserve()` before each call; `settle()` or `release()` after it."""

    limiter: SpendLimiter
    key: str  # the sweep's budget (sweep_budget_key)
    model: str
    cap_usd: float | None
    worst_case_usd: float | None
    held: bool = False

    @classmethod
    def for_request(cls, limiter: SpendLimiter, sweep: Sweep, config: SweepConfig, prompt_tokens: int) -> RequestSpend:
        return cls(limiter, budget_key(sweep), config.model.name, sweep.max_cost_usd,
                   worst_case_cost(config, prompt_tokens))

    @property
    def capped(self) -> bool:
        return self.cap_usd is not None

    def reserve(self) -> bool:
        """Reserve the worst case; False when that would pass the cap (nothing reserved). Without a
        cap, always True. An unpriced model under a cap is refused (the producer checks first)."""
        if not self.capped:
            return True
        if self.worst_case_usd is None:
            return False
        self.held = self.limiter.reserve(self.key, self.worst_case_usd, self.cap_usd)
        return self.held

    def cap_reached(self) -> str | None:
        """Reserve before a call: None = go ahead, else why not (the sweep must stop)."""
        return None if self.reserve() else self.describe_cap()

    def settle(self, usage) -> float | None:
        """The call answered with `usage` (prompt_tokens, completion_tokens; None = not reported):
        record its cost and return it in USD (None if unpriced or unknown, then the worst case is kept)."""
        cost = None if usage is None else pricing.inference_cost(self.model, usage.prompt_tokens, usage.completion_tokens)
        self._end(cost if cost is not None else self.worst_case_usd)
        return cost

    def release(self, failure_kind: str) -> None:
        """The call failed: free the reservation, or keep its worst case if it may have been billed."""
        self._end(self.worst_case_usd if failure_kind in MAYBE_BILLED else 0.0)

    def _end(self, actual_usd: float | None) -> None:
        if self.held:
            self.held = False
            self.limiter.settle(self.key, self.worst_case_usd, actual_usd or 0.0)

    def describe_cap(self) -> str:
        state = self.limiter.state(self.key) if self.capped else Spend(0, 0)
        return (f"spend cap reached: ${state.spent_usd:.4f} spent and ${state.reserved_usd:.4f} reserved of "
                f"${self.cap_usd:.4f}; the next request could cost ${self.worst_case_usd or 0:.4f}")


def budget_key(sweep: Sweep) -> str:
    return sweep_budget_key(sweep.id, sweep.created_at)


def open_budget(limiter: SpendLimiter, sweep: Sweep, spent_usd: float) -> Spend:
    """When a capped sweep (re)starts: the shared budget learns what the database says was spent."""
    return limiter.open(budget_key(sweep), spent_usd)
