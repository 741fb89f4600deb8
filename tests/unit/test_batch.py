"""Batch mode, step by step without Celery: the real SDK against the local server's /v1/batches.

Completed, partial failure, expiry (the rest is re-sent), cancel, a worker killed between upload
and create (or between create and storing the id), resume with a batch in flight, the spend cap,
and an end-to-end embedded sweep (Celery, finalizer once).
"""

from __future__ import annotations

import json
import time

import pytest

import localapi
from gridtune import pricing
from gridtune.settings import Settings
from gridtune.sweep import parse_config, request_at
from models import RowState, SweepState, store
from producer.cli import main
from worker import batch as batch_mode
from worker.context import WorkerContext
from worker.generation import build_messages, request_params

CONFIG = """
[dimensions]
n = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
[templates]
system = "You write short character sketches."
prompt = "Describe hero number {n} in two sentences."
input = "hero {n}"
[model]
name = "gpt-4o-mini"
max_output_tokens = 300
[dataset]
min_examples = 4            # 12 requests: the validation split may leave fewer than 10 to train on
[finetune]
backend = "none"
"""


def make_context(tmp_path, server, **settings) -> WorkerContext:
    values = dict(DATABASE_URL=f"sqlite:///{tmp_path}/batch.db", OPENAI_API_KEY="sk-test-batch",
                  OPENAI_BASE_URL=server.base_url, GRIDTUNE_BATCH_POLL_SECONDS=0.05, GRIDTUNE_BATCH_MAX_REQUESTS=5)
    values.update(settings)
    return WorkerContext(Settings(**values))


def new_sweep(ctx, cap=None):
    config = parse_config(CONFIG)
    sweep, _ = store.create_or_resume_sweep(ctx.engine, "b", config)
    if cap is not None:
        store.set_max_cost(ctx.engine, sweep.id, cap)
    store.set_mode(ctx.engine, sweep.id, "batch")
    plan = batch_mode.plan_batches(config, sweep.id, range(12), ctx.settings.batch_max_requests,
                                   ctx.settings.batch_max_bytes)
    store.add_batches(ctx.engine, sweep.id, plan)
    return store.get_sweep_by_id(ctx.engine, sweep.id)


def drive(ctx, sweep, timeout=20.0, on_step=lambda step: None) -> list:
    """What the tasks do: submit pending batches, poll created ones, until every batch is ingested."""
    deadline = time.monotonic() + timeout
    steps = []
    while batches := store.open_batches(ctx.engine, sweep.id):
        assert time.monotonic() < deadline, "batches did not end"
        for batch in batches:
            step = (batch_mode.submit if batch.provider_batch_id is None else batch_mode.poll)(ctx, batch.id)
            steps.append(step)
            on_step(step)
        time.sleep(0.05)
    return steps


def rows(ctx, sweep):
    return {row.request_index: row for row in store.iter_rows(ctx.engine, sweep.id)}


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_a_batch_sweep_stores_one_row_per_request_with_the_online_columns(tmp_path, database, request):
    url = request.getfixturevalue("postgres_db") if database == "postgres" else f"sqlite:///{tmp_path}/batch.db"
    with localapi.running(batch_seconds=0.1) as server:
        ctx = make_context(tmp_path, server, DATABASE_URL=url)
        sweep = new_sweep(ctx)
        steps = drive(ctx, sweep)
        assert server.stats()["requests"] == 0  # nothing went through /v1/chat/completions
    stored = rows(ctx, sweep)
    assert sorted(stored) == list(range(12)) and all(r.state == RowState.OK for r in stored.values())
    config = parse_config(CONFIG)
    for index, row in stored.items():
        assert row.params == {"n": index} and f"hero number {index}" in row.response_text
        assert row.finish_reason in ("stop", "length") and row.model == "gpt-4o-mini" and row.prompt_tokens > 10
        assert row.cost_usd == pytest.approx(pricing.inference_cost("gpt-4o-mini", row.prompt_tokens,
                                                                    row.completion_tokens, "batch"))
    assert [s.finalize for s in steps].count(True) == 1 and steps[-1].finalize
    assert store.batch_states(ctx.engine, sweep.id) == {"ingested": 3}  # 12 requests, 5 per batch
    # Ingesting again (a redelivered poll) adds nothing.
    first = store.get_batch(ctx.engine, 1)
    assert batch_mode.ingest(ctx, first, b"", b"") == batch_mode.Step()
    duplicate = batch_mode._base_row(config, sweep.id, 0, state=RowState.FAILED, error="a second row")
    assert store.insert_generations(ctx.engine, [duplicate]) == 0
    assert len(rows(ctx, sweep)) == 12


