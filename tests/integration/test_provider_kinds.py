"""What real providers and gateways send, each kind of answer with its right outcome (issue 13, #1-4, #7).

The real SDK against a real local HTTP server that answers from a script (tests/scripted.py);
rows in PostgreSQL where storage matters (NUL and lone surrogates), else SQLite.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from sqlalchemy import select

from gridtune.settings import Settings
from gridtune.sweep import parse_config
from models import RowState, SweepState, store
from models.db import session_scope
from models.schema import Dataset
from tests.scripted import Reply, ScriptedServer, completion
from worker.context import WorkerContext
from worker.dataset import finalize_sweep
from worker.generation import run_request
from worker.ratelimit import wait_hint_seconds

CONFIG = """
repeats = 1
[dimensions]
n = {values}
[templates]
prompt = "Describe hero number {{n}}."
input = "hero {{n}}"
[model]
max_output_tokens = 100
[dataset]
min_examples = 1
validation_fraction = 0
[finetune]
backend = "none"
"""


def make_context(tmp_path, base_url: str, database_url: str | None = None, **settings) -> WorkerContext:
    values = dict(DATABASE_URL=database_url or f"sqlite:///{tmp_path}/kinds.db", OPENAI_API_KEY="sk-test-kinds",
                  OPENAI_BASE_URL=base_url, GRIDTUNE_BACKOFF_CAP=0.05, GRIDTUNE_REQUEST_TIMEOUT=5,
                  GRIDTUNE_DATA_DIR=str(tmp_path / "data"), GRIDTUNE_DEAD_ENDPOINT_SECONDS=0)
    values.update({k: str(v) for k, v in settings.items()})
    return WorkerContext(Settings(**values))


def new_sweep(ctx, count: int, name: str = "kinds"):
    config = parse_config(CONFIG.format(values=json.dumps(list(range(count)))))
    sweep, _ = store.create_or_resume_sweep(ctx.engine, name, config)
    store.mark_enqueued(ctx.engine, sweep.id)
    return sweep


def rows(ctx, sweep):
    return {row.request_index: row for row in store.iter_rows(ctx.engine, sweep.id)}


def dataset_of(ctx, sweep) -> Dataset:
    with session_scope(ctx.engine) as session:
        return session.scalars(select(Dataset).where(Dataset.sweep_id == sweep.id)).one()


# --- 1. incomplete answers never become training data --------------------------------------------
@pytest.mark.parametrize(("finish_reason", "dropped_as"), [
    ("content_filter", "content_filter"),
    ("length", "truncated"),
    ("gateway_stopped_early", "finish_reason=gateway_stopped_early"),  # a value a gateway invents
    ("tool_calls", "finish_reason=tool_calls"),
])
def test_incomplete_answers_are_stored_but_never_trained_on(tmp_path, finish_reason, dropped_as):
    replies = [Reply(200, completion(f"Whole answer number {i}.")) for i in range(4)]
    replies += [Reply(200, completion("Partial text that was cut", finish_reason)) for _ in range(2)]
    with ScriptedServer(replies + [Reply(200, completion("Whole answer, the last."))]) as server:
        ctx = make_context(tmp_path, server.base_url)
        sweep = new_sweep(ctx, 7)
        for index in range(7):
            run_request(ctx, sweep.id, index)
    stored = rows(ctx, sweep)
    assert [stored[i].finish_reason for i in (4, 5)] == [finish_reason] * 2
    assert stored[4].state == RowState.OK and stored[4].prompt_tokens == 20  # paid for, kept as a row
    assert finalize_sweep(ctx, sweep.id).state == SweepState.DATASET_READY
    dataset = dataset_of(ctx, sweep)
    assert dataset.dropped[dropped_as] == 2 and dataset.train_examples == 5
    assert "Partial text" not in open(dataset.train_path, encoding="utf-8").read()


def test_a_refusal_is_kept_on_the_row_and_out_of_the_dataset(tmp_path):
    replies = [Reply(200, completion(f"Whole answer number {i}.")) for i in range(2)]
    replies += [Reply(200, completion(None, refusal="I can't help with that request.")),
                Reply(200, completion("Here is part of it", refusal="I can only partly help."))]
    with ScriptedServer(replies) as server:
        ctx = make_context(tmp_path, server.base_url)
        sweep = new_sweep(ctx, 4)
        for index in range(4):
            run_request(ctx, sweep.id, index)
    stored = rows(ctx, sweep)
    assert stored[2].state == RowState.FAILED and stored[2].error_kind == "refused"
    assert stored[2].refusal == "I can't help with that request." and "can't help" in stored[2].error
    assert stored[3].state == RowState.OK and stored[3].refusal == "I can only partly help."
    finalize_sweep(ctx, sweep.id)
    dataset = dataset_of(ctx, sweep)
    assert dataset.dropped["refused"] == 1 and dataset.dropped["failed"] == 1 and dataset.train_examples == 2


# --- 2. a 2xx that is not a completion ------------------------------------------------------------
OVERLOADED = {"error": {"message": "upstream model overloaded, retry later", "code": 503}}


def test_a_200_carrying_a_server_error_is_retried_like_a_503(tmp_path):
    with ScriptedServer([Reply(200, OVERLOADED), Reply(200, completion("Fine now."))]) as server:
        ctx = make_context(tmp_path, server.base_url)
        sweep = new_sweep(ctx, 1)
        run_request(ctx, sweep.id, 0)
    row = rows(ctx, sweep)[0]
    assert row.state == RowState.OK and row.attempts == 2 and row.response_text == "Fine now."


def test_a_200_carrying_an_error_keeps_the_providers_message_when_it_fails(tmp_path):
    with ScriptedServer([Reply(200, OVERLOADED)]) as server:
        ctx = make_context(tmp_path, server.base_url, GRIDTUNE_MAX_ATTEMPTS=2)
        sweep = new_sweep(ctx, 1)
        run_request(ctx, sweep.id, 0)
    row = rows(ctx, sweep)[0]
    assert row.state == RowState.FAILED and row.error_kind == "server_error" and row.attempts == 2
    assert "upstream model overloaded, retry later" in row.error and "503" in row.error


@pytest.mark.parametrize(("body", "kind", "stops"), [
    ({"error": {"message": "Incorrect API key provided", "code": "401"}}, "auth", True),
    ({"error": {"message": "quota exceeded", "code": "insufficient_quota", "type": "insufficient_quota"}}, "quota", True),
    ({"error": {"message": "no such model", "code": "model_not_found"}}, "not_found", False),
    ({"error": "gateway says no", "status": 400}, "bad_request", False),
])
def test_a_200_error_is_classified_like_the_status_it_names(tmp_path, body, kind, stops):
    with ScriptedServer([Reply(200, body)]) as server:
        ctx = make_context(tmp_path, server.base_url, GRIDTUNE_DEAD_ENDPOINT_FAILURES=100)
        sweep = new_sweep(ctx, 1)
        run_request(ctx, sweep.id, 0)
        assert len(server.requests) == 1  # not retried: the status it names is permanent
    row = rows(ctx, sweep)[0]
    assert row.state == RowState.FAILED and row.error_kind == kind
    assert (store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.STOPPED) == stops


@pytest.mark.parametrize("body", [
    {"object": "list", "data": []},                               # wrong object
    {"id": "x", "object": "chat.completion", "model": "m"},       # no choices
    {"id": "x", "object": "chat.completion", "choices": []},      # empty choices
])
def test_a_200_that_is_not_a_completion_is_retried_as_malformed(tmp_path, body):
    with ScriptedServer([Reply(200, body), Reply(200, completion("Fine now."))]) as server:
        ctx = make_context(tmp_path, server.base_url)
        sweep = new_sweep(ctx, 1)
        run_request(ctx, sweep.id, 0)
    row = rows(ctx, sweep)[0]
    assert row.state == RowState.OK and row.attempts == 2


# --- 3. one wait parser --------------------------------------------------------------------------
@pytest.mark.parametrize(("headers", "message", "seconds"), [
    ({}, "Please try again in 1m30s.", 90.0),
    ({}, "Rate limit reached ... Please try again in 6.596s. Visit ...", 6.596),
    ({}, "try again in 250ms", 0.25),
    ({}, "Please try again in 2h.", 7200.0),
    ({}, "Please try again in 1h2m3.5s", 3723.5),
    ({}, "please try again in 20 seconds", 20.0),
    ({}, "Please try again in 3 minutes", 180.0),
    ({"retry-after-ms": "1500"}, "try again in 1m", 1.5),      # the header wins
    ({"retry-after": "7"}, "", 7.0),
    ({"retry-after": "-3"}, "", 0.0),
    ({"retry-after": "soon"}, "", None),
    ({"retry-after-ms": "nan"}, "try again in 2s", 2.0),
    ({}, "try again later", None),
])
def test_every_wait_format_is_read_by_one_parser(headers, message, seconds):
    assert wait_hint_seconds(headers, message) == (pytest.approx(seconds) if seconds is not None else None)


def test_an_http_date_retry_after_is_read():
    when = datetime.now(timezone.utc) + timedelta(seconds=120)
    assert 100 < wait_hint_seconds({"retry-after": format_datetime(when, usegmt=True)}) <= 120
    past = datetime.now(timezone.utc) - timedelta(seconds=120)
    assert wait_hint_seconds({"retry-after": format_datetime(past, usegmt=True)}) == 0.0


@pytest.mark.parametrize("status,body", [
    (429, {"error": {"message": "Rate limit reached for requests. Please try again in 1m30s.",
                     "type": "requests", "code": "rate_limit_exceeded"}}),
    (200, {"error": {"message": "Rate limit reached. Please try again in 1m30s.", "code": 429}}),
    (503, {"error": {"message": "Overloaded. Please try again in 1m30s.", "type": "server_error"}}),
])
def test_a_wait_in_minutes_in_the_message_is_honoured(tmp_path, status, body):
    with ScriptedServer([Reply(status, body)]) as server:
        ctx = make_context(tmp_path, server.base_url)
        sweep = new_sweep(ctx, 1)
        outcome = run_request(ctx, sweep.id, 0)
    # 90 s is above GRIDTUNE_MAX_INLINE_WAIT, so the task gives its slot back for exactly that long.
    assert outcome.retry_in == pytest.approx(90.0) and not rows(ctx, sweep)


# --- 4. text that cannot be stored as sent -------------------------------------------------------
def _raw_completion(content_json: str, finish_reason: str = "stop", model_json: str = '"scripted-model"') -> bytes:
    """A completion body with raw JSON text for content and model (escapes such as \\ud800 as sent)."""
    body = json.dumps(completion("PLACEHOLDER", finish_reason)).replace('"scripted-model"', model_json)
    return body.replace('"PLACEHOLDER"', content_json).encode()


def test_unstorable_text_never_loses_a_paid_response(tmp_path, postgres_db):
    replies = [
        Reply(200, _raw_completion('"caf\\u00e9 \\ud800 lone surrogate"')),
        Reply(200, _raw_completion('"a NUL \\u0000 inside"')),
        Reply(200, _raw_completion('"fine"', finish_reason="x" * 80, model_json='"m\\udfff' + "o" * 300 + '"')),
        Reply(200, _raw_completion('"emoji \\ud83e\\uddb8 pair"')),
    ]
    with ScriptedServer(replies) as server:
        ctx = make_context(tmp_path, server.base_url, database_url=postgres_db)
        sweep = new_sweep(ctx, 4)
        for index in range(4):
            run_request(ctx, sweep.id, index)
    stored = rows(ctx, sweep)
    assert all(row.state == RowState.OK and row.prompt_tokens == 20 for row in stored.values()), \
        [(r.error_kind, r.error) for r in stored.values()]
    assert stored[0].response_text == "caf\u00e9 \ufffd lone surrogate"
    assert stored[1].response_text == "a NUL \ufffd inside"
    assert stored[2].finish_reason == "x" * 32 and stored[2].model.startswith("m\ufffdooo")
    assert stored[3].response_text == "emoji \U0001f9b8 pair"  # a valid pair is kept as it is
    assert finalize_sweep(ctx, sweep.id).state == SweepState.DATASET_READY


# --- 7. a dead endpoint stops the sweep early; resuming works once fixed ---------------------------
def test_connection_refused_stops_the_sweep_early_and_resume_works(tmp_path):
    ctx = make_context(tmp_path, "http://127.0.0.1:9/v1", GRIDTUNE_DEAD_ENDPOINT_FAILURES=5)
    sweep = new_sweep(ctx, 30)
    for index in range(30):
        run_request(ctx, sweep.id, index)
    stopped = store.get_sweep_by_id(ctx.engine, sweep.id)
    assert stopped.state == SweepState.STOPPED
    assert "5 requests in a row failed the same way" in stopped.stop_reason
    assert "connection failed" in stopped.stop_reason and "127.0.0.1:9" in stopped.stop_reason
    stored = rows(ctx, sweep)
    assert len(stored) == 30 and sum(row.attempts for row in stored.values()) == 5  # not 30 x 8
    assert stored[0].error_kind == "connection"
    assert {row.error_kind for i, row in stored.items() if i > 0} == {"stopped"}

    # Fixed: the same sweep, resumed as `sweep` does (failed rows forgotten, enqueued again).
    with ScriptedServer([Reply(200, completion("Back online."))]) as server:
        fixed = make_context(tmp_path, server.base_url, GRIDTUNE_DEAD_ENDPOINT_FAILURES=5)
        store.forget_failed_rows(fixed.engine, sweep.id)
        store.mark_enqueued(fixed.engine, sweep.id)
        for index in range(30):
            run_request(fixed, sweep.id, index)
    assert {row.state for row in rows(fixed, sweep).values()} == {RowState.OK}
    assert store.get_sweep_by_id(fixed.engine, sweep.id).state == SweepState.RUNNING


@pytest.mark.parametrize("kind", ["dns", "tls"])
def test_dns_and_tls_failures_stop_the_sweep_early(tmp_path, kind):
    with ScriptedServer([Reply(200, completion("never seen"))]) as server:
        # .invalid never resolves (RFC 2606); https to a plain-HTTP server fails the TLS handshake.
        base_url = "http://gridtune-no-such-host.invalid/v1" if kind == "dns" else server.base_url.replace("http:", "https:")
        ctx = make_context(tmp_path, base_url, GRIDTUNE_DEAD_ENDPOINT_FAILURES=3)
        sweep = new_sweep(ctx, 10)
        for index in range(10):
            run_request(ctx, sweep.id, index)
    stopped = store.get_sweep_by_id(ctx.engine, sweep.id)
    assert stopped.state == SweepState.STOPPED and "connection failed" in stopped.stop_reason
    assert sum(row.attempts for row in rows(ctx, sweep).values()) == 3


def test_a_404_route_stops_the_sweep_after_the_streak(tmp_path):
    body = {"error": {"message": "Unknown request URL: POST /v1/chat/completions", "code": "unknown_url"}}
    with ScriptedServer([Reply(404, body)]) as server:
        ctx = make_context(tmp_path, server.base_url, GRIDTUNE_DEAD_ENDPOINT_FAILURES=4)
        sweep = new_sweep(ctx, 20)
        for index in range(20):
            run_request(ctx, sweep.id, index)
        assert len(server.requests) == 4
    assert "Unknown request URL" in store.get_sweep_by_id(ctx.engine, sweep.id).stop_reason


def test_a_short_burst_of_identical_failures_does_not_stop_the_sweep(tmp_path):
    # Every request in flight fails at once while a server restarts: a count alone would stop the
    # sweep; the streak must also last GRIDTUNE_DEAD_ENDPOINT_SECONDS.
    ctx = make_context(tmp_path, "http://127.0.0.1:9/v1", GRIDTUNE_DEAD_ENDPOINT_FAILURES=2,
                       GRIDTUNE_DEAD_ENDPOINT_SECONDS=3600, GRIDTUNE_MAX_ATTEMPTS=2)
    sweep = new_sweep(ctx, 5)
    for index in range(5):
        run_request(ctx, sweep.id, index)
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.RUNNING
    assert [row.attempts for row in rows(ctx, sweep).values()] == [2] * 5


def test_a_success_breaks_the_streak(tmp_path):
    broken = Reply(500, {"error": {"message": "boom", "type": "server_error"}})
    script = [broken, broken, Reply(200, completion("ok")), broken, broken, Reply(200, completion("ok 2"))]
    with ScriptedServer(script) as server:
        ctx = make_context(tmp_path, server.base_url, GRIDTUNE_DEAD_ENDPOINT_FAILURES=3)
        sweep = new_sweep(ctx, 2)
        for index in range(2):
            run_request(ctx, sweep.id, index)
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.RUNNING
    assert {row.state for row in rows(ctx, sweep).values()} == {RowState.OK}


def test_odd_types_in_a_completion_still_make_a_row_with_its_usage(tmp_path):
    odd = completion(None)
    odd["choices"][0]["message"]["content"] = [{"type": "text", "text": "Part one, "}, {"type": "text", "text": "two."}]
    odd["choices"][0]["finish_reason"] = 7
    odd["model"] = 12
    odd["usage"] = {"prompt_tokens": "20", "completion_tokens": 7.0}  # no total_tokens
    weird_usage = completion("Fine.")
    weird_usage["usage"] = "lots"
    with ScriptedServer([Reply(200, odd), Reply(200, weird_usage)]) as server:
        ctx = make_context(tmp_path, server.base_url)
        sweep = new_sweep(ctx, 2)
        for index in range(2):
            run_request(ctx, sweep.id, index)
    first, second = rows(ctx, sweep)[0], rows(ctx, sweep)[1]
    assert first.state == RowState.OK and first.response_text == "Part one, two."
    assert (first.finish_reason, first.model, first.prompt_tokens, first.completion_tokens) == ("7", "12", 20, 7)
    assert second.state == RowState.OK and second.prompt_tokens is None


# --- 14. the finalizer names the likely cause when most answers were cut -------------------------
def test_mostly_truncated_rows_are_named_with_the_likely_cause(tmp_path):
    replies = [Reply(200, completion(f"Cut answer {i}", "length")) for i in range(5)]
    with ScriptedServer(replies + [Reply(200, completion("Whole."))]) as server:
        ctx = make_context(tmp_path, server.base_url)
        sweep = new_sweep(ctx, 6)
        for index in range(6):
            run_request(ctx, sweep.id, index)
    config_min = store.sweep_config(store.get_sweep_by_id(ctx.engine, sweep.id)).dataset.min_examples
    assert config_min == 1
    finalize_sweep(ctx, sweep.id)
    from worker.dataset import likely_causes

    dataset = dataset_of(ctx, sweep)
    causes = likely_causes(dataset.dropped, dataset.inputs, dataset.identical_inputs, dataset.train_examples)
    assert causes[0] == "5 answers were cut at [model] max_output_tokens: raise it"
