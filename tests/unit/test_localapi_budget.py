"""localapi's building blocks on a fake clock: budgets, durations, the stats window, key phrases."""

import math

import pytest

from localapi.budget import RateLimiter, go_duration
from localapi.stats import ServerStats
from localapi.text import key_phrases


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.9994, "999ms"),
        (1, "1s"),
        (6.596, "6.596s"),
        (360, "6m0s"),
        (179.56, "2m59.56s"),
        (3600, "1h0m0s"),
    ],
)
def test_go_duration_formats_like_openai_headers(seconds, expected):
    assert go_duration(seconds) == expected


def test_burst_is_limited_to_the_bucket_and_refused_requests_cost_nothing():
    limiter = RateLimiter(rpm=600, tpm=None, burst_seconds=1.0)  # 10 per second, 10 at once
    accepted = [limiter.try_spend("k", 0, now=0.0) is None for _ in range(15)]
    assert accepted == [True] * 10 + [False] * 5

    refusal = limiter.try_spend("k", 0, now=0.0)
    assert (refusal.kind, refusal.limit, refusal.used, refusal.requested) == ("requests", 600, 10, 1)
    assert refusal.wait_seconds == pytest.approx(0.1)
    # One refill period later exactly one more fits: the refusals above took nothing.
    assert limiter.try_spend("k", 0, now=0.1) is None
    assert limiter.try_spend("k", 0, now=0.1) is not None


def test_the_sliding_minute_caps_what_the_bucket_would_allow():
    # A bucket of 60 refilling 1/s would let 90 through in the first 30 s; the window keeps it at 60.
    limiter = RateLimiter(rpm=60, tpm=None, burst_seconds=60)
    assert all(limiter.try_spend("k", 0, now=0.0) is None for _ in range(60))
    refusal = limiter.try_spend("k", 0, now=30.0)
    assert refusal is not None and refusal.wait_seconds == pytest.approx(30.0)
    assert limiter.try_spend("k", 0, now=60.0) is None


def test_tokens_budget_charges_the_cost_and_refuses_requests_larger_than_the_limit():
    limiter = RateLimiter(rpm=None, tpm=6000, burst_seconds=1.0)  # 100 tokens per second
    assert limiter.try_spend("k", 250, now=0.0) is None  # above the bucket, still fits: one request's cost
    refusal = limiter.try_spend("k", 50, now=0.0)
    assert (refusal.kind, refusal.used, refusal.requested) == ("tokens", 250, 50)
    assert "on tokens per min (TPM): Limit 6000, Used 250, Requested 50" in refusal.message("gpt-4o-mini")

    too_large = limiter.try_spend("k", 7000, now=100.0)
    assert too_large.too_large and math.isinf(too_large.wait_seconds)
    assert too_large.message("gpt-4o-mini").startswith("Request too large for gpt-4o-mini")


def test_keys_have_separate_budgets_and_headers_describe_the_window():
    limiter = RateLimiter(rpm=3000, tpm=1_000_000, burst_seconds=1.0)
    assert limiter.try_spend("a", 400, now=0.0) is None
    assert limiter.headers("a", now=0.0) == {
        "x-ratelimit-limit-requests": "3000",
        "x-ratelimit-remaining-requests": "2999",
        "x-ratelimit-reset-requests": "20ms",
        "x-ratelimit-limit-tokens": "1000000",
        "x-ratelimit-remaining-tokens": "999600",
        "x-ratelimit-reset-tokens": "24ms",
    }
    assert limiter.headers("b", now=0.0)["x-ratelimit-remaining-requests"] == "3000"
    assert RateLimiter(rpm=None, tpm=None, burst_seconds=1.0).headers("a", now=0.0) == {}


def test_stats_keep_the_busiest_sixty_seconds():
    stats = ServerStats()
    # 3 at 0 s, 2 at 30 s, 4 at 60.5 s: the busiest minute, (0.5 s, 60.5 s], holds 6 of the 9.
    for now in (0, 0, 0, 30, 30, 60.5, 60.5, 60.5, 60.5):
        stats.record_accepted(now, charged_tokens=100, prompt_tokens=10, completion_tokens=20)
    snapshot = stats.snapshot()
    assert snapshot["accepted"] == 9
    assert snapshot["max_requests_per_60s"] == 6
    assert snapshot["max_tokens_per_60s"] == 600
    assert (snapshot["prompt_tokens"], snapshot["completion_tokens"]) == (90, 180)
    stats.reset()
    assert stats.snapshot()["max_requests_per_60s"] == 0