def test_input_lines_carry_exactly_the_online_request_body():
    config = parse_config(CONFIG)
    line = json.loads(batch_mode.input_line(config, 7, 3))
    assert line == {"custom_id": "gridtune-7-3", "method": "POST", "url": "/v1/chat/completions",
                    "body": request_params(config, build_messages(config, request_at(config, 3).prompt))}
    assert batch_mode.index_of(7, "gridtune-7-3") == 3 and batch_mode.index_of(8, "gridtune-7-3") is None


def test_batches_respect_the_request_and_byte_limits():
    config = parse_config(CONFIG)
    size = len(batch_mode.input_line(config, 1, 0))
    plan = batch_mode.plan_batches(config, 1, [0, 1, 2, 3, 5, 6, 9], max_requests=3, max_bytes=10_000)
    assert plan == [[[0, 3]], [[3, 4], [5, 7]], [[9, 10]]]
    by_bytes = batch_mode.plan_batches(config, 1, range(6), max_requests=100, max_bytes=2 * size + size // 2)
    assert [sum(b - a for a, b in ranges) for ranges in by_bytes] == [2, 2, 2]


def test_failed_lines_become_failed_rows_with_the_providers_reason(tmp_path):
    with localapi.running(batch_seconds=0.1, batch_failure_rate=0.4, seed=2) as server:
        ctx = make_context(tmp_path, server)
        sweep = new_sweep(ctx)
        drive(ctx, sweep)
    stored = rows(ctx, sweep)
    failed = [r for r in stored.values() if r.state == RowState.FAILED]
    assert len(stored) == 12 and 0 < len(failed) < 12
    assert all(r.error_kind == "server_error" and r.error.startswith("HTTP 500: The server had an error")
               for r in failed)


def test_an_expired_batch_keeps_what_completed_and_sends_the_rest_again(tmp_path):
    with localapi.running(batch_seconds=0.1, batch_completion_fraction=0.6) as server:
        ctx = make_context(tmp_path, server)
        sweep = new_sweep(ctx)
        resent = []

        def on_step(step):
            if step.new_batches:
                resent.extend(step.new_batches)
                server.update(batch_completion_fraction=1.0)

        drive(ctx, sweep, on_step=on_step)
    stored = rows(ctx, sweep)
    assert resent and sorted(stored) == list(range(12)) and all(r.state == RowState.OK for r in stored.values())


def test_cancel_keeps_nothing_unsent_and_every_request_gets_a_row(tmp_path):
    with localapi.running(batch_seconds=3) as server:
        ctx = make_context(tmp_path, server)
        sweep = new_sweep(ctx)
        for batch in store.open_batches(ctx.engine, sweep.id):
            batch_mode.submit(ctx, batch.id)
        for batch in store.open_batches(ctx.engine, sweep.id):
            batch_mode.cancel(ctx, batch.id)
        drive(ctx, sweep)
    stored = rows(ctx, sweep)
    assert sorted(stored) == list(range(12))
    assert all(r.state == RowState.FAILED and r.error.startswith("not sent: batch_cancelled") for r in stored.values())


class CrashAfter:
    """The SDK client, except that batches.create raises once its call went through (a worker
    killed after the provider created the batch, before gridtune stored its id)."""

    def __init__(self, client):
        self._client = client
        self.files = client.files
        self.batches = self

    def create(self, **kwargs):
        self._client.batches.create(**kwargs)
        raise KeyboardInterrupt("killed")

    def __getattr__(self, name):
        return getattr(self._client.batches, name)


def test_a_worker_killed_between_upload_and_create_or_before_storing_the_id_duplicates_nothing(tmp_path):
    with localapi.running(batch_seconds=0.1) as server:
        ctx = make_context(tmp_path, server, GRIDTUNE_BATCH_MAX_REQUESTS=12)
        sweep = new_sweep(ctx)
        [batch] = store.open_batches(ctx.engine, sweep.id)
        real = ctx.client
        ctx.__dict__["client"] = CrashAfter(real)
        with pytest.raises(KeyboardInterrupt):
            batch_mode.submit(ctx, batch.id)  # uploaded and created; the id never stored
        assert store.get_batch(ctx.engine, batch.id).provider_batch_id is None
        ctx.__dict__["client"] = real
        drive(ctx, sweep)  # the redelivered task
        assert len(real.batches.list().data) == 1
        assert len([f for f in real.files.list(purpose="batch").data]) == 1
    assert len(rows(ctx, sweep)) == 12


def test_resume_does_not_duplicate_a_batch_in_flight(tmp_path, monkeypatch):
    from producer.enqueue import enqueue_batches
    from worker import tasks

    sent = []
    monkeypatch.setattr(tasks.batch_submit, "apply_async", lambda args, **kw: sent.append(("submit", *args)))
    monkeypatch.setattr(tasks.batch_poll, "apply_async", lambda args, **kw: sent.append(("poll", *args)))
    with localapi.running(batch_seconds=5) as server:
        ctx = make_context(tmp_path, server)
        sweep = new_sweep(ctx)
        first, *others = store.open_batches(ctx.engine, sweep.id)
        batch_mode.submit(ctx, first.id)  # in flight at the provider
        result = enqueue_batches(None, ctx.engine, sweep, False, max_requests=5, max_bytes=10**8)
    assert result.sent == 0 and len(store.open_batches(ctx.engine, sweep.id)) == 3
    assert sorted(sent) == sorted([("poll", first.id)] + [("submit", b.id) for b in others])


def test_a_capped_batch_sweep_creates_no_batch_past_the_cap(tmp_path):
    config = parse_config(CONFIG)
    with localapi.running(batch_seconds=0.1) as server:
        ctx = make_context(tmp_path, server)
        # Room for the first batch's worst case (5 requests), not for the second's.
        worst = pricing.inference_cost("gpt-4o-mini", 5 * 40, 5 * 300, "batch")
        sweep = new_sweep(ctx, cap=worst * 1.5)
        drive(ctx, sweep)
        created = len(ctx.client.batches.list().data)
    stored = rows(ctx, sweep)
    assert len(stored) == 12 and created in (1, 2)
    assert sum(r.cost_usd or 0 for r in stored.values()) <= worst * 1.5
    assert any(r.error_kind == "spend_cap" for r in stored.values())
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.STOPPED
    assert config.total_requests == 12


def test_an_embedded_batch_sweep_runs_end_to_end_and_finalizes_once(tmp_path, monkeypatch, capsys):
    path = tmp_path / "b.toml"
    path.write_text(CONFIG, encoding="utf-8")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/e2e.db")
    monkeypatch.setenv("GRIDTUNE_BATCH_POLL_SECONDS", "0.1")
    monkeypatch.setenv("GRIDTUNE_BATCH_MAX_REQUESTS", "5")
    monkeypatch.setenv("GRIDTUNE_DATA_DIR", str(tmp_path / "data"))
    assert main(["sweep", "--config", str(path), "--name", "e2e", "--batch", "--json"]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["state"] == "done" and snap["ok"] == 12 and snap["finalizer_runs"] == 1
    assert snap["mode"] == "batch" and snap["batches"] == {"ingested": 3}


def test_cancel_stops_an_online_sweep_too(tmp_path, monkeypatch, capsys):
    from worker.generation import run_request

    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/batch.db")
    with localapi.running() as server:
        ctx = make_context(tmp_path, server)
        sweep, _ = store.create_or_resume_sweep(ctx.engine, "online", parse_config(CONFIG))
        assert main(["cancel", "online"]) == 0
        assert "cancelled" in capsys.readouterr().err
        run_request(ctx, sweep.id, 0)
        assert server.stats()["requests"] == 0
    assert list(rows(ctx, sweep)) == [0] and rows(ctx, sweep)[0].error == "not sent: the sweep was stopped (cancelled by the user)"
    assert main(["cancel", "online"]) == 0 and "nothing to cancel" in capsys.readouterr().err


def test_a_refused_batch_fails_its_requests_with_the_reason_and_auth_stops_the_sweep(tmp_path):
    import openai

    with localapi.running(api_keys=("sk-the-right-one-1234",)) as server:
        ctx = make_context(tmp_path, server)
        sweep = new_sweep(ctx)
        first = store.open_batches(ctx.engine, sweep.id)[0]
        with pytest.raises(openai.AuthenticationError) as refused:
            batch_mode.submit(ctx, first.id)
        step = batch_mode.give_up(ctx, first.id, refused.value)
    assert not step.finalize
    stored = rows(ctx, sweep)
    assert sorted(stored) == [0, 1, 2, 3, 4]
    assert all(r.error_kind == "auth" and "HTTP 401" in r.error and "sk-test-batch" not in r.error
               for r in stored.values())
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.STOPPED
    # The other batches will not be created: their requests are "not sent" rows.
    for other in store.open_batches(ctx.engine, sweep.id):
        batch_mode.submit(ctx, other.id)
    assert len(rows(ctx, sweep)) == 12 and {r.error_kind for r in rows(ctx, sweep).values()} == {"auth", "stopped"}


def test_batch_mode_is_refused_for_a_local_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/x.db")
    path = tmp_path / "local.toml"
    path.write_text(CONFIG.replace('"gpt-4o-mini"', '"smollm2-135m"'), encoding="utf-8")
    assert main(["sweep", "--config", str(path), "--batch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "batch mode needs a provider's /v1/batches" in err[-1]
