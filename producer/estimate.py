"""The pre-flight estimate behind `sweep --dry-run` and `estimate`: what a sweep will send, cost and
take, computed offline. It stores nothing, enqueues nothing and calls no API.

Input tokens are counted exactly, per rendered prompt, with the counter the rate budget uses
(`worker.tokens`, bpe-openai's offline vocabularies): the messages are built by the same function
the workers use, so the count equals what a server that counts like OpenAI reports as
`usage.prompt_tokens`. Output tokens are bounded by `max_output_tokens`; the expected figure is the
mean output of earlier sweeps of the same model, when the database has some.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from gridtune import pricing
from gridtune.settings import Settings
from gridtune.sweep import SweepConfig
from worker.generation import build_messages
from worker.ratelimit import Limits
from worker.tokens import count_messages, encoding_name

BATCH_WINDOW_HOURS = 24  # the Batch API's only completion window


@dataclass(frozen=True)
class History:
    """Output of earlier sweeps of the same model: ok rows with usage and their completion tokens."""

    rows: int
    completion_tokens: int
    sweeps: list[str]


@dataclass(frozen=True)
class Estimate:
    """A sweep's size, cost (USD) and duration (seconds) before it runs.

    Token figures are for the whole sweep. `*_max` costs assume every reply uses
    `max_output_tokens` (what the spend cap reserves); `*_expected` ones use the earlier sweeps'
    mean output, None without history. Costs are None when the price table has no row for the model.
    `seconds_online` is None when neither configured nor learnt limits are known.
    """

    name: str
    model: str
    requests: int
    combinations: int
    repeats: int
    input_tokens: int
    output_tokens_max: int
    output_tokens_expected: int | None
    expected_from: list[str]
    cost_online_max: float | None
    cost_batch_max: float | None
    cost_online_expected: float | None
    cost_batch_expected: float | None
    rpm: int | None
    tpm: int | None
    limits_from: str | None  # "GRIDTUNE_RPM/TPM", "sweep config", "learnt" or None
    seconds_online: float | None
    batch_window_hours: int = BATCH_WINDOW_HOURS
    max_cost_usd: float | None = None
    exact_input: bool = True  # False for models OpenAI's vocabularies do not cover (local models)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def count_input_tokens(config: SweepConfig) -> int:
    """Prompt tokens of the whole sweep: each combination's rendered messages counted once, times repeats."""
    encoding = encoding_name(config.model.name)
    total = 0
    for combination in range(config.combinations):
        params, _ = config.params(combination * config.repeats)
        prompt, _ = config.render(params)
        total += count_messages(build_messages(config, prompt), encoding)
    return total * config.repeats


def limits_in_force(config: SweepConfig, settings: Settings, learnt: Callable[[], Limits]) -> tuple[Limits, str | None]:
    """The limits the workers will pace at, and where they come from (as the workers choose them)."""
    if settings.rpm or settings.tpm:
        return Limits(rpm=settings.rpm, tpm=settings.tpm), "GRIDTUNE_RPM/TPM"
    if config.model.rpm or config.model.tpm:
        return Limits(rpm=config.model.rpm, tpm=config.model.tpm), "sweep config"
    try:
        found = learnt()
    except Exception:  # noqa: BLE001 - an estimate does without a Redis it cannot reach
        found = Limits()
    if found.rpm or found.tpm:
        return found, "learnt"
    return Limits(), None


def duration_seconds(requests: int, tokens: int, limits: Limits) -> float | None:
    """Seconds to send `requests` using `tokens` in all at `limits` (the slower of the two paces)."""
    paces = []
    if limits.rpm:
        paces.append(requests / limits.rpm * 60)
    if limits.tpm:
        paces.append(tokens / limits.tpm * 60)
    return max(paces) if paces else None


