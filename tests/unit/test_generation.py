"""One request, start to finish, without Celery: the real SDK against the local server.

Covers the retry owner's rules: 429 recovery, transient faults, permanent errors that fail the
row, auth/quota failures that stop the sweep, and waits that give the worker slot back.
"""

from __future__ import annotations

import pytest

import localapi
from gridtune.settings import Settings
from gridtune.sweep import parse_config
from models import RowState, SweepState, store
from worker import llm
from worker.context import WorkerContext
from worker.generation import run_request

CONFIG = """
repeats = 1
[dimensions]
age = [18, 40, 90]
power = ["flight", "healing"]
[templates]
prompt = "Imagine a complete and detailed description of a {age}-year-old fictional character who has the superpower of {power}."
input = "{age}, {power}"
[model]
max_output_tokens = 200
[finetune]
backend = "none"
"""


def make_context(tmp_path, server, key="sk-test-generation", **settings) -> WorkerContext:
    values = dict(DATABASE_URL=f"sqlite:///{tmp_path}/gen.db", OPENAI_API_KEY=key, OPENAI_BASE_URL=server.base_url,
                  GRIDTUNE_BACKOFF_CAP=0.2, GRIDTUNE_REQUEST_TIMEOUT=2)
    values.update(settings)
    return WorkerContext(Settings(**values))


def new_sweep(ctx, name="gen", text=CONFIG):
    sweep, _ = store.create_or_resume_sweep(ctx.engine, name, parse_config(text))
    return sweep


def rows(ctx, sweep):
    return {row.request_index: row for row in store.iter_rows(ctx.engine, sweep.id)}


def test_a_request_stores_one_ok_row_and_is_never_sent_twice(tmp_path):
    with localapi.running() as server:
        ctx = make_context(tmp_path, server)
        sweep = new_sweep(ctx)
        outcome = run_request(ctx, sweep.id, 3)
        assert outcome.retry_in is None and outcome.stored
        row = rows(ctx, sweep)[3]
        assert row.state == RowState.OK and row.params == {"age": 40, "power": "healing"}
        assert "40-year-old" in row.response_text and "healing" in row.response_text
        assert row.input_text == "40, healing" and row.finish_reason == "stop"
        assert row.prompt_tokens > 10 and row.completion_tokens > 10 and row.attempts == 1
        assert row.latency_ms is not None and row.model
        sent = server.stats()["requests"]
        again = run_request(ctx, sweep.id, 3)  # a redelivered task
        assert not again.stored and server.stats()["requests"] == sent
        assert len(rows(ctx, sweep)) == 1


def test_rate_limited_requests_recover_and_count_their_429s(tmp_path):
    with localapi.running(fault_rate=0.5, faults=("429",), seed=3) as server:
        ctx = make_context(tmp_path, server)
        sweep = new_sweep(ctx)
        for index in range(6):
            assert run_request(ctx, sweep.id, index).retry_in is None
        stored = rows(ctx, sweep)
        assert all(row.state == RowState.OK for row in stored.values())
        assert sum(row.rate_limited for row in stored.values()) == server.stats()["faults"]["429"] > 0


@pytest.mark.parametrize("fault", ["500", "drop", "malformed", "timeout"])
def test_transient_faults_are_retried_until_ok(tmp_path, fault):
    with localapi.running(fault_rate=0.4, faults=(fault,), hang_seconds=5, seed=1) as server:
        ctx = make_context(tmp_path, server, GRIDTUNE_REQUEST_TIMEOUT=0.5)
        sweep = new_sweep(ctx)
        for index in range(6):
            assert run_request(ctx, sweep.id, index).retry_in is None
        stored = rows(ctx, sweep)
        assert [row.state for row in stored.values()] == [RowState.OK] * 6
        stats = server.stats()
        # Every attempt reached the server, and some met the fault. (Not "6 + injected": on a busy
        # machine a healthy reply can miss the 0.5 s timeout too, and is retried like the others.)
        assert stats["faults"].get(fault, 0) > 0
        assert sum(row.attempts for row in stored.values()) == stats["requests"] >= 6 + stats["faults"][fault]


def test_a_request_that_keeps_failing_ends_as_a_failed_row_with_the_reason(tmp_path):
    with localapi.running(fault_rate=1.0, faults=("500",)) as server:
        ctx = make_context(tmp_path, server, GRIDTUNE_MAX_ATTEMPTS=3)
        sweep = new_sweep(ctx)
        outcome = run_request(ctx, sweep.id, 0)
        assert outcome.retry_in is None and outcome.stored
        row = rows(ctx, sweep)[0]
        assert row.state == RowState.FAILED and row.error_kind == "server_error"
        assert "HTTP 500" in row.error and "gave up after 3 attempts" in row.error
        assert server.stats()["requests"] == 3 and row.attempts == 3


def test_a_permanent_error_fails_the_row_at_once_without_stopping_the_sweep(tmp_path):
    with localapi.running() as server:
        ctx = make_context(tmp_path, server)
        sweep = new_sweep(ctx, text=CONFIG.replace('max_output_tokens = 200', 'name = "ft:gpt-4o-mini:nobody::x"\nmax_output_tokens = 200'))
        run_request(ctx, sweep.id, 0)
        row = rows(ctx, sweep)[0]
        assert row.state == RowState.FAILED and row.error_kind == "not_found" and "HTTP 404" in row.error
        assert server.stats()["requests"] == 1
        assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.RUNNING