def test_key_phrases_keep_content_words_in_order():
    prompt = (
        "Imagine a complete and detailed description of a 40-year-old woman fictional character "
        "who has the superpower of healing. Write out the description."
    )
    assert key_phrases(prompt) == ["40-year-old woman fictional character", "superpower of healing"]
    assert key_phrases("18, man, can eat a lot") == ["18", "man", "eat a lot"]


# --- the provider models a client must adapt to (issue 14): token bucket and per-second --------


def test_token_bucket_starts_full_with_a_minute_and_refills_continuously():
    limiter = RateLimiter(rpm=600, tpm=None, burst_seconds=1.0, model="token-bucket")  # 10 per second
    assert limiter.headers("k", 0.0)["x-ratelimit-remaining-requests"] == "600"
    accepted = sum(limiter.try_spend("k", 0, now=0.0) is None for _ in range(700))
    assert accepted == 600  # an idle key spends a whole minute at once
    refusal = limiter.try_spend("k", 0, now=0.0)
    assert refusal.wait_seconds == pytest.approx(0.1)
    assert "try again in 100ms" in refusal.message("m")
    headers = limiter.headers("k", 0.35)
    assert headers["x-ratelimit-remaining-requests"] == "3"  # 0.35 s of refill: 3.5, whole ones reported
    assert headers["x-ratelimit-reset-requests"] == "59.65s"  # until full again
    assert sum(limiter.try_spend("k", 0, now=0.35) is None for _ in range(10)) == 3
    # Never more than a full bucket, however long it idles.
    assert limiter.headers("k", 10_000.0)["x-ratelimit-remaining-requests"] == "600"


def test_per_second_server_admits_a_sixtieth_per_calendar_second_and_says_nothing_about_when():
    limiter = RateLimiter(rpm=3000, tpm=None, burst_seconds=1.0, model="per-second")  # 50 per second
    accepted = [limiter.try_spend("k", 0, now=10.2) is None for _ in range(60)]
    assert accepted == [True] * 50 + [False] * 10
    refusal = limiter.try_spend("k", 0, now=10.9)
    assert not refusal.says_when and "try again" not in refusal.message("m")
    # The headers report the minute, so they show room the second does not have.
    assert limiter.headers("k", 10.9)["x-ratelimit-remaining-requests"] == "2950"
    assert limiter.try_spend("k", 0, now=11.0) is None  # a new second
    assert limiter.headers("k", 70.3)["x-ratelimit-remaining-requests"] == "2999"  # the first 50 expired


def test_an_unknown_limit_model_is_refused():
    with pytest.raises(ValueError, match="limit model"):
        RateLimiter(rpm=60, tpm=None, burst_seconds=1.0, model="leaky")


def test_the_server_answers_a_per_second_refusal_without_retry_after():
    import openai

    import localapi
    from tests.unit.test_localapi import ask, sdk

    with localapi.running(rpm=60, limit_model="per-second") as server:  # 1 per second
        client = sdk(server)
        ask(client, content="hi")
        with pytest.raises(openai.RateLimitError) as refused:
            ask(client, content="hi")
    headers = refused.value.response.headers
    assert "retry-after" not in headers and "retry-after-ms" not in headers
    assert "try again" not in refused.value.message
    assert headers["x-ratelimit-remaining-requests"] == "59"


def test_the_limit_model_is_a_flag_and_a_live_setting():
    from localapi.__main__ import build_parser
    from localapi.config import ServerConfig

    args = build_parser().parse_args(["--rpm", "3000", "--limit-model", "token-bucket"])
    assert ServerConfig(**vars(args)).limit_model == "token-bucket"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--limit-model", "leaky"])
    with pytest.raises(ValueError, match="limit_model"):
        ServerConfig(limit_model="leaky")