def estimate(
    name: str,
    config: SweepConfig,
    settings: Settings,
    *,
    history: History | None = None,
    learnt: Callable[[], Limits] = Limits,
    max_cost_usd: float | None = None,
) -> Estimate:
    """The pre-flight estimate of sweep `name` (see the module docstring). Raises UserError for a
    malformed price table."""
    requests = config.total_requests
    max_output = config.model.max_output_tokens
    input_tokens = count_input_tokens(config)
    output_max = requests * max_output
    output_expected = None
    if history and history.rows:
        per_request = min(history.completion_tokens / history.rows, max_output)
        output_expected = round(per_request * requests)
    model = config.model.name

    def cost(output: int | None, mode: pricing.Mode) -> float | None:
        return None if output is None else pricing.inference_cost(model, input_tokens, output, mode)

    limits, source = limits_in_force(config, settings, learnt)
    used_tokens = input_tokens + (output_expected if output_expected is not None else output_max)
    return Estimate(
        name=name, model=model, requests=requests, combinations=config.combinations, repeats=config.repeats,
        input_tokens=input_tokens, output_tokens_max=output_max, output_tokens_expected=output_expected,
        expected_from=list(history.sweeps) if output_expected is not None else [],
        cost_online_max=cost(output_max, "online"), cost_batch_max=cost(output_max, "batch"),
        cost_online_expected=cost(output_expected, "online"), cost_batch_expected=cost(output_expected, "batch"),
        rpm=limits.rpm, tpm=limits.tpm, limits_from=source,
        seconds_online=duration_seconds(requests, used_tokens, limits),
        max_cost_usd=max_cost_usd,
        exact_input=_known_encoding(model),
    )


def _known_encoding(model: str) -> bool:
    import bpe_openai

    base = model.split(":")[1] if model.startswith("ft:") and model.count(":") >= 1 else model
    try:
        bpe_openai.encoding_name_for_model(base)
    except KeyError:
        return False
    return True


def _usd(value: float | None) -> str:
    return "n/a (no price for this model in the price table)" if value is None else f"${value:,.4f}"


def _cost_line(mode: str, most: float | None, expected: float | None) -> str:
    if most is None:
        return f"  cost {mode}    {_usd(None)}"
    return f"  cost {mode}    at most {_usd(most)}" + (f"; expected {_usd(expected)}" if expected is not None else "")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def describe(est: Estimate) -> str:
    """The estimate as a few human lines."""
    expected = ""
    if est.output_tokens_expected is not None:
        expected = (f"; expected {est.output_tokens_expected:,} "
                    f"(mean of {', '.join(est.expected_from[:3])}{'...' if len(est.expected_from) > 3 else ''})")
    lines = [
        f"estimate for sweep {est.name} ({est.model}); nothing stored or sent",
        f"  requests       {est.requests:,} ({est.combinations:,} combinations x {est.repeats} repeats)",
        f"  input tokens   {est.input_tokens:,} " + ("(counted exactly)" if est.exact_input else
                                                      "(o200k_base: this model's own tokenizer may differ)"),
        f"  output tokens  at most {est.output_tokens_max:,}{expected}",
        _cost_line("online", est.cost_online_max, est.cost_online_expected),
        _cost_line("batch ", est.cost_batch_max, est.cost_batch_expected),
    ]
    if est.seconds_online is not None:
        limits = ", ".join(f"{v:,} {k}" for k, v in (("RPM", est.rpm), ("TPM", est.tpm)) if v)
        lines.append(f"  time online    about {_duration(est.seconds_online)} at {limits} ({est.limits_from})")
    else:
        lines.append("  time online    unknown: no rpm/tpm configured (GRIDTUNE_RPM/TPM, [model]) or learnt yet")
    lines.append(f"  time batch     up to {est.batch_window_hours} h (the Batch API's completion window)")
    if est.max_cost_usd is not None and est.cost_online_max is not None:
        if est.cost_online_max <= est.max_cost_usd:
            lines.append(f"  spend cap      ${est.max_cost_usd:,.4f}: the worst case fits")
        else:
            per_request = est.cost_online_max / est.requests
            fits = int(est.max_cost_usd // per_request) if per_request else est.requests
            lines.append(f"  spend cap      ${est.max_cost_usd:,.4f}: the sweep stops after about {fits:,} requests "
                         "(worst-case reservations; fewer replies at max length let more through)")
    return "\n".join(lines)