@pytest.mark.parametrize("refusal, kind", [("api_keys", "auth"), ("quota_exhausted_keys", "quota")])
def test_auth_and_quota_failures_stop_the_sweep_before_more_requests_are_sent(tmp_path, refusal, kind):
    key = "sk-test-refused-0123456789"
    server_keys = {"api_keys": ("sk-some-other-key",)} if refusal == "api_keys" else {refusal: (key,)}
    with localapi.running(**server_keys) as server:
        ctx = make_context(tmp_path, server, key=key)
        sweep = new_sweep(ctx)
        run_request(ctx, sweep.id, 0)
        first = rows(ctx, sweep)[0]
        assert first.state == RowState.FAILED and first.error_kind == kind
        assert key not in first.error
        stopped = store.get_sweep_by_id(ctx.engine, sweep.id)
        assert stopped.state == SweepState.STOPPED and stopped.stop_reason
        for index in range(1, 6):
            run_request(ctx, sweep.id, index)
        after = rows(ctx, sweep)
        assert {after[i].error_kind for i in range(1, 6)} == {"stopped"}
        assert server.stats()["requests"] == 1  # nothing else was sent


def test_a_long_wait_gives_the_worker_slot_back_and_stays_below_the_visibility_timeout(tmp_path):
    with localapi.running() as server:
        ctx = make_context(tmp_path, server, GRIDTUNE_MAX_INLINE_WAIT=1, GRIDTUNE_VISIBILITY_TIMEOUT=40)
        sweep = new_sweep(ctx)
        key = llm.budget_key("gpt-4o-mini", ctx.settings)
        ctx.limiter.cool_down(key, 500)  # e.g. a 429 asked the whole cluster to pause
        outcome = run_request(ctx, sweep.id, 0)
        assert outcome.retry_in == ctx.settings.max_countdown == 10
        assert not outcome.stored and server.stats()["requests"] == 0


def test_classify_sorts_real_sdk_errors():
    import httpx2
    import openai

    def status_error(cls, status, code=None, headers=None):
        request = httpx2.Request("POST", "http://x/v1/chat/completions")
        response = httpx2.Response(status, request=request, headers=headers or {})
        body = {"message": "m", "code": code}
        return cls("m", response=response, body=body)

    limited = llm.classify(status_error(openai.RateLimitError, 429, "rate_limit_exceeded", {"retry-after-ms": "1500"}))
    assert limited.retryable and limited.retry_after == 1.5 and not limited.stops_sweep
    quota = llm.classify(status_error(openai.RateLimitError, 429, "insufficient_quota"))
    assert not quota.retryable and quota.stops_sweep
    for cls, status in [(openai.BadRequestError, 400), (openai.NotFoundError, 404)]:
        failure = llm.classify(status_error(cls, status))
        assert not failure.retryable and not failure.stops_sweep
    for cls, status in [(openai.AuthenticationError, 401), (openai.PermissionDeniedError, 403)]:
        failure = llm.classify(status_error(cls, status))
        assert not failure.retryable and failure.stops_sweep
    assert llm.classify(status_error(openai.InternalServerError, 503)).retryable
    assert llm.classify(status_error(openai.ConflictError, 409)).retryable
    assert llm.classify(openai.APITimeoutError(httpx2.Request("POST", "http://x"))).kind == "timeout"
    assert llm.retry_after_seconds({}, "Please try again in 6.596s.") == 6.596
    assert llm.retry_after_seconds({"retry-after": "2"}) == 2.0


def test_configured_stop_sequences_end_the_answer(tmp_path):
    """[model] stop reaches the server: the answer ends before the sequence and counts as whole."""
    with localapi.running() as server:
        ctx = make_context(tmp_path, server)
        plain = new_sweep(ctx, "plain")
        run_request(ctx, plain.id, 0)
        text = rows(ctx, plain)[0].response_text
        cut = text.split()[3]  # a word from the middle of the simulated description
        stopped = new_sweep(ctx, "stopped", CONFIG.replace("max_output_tokens = 200",
                                                           f"max_output_tokens = 200\nstop = [{cut!r}]"))
        run_request(ctx, stopped.id, 0)
        row = rows(ctx, stopped)[0]
        assert row.response_text == text[: text.index(cut)] and row.finish_reason == "stop"


def test_a_rows_latency_is_its_call_not_the_wait_for_an_in_flight_slot(tmp_path):
    """With one slot at the endpoint (GRIDTUNE_MAX_IN_FLIGHT=1) and two requests at once, the
    second waits a whole call for the slot: its row's latency is still one call's."""
    import threading

    with localapi.running(latency_ms=400) as server:
        ctx = make_context(tmp_path, server, GRIDTUNE_MAX_IN_FLIGHT=1)
        sweep = new_sweep(ctx)
        run_request(ctx, sweep.id, 0)  # scripts loaded, statements built
        threads = [threading.Thread(target=run_request, args=(ctx, sweep.id, i)) for i in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        latencies = sorted(rows(ctx, sweep)[i].latency_ms for i in (1, 2))
        assert all(400 <= latency < 750 for latency in latencies), latencies  # two calls would be >= 800
