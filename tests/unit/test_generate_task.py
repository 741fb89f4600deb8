"""The `generate` task wrapper (worker/tasks.py): what it does with errors run_request raises.

- Redis (rate budget) unreachable: nothing is stored and the task asks to be retried later
  (docs/reliability.md §4); a failed row here would fail a request that never reached the API.
- Anything unexpected: a `failed` row with `error_kind = "internal"`, and the task returns
  normally, so the chord body still runs (docs/reliability.md §1, §5).

The task runs in this process (`apply`/`run`, no broker); its retry is recorded, not sent.
"""

from __future__ import annotations

import pytest
from celery.exceptions import Retry

import localapi
from gridtune.settings import reset_settings
from models import RowState, get_engine, store
from tests.acceptance.helpers import free_port
from tests.unit.test_generation import CONFIG
from gridtune.sweep import parse_config
from worker import llm
from worker.context import reset_context
from worker.tasks import generate


@pytest.fixture
def task_env(monkeypatch, tmp_path):
    """Settings for the task's own WorkerContext; yields (engine, sweep, local server)."""
    with localapi.running() as server:
        url = f"sqlite:///{tmp_path}/task.db"
        monkeypatch.setenv("DATABASE_URL", url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-task")
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        reset_settings()
        reset_context()
        engine = get_engine(url)
        sweep, _ = store.create_or_resume_sweep(engine, "task", parse_config(CONFIG))
        yield engine, sweep, server
        reset_context()
        reset_settings()


@pytest.fixture
def retries(monkeypatch):
    """Record the task's retry requests instead of publishing them."""
    task = getattr(generate, "_get_current_object", lambda: generate)()
    asked = []

    def retry(countdown=None, kwargs=None, **_):
        asked.append(countdown)
        return Retry("retry recorded by the test", when=countdown)

    monkeypatch.setattr(task, "retry", retry)
    return task, asked


def test_redis_unreachable_means_retry_later_never_a_failed_row(task_env, retries, monkeypatch):
    engine, sweep, server = task_env
    task, asked = retries
    monkeypatch.setenv("GRIDTUNE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    reset_settings()
    reset_context()
    with pytest.raises(Retry):
        task.run(sweep.id, 0)
    assert len(asked) == 1 and asked[0] > 0
    assert list(store.iter_rows(engine, sweep.id)) == []  # nothing stored: the retry will do it
    assert server.stats()["requests"] == 0


def test_an_unexpected_error_becomes_a_failed_internal_row_and_the_task_succeeds(task_env, retries, monkeypatch):
    engine, sweep, server = task_env
    task, asked = retries

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in gridtune")

    monkeypatch.setattr("worker.tasks.run_request", broken)
    result = task.apply(args=(sweep.id, 4))
    assert result.successful(), result.traceback  # a header task that raised would stop the chord body
    assert asked == []
    [row] = list(store.iter_rows(engine, sweep.id))
    assert row.request_index == 4 and row.state == RowState.FAILED and row.error_kind == "internal"
    assert row.error == "RuntimeError: a bug in gridtune"
    assert row.params == {"age": 90, "power": "flight"}  # the request's own grid cell


def test_redis_lost_after_the_api_answered_the_answer_is_stored(tmp_path, monkeypatch):
    """Redis goes away between the reservation and the answer (the broker-loss test met this
    once in ten runs): the bookkeeping after the call is skipped and the paid answer is stored
    ok, not failed as "unexpected" and not asked for again."""
    import fakeredis

    from tests.unit.test_generation import make_context, new_sweep, rows
    from worker.generation import run_request

    with localapi.running(rpm=10_000) as server:  # it sends x-ratelimit-* headers to learn from
        ctx = make_context(tmp_path, server)
        shared = fakeredis.FakeServer()
        ctx.__dict__["redis"] = fakeredis.FakeRedis(server=shared)
        # Redis is lost while the request is at the API, after the reservation and the slot.
        post = llm.post_chat_completion

        def lose_redis_then_post(*args):
            shared.connected = False  # every later command raises redis.ConnectionError
            return post(*args)

        monkeypatch.setattr(llm, "post_chat_completion", lose_redis_then_post)
        sweep = new_sweep(ctx)
        outcome = run_request(ctx, sweep.id, 2)
        assert outcome.stored and outcome.retry_in is None
        row = rows(ctx, sweep)[2]
        assert row.state == RowState.OK and row.attempts == 1, (row.state, row.error_kind, row.error)
        assert server.stats()["accepted"] == 1
