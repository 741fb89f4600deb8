"""The openai backend end to end, with the real SDK against the local OpenAI-compatible server."""

from __future__ import annotations

import os
import re
import threading

import httpx2
import openai
import pytest

import localapi
from models import JobStatus, SweepState, store
from tests.unit.test_finetune_helpers import (
    events,
    make_context,
    make_sweep,
    run_until_done,
    sweep_config,
)
from worker import finetune
from worker.finetune import openai_backend


@pytest.fixture
def server():
    with localapi.running(finetune_step_seconds=0.05) as handle:
        yield handle


def status_trail(ctx, job_id: int) -> list[str]:
    return [e.data["status"] for e in events(ctx, job_id) if e.data and e.data.get("type") == "status"]


class FlakyTransport(httpx2.BaseTransport):
    """Forwards to the real server, but answers the first requests that match a rule with a failure.

    rules: (method, path regex, [action, ...]); actions: an HTTP status to answer with, "connect"
    (the connection fails), or "lost" (the server handles the request, the client sees a 502).
    """

    def __init__(self, rules, body: dict | None = None):
        self.real = httpx2.HTTPTransport()
        self.rules = [(method, re.compile(path), list(actions)) for method, path, actions in rules]
        self.body = body
        self.failed: list[str] = []
        self.lock = threading.Lock()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        with self.lock:
            action = next((actions.pop(0) for method, path, actions in self.rules
                           if actions and request.method == method and path.search(request.url.path)), None)
        if action is None:
            return self.real.handle_request(request)
        self.failed.append(f"{request.method} {request.url.path} {action}")
        if action == "connect":
            raise httpx2.ConnectError("connection refused", request=request)
        if action == "lost":
            self.real.handle_request(request).read()
            action = 502
        body = self.body or {"error": {"message": "upstream trouble", "type": "server_error", "code": None}}
        return httpx2.Response(action, json=body, request=request)


def flaky_client(server, transport) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-test", base_url=server.base_url, max_retries=0,
                         http_client=httpx2.Client(transport=transport))


def test_success_stores_model_estimate_files_and_events(server, tmp_path):
    ctx = make_context(tmp_path, server.base_url)
    sweep, dataset_id = make_sweep(ctx, "Heroes of 2026!", sweep_config(finetune={"n_epochs": 2, "seed": 7}))

    step = finetune.submit(ctx, sweep.id, dataset_id)
    assert step.poll_in == pytest.approx(0.05) and not step.run_local
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.FINETUNING
    run_until_done(ctx, step)

    job = store.get_job(ctx.engine, step.job_id)
    assert job.status == JobStatus.SUCCEEDED
    assert job.fine_tuned_model.startswith("ft:gpt-4o-mini-2024-07-18:gridtune:Heroes-of-2026:")
    assert job.provider_job_id.startswith("ftjob-")
    assert job.training_file_id and job.validation_file_id
    assert job.trained_tokens and job.finished_at is not None
    dataset = store.get_dataset(ctx.engine, dataset_id)
    # 2 epochs over the training file; the server counts tokens the same way.
    assert job.estimated_tokens == 2 * dataset.train_tokens == job.trained_tokens
    assert job.estimated_cost_usd == pytest.approx(job.estimated_tokens * 3.00 / 1e6)
    remote = ctx.client.fine_tuning.jobs.retrieve(job.provider_job_id)
    assert remote.hyperparameters.n_epochs == 2 and remote.seed == 7
    assert remote.validation_file == job.validation_file_id
    done = store.get_sweep_by_id(ctx.engine, sweep.id)
    assert done.state == SweepState.DONE and done.finished_at is not None
    estimate = [e for e in events(ctx, job.id) if e.data and e.data.get("type") == "estimate"]
    assert len(estimate) == 1 and estimate[0].data["epochs"] == 2


def test_auto_epochs_are_left_to_the_provider(server, tmp_path):
    ctx = make_context(tmp_path, server.base_url)
    sweep, dataset_id = make_sweep(ctx)
    step = finetune.submit(ctx, sweep.id, dataset_id)
    run_until_done(ctx, step)
    job = store.get_job(ctx.engine, step.job_id)
    examples = store.get_dataset(ctx.engine, dataset_id).train_examples
    remote = ctx.client.fine_tuning.jobs.retrieve(job.provider_job_id)
    # OpenAI's auto estimate for a small file (3n < 100): min(25, 100 // n) epochs, ours too.
    assert remote.hyperparameters.n_epochs == min(25, 100 // examples)
    assert job.estimated_tokens == job.trained_tokens


def test_polling_records_each_status_change_and_provider_events_once(tmp_path):
    with localapi.running(finetune_step_seconds=0.4) as server:
        ctx = make_context(tmp_path, server.base_url)
        sweep, dataset_id = make_sweep(ctx)
        step = finetune.submit(ctx, sweep.id, dataset_id)
        run_until_done(ctx, step)
        job_id = step.job_id
        # Each poll stores the status it sees, in order; on a loaded machine a poll may come late
        # and miss a short-lived status, so require an ordered trail through several of them.
        full = ["pending", "validating_files", "queued", "running", "succeeded"]
        trail = status_trail(ctx, job_id)
        assert trail[0] == "pending" and trail[-1] == "succeeded" and "running" in trail
        assert len(trail) >= 4 and trail == [s for s in full if s in trail]

        provider_events = [e for e in events(ctx, job_id) if e.provider_event_id]
        remote = ctx.client.fine_tuning.jobs.list_events(store.get_job(ctx.engine, job_id).provider_job_id,
                                                         limit=100).data
        assert sorted(e.provider_event_id for e in provider_events) == sorted(e.id for e in remote)
        metrics = [e.data for e in provider_events if e.data["type"] == "metrics"]
        assert len(metrics) == 5 and all("train_loss" in m for m in metrics)
        assert [e.provider_event_id for e in provider_events] == [e.id for e in reversed(remote)]  # oldest first

        # Poll again as a duplicate message would: nothing is fetched or stored twice.
        job = store.get_job(ctx.engine, job_id)
        assert openai_backend.new_provider_events(ctx, ctx.client, job) == []
        store.update_job(ctx.engine, job_id, status=JobStatus.RUNNING)
        finetune.poll(ctx, job_id)
        assert len([e for e in events(ctx, job_id) if e.provider_event_id]) == len(remote)
        assert not store.add_event(ctx.engine, job_id, "again", provider_event_id=remote[0].id)


def test_failed_job_ends_with_the_reason(tmp_path):
    with localapi.running(finetune_step_seconds=0.05, finetune_outcome="fail") as server:
        ctx = make_context(tmp_path, server.base_url)
        sweep, dataset_id = make_sweep(ctx)
        run_until_done(ctx, finetune.submit(ctx, sweep.id, dataset_id))
    job = store.latest_job(ctx.engine, sweep.id)
    assert job.status == JobStatus.FAILED
    assert job.error_code == "internal_error" and "internal error" in job.error_message
    assert job.fine_tuned_model is None
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.DONE


def test_training_not_available_ends_cleanly_with_the_explanation(tmp_path):
    with localapi.running(finetune_outcome="forbidden") as server:
        ctx = make_context(tmp_path, server.base_url)
        sweep, dataset_id = make_sweep(ctx)
        step = finetune.submit(ctx, sweep.id, dataset_id)
    assert step.poll_in is None and not step.run_local  # not retried
    job = store.get_job(ctx.engine, step.job_id)
    dataset = store.get_dataset(ctx.engine, dataset_id)
    assert job.status == JobStatus.UNAVAILABLE and job.error_code == "training_not_available"
    assert job.error_message.startswith("fine-tuning is not available to this organization: "
                                        "OpenAI is winding down self-serve fine-tuning (")
    assert job.error_message.endswith(f'the dataset is ready at {dataset.train_path}: '
                                      'use backend = "local" or another provider')
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.DONE
    assert finetune.poll(ctx, job.id).poll_in is None  # a stray poll changes nothing


def test_transient_errors_are_retried_on_later_polls(server, tmp_path):
    ctx = make_context(tmp_path, server.base_url)
    transport = FlakyTransport([
        ("POST", r"/v1/files$", [503]),
        ("POST", r"/v1/fine_tuning/jobs$", ["connect", 429]),
        ("GET", r"/v1/fine_tuning/jobs/[^/]+$", [500, "connect"]),
        ("GET", r"/events$", [502]),
    ])
    ctx.client = flaky_client(server, transport)
    sweep, dataset_id = make_sweep(ctx)

    step = finetune.submit(ctx, sweep.id, dataset_id)
    assert step.poll_in is not None and step.poll_in > 0  # a retry, not a failure
    steps = run_until_done(ctx, step)

    job = store.get_job(ctx.engine, step.job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error_message
    assert len(transport.failed) == 6, transport.failed
    retries = [e for e in events(ctx, job.id) if e.data and e.data.get("type") == "retry"]
    # The count (which sets the backoff) restarts whenever something succeeded in between.
    assert [e.data["retry"] for e in retries] == [1, 1, 2, 1, 2, 3]
    assert all(e.level == "warning" for e in retries)
    assert len(ctx.client.fine_tuning.jobs.list().data) == 1  # submitted once
    assert len(steps) > 6


def test_a_lost_create_response_adopts_the_job_instead_of_creating_another(server, tmp_path):
    ctx = make_context(tmp_path, server.base_url)
    transport = FlakyTransport([("POST", r"/v1/fine_tuning/jobs$", ["lost"])])
    ctx.client = flaky_client(server, transport)
    sweep, dataset_id = make_sweep(ctx)
    run_until_done(ctx, finetune.submit(ctx, sweep.id, dataset_id))
    remote_jobs = ctx.client.fine_tuning.jobs.list().data
    assert len(remote_jobs) == 1
    job = store.latest_job(ctx.engine, sweep.id)
    assert job.status == JobStatus.SUCCEEDED and job.provider_job_id == remote_jobs[0].id


def test_submission_gives_up_after_max_attempts(server, tmp_path):
    ctx = make_context(tmp_path, server.base_url, GRIDTUNE_MAX_ATTEMPTS=3)
    ctx.client = flaky_client(server, FlakyTransport([("POST", r"/v1/files$", [503] * 10)]))
    sweep, dataset_id = make_sweep(ctx)
    steps = run_until_done(ctx, finetune.submit(ctx, sweep.id, dataset_id))
    job = store.latest_job(ctx.engine, sweep.id)
    assert len(steps) == 3
    assert job.status == JobStatus.FAILED and job.error_code == "server_error"
    assert "gave up after 3 attempts" in job.error_message and "HTTP 503" in job.error_message
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.DONE


def test_permanent_errors_fail_the_job_without_the_key(tmp_path):
    key = "sk-secret-0123456789abcdef"
    with localapi.running(api_keys=("sk-the-right-one",)) as server:
        ctx = make_context(tmp_path, server.base_url, OPENAI_API_KEY=key)
        sweep, dataset_id = make_sweep(ctx)
        step = finetune.submit(ctx, sweep.id, dataset_id)
    assert step.poll_in is None
    job = store.get_job(ctx.engine, step.job_id)
    assert job.status == JobStatus.FAILED and job.error_code == "invalid_api_key"
    assert "HTTP 401" in job.error_message


def test_a_bad_request_fails_the_job_with_the_providers_reason(server, tmp_path):
    ctx = make_context(tmp_path, server.base_url)
    sweep, dataset_id = make_sweep(ctx, config=sweep_config(finetune={"n_epochs": 500}))
    step = finetune.submit(ctx, sweep.id, dataset_id)
    job = store.get_job(ctx.engine, step.job_id)
    assert step.poll_in is None
    assert job.status == JobStatus.FAILED and job.error_code == "invalid_value"
    assert "HTTP 400" in job.error_message and "n_epochs" in job.error_message


def test_the_key_is_redacted_from_stored_messages(server, tmp_path):
    key = "sk-secret-0123456789abcdef"
    ctx = make_context(tmp_path, server.base_url, OPENAI_API_KEY=key)
    body = {"error": {"message": f"key {key} is not allowed here", "type": "invalid_request_error", "code": None}}
    ctx.client = openai.OpenAI(api_key=key, base_url=server.base_url, max_retries=0, http_client=httpx2.Client(
        transport=FlakyTransport([("POST", r"/v1/files$", [400])], body=body)))
    sweep, dataset_id = make_sweep(ctx)
    job = store.get_job(ctx.engine, finetune.submit(ctx, sweep.id, dataset_id).job_id)
    assert job.status == JobStatus.FAILED
    assert key not in job.error_message and "***" in job.error_message
    assert all(key not in e.message for e in events(ctx, job.id))


def test_submitting_again_continues_the_unfinished_job(server, tmp_path):
    ctx = make_context(tmp_path, server.base_url)
    sweep, dataset_id = make_sweep(ctx)
    first = finetune.submit(ctx, sweep.id, dataset_id)
    again = finetune.submit(ctx, sweep.id, dataset_id)
    assert again.job_id == first.job_id and again.poll_in is not None
    assert len(ctx.client.fine_tuning.jobs.list().data) == 1
    run_until_done(ctx, again)
    # A finished job is not continued: a new submission makes a new job.
    third = finetune.submit(ctx, sweep.id, dataset_id)
    assert third.job_id != first.job_id
    run_until_done(ctx, third)
    assert len(store.list_jobs(ctx.engine)) == 2
    assert len(ctx.client.fine_tuning.jobs.list().data) == 2


def test_backend_none_stops_at_the_dataset(tmp_path):
    ctx = make_context(tmp_path)
    sweep, dataset_id = make_sweep(ctx, config=sweep_config(finetune={"backend": "none"}))
    step = finetune.submit(ctx, sweep.id, dataset_id)
    assert step.poll_in is None and not step.run_local
    job = store.get_job(ctx.engine, step.job_id)
    assert job.status == JobStatus.SKIPPED and job.estimated_tokens > 0
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.DONE


def test_an_unusable_dataset_fails_the_job_with_a_clear_message(server, tmp_path):
    ctx = make_context(tmp_path, server.base_url)
    sweep, dataset_id = make_sweep(ctx, config=sweep_config(dataset={"min_examples": 10}))
    train = store.get_dataset(ctx.engine, dataset_id).train_path
    lines = open(train).read().splitlines()
    with open(train, "w") as f:
        f.write("\n".join(lines[:4]) + "\n")
    job = store.get_job(ctx.engine, finetune.submit(ctx, sweep.id, dataset_id).job_id)
    assert job.status == JobStatus.FAILED and job.error_code == "refused_locally"
    assert "4 examples, fewer than 10 (dataset.min_examples)" in job.error_message

    os.remove(train)
    job = store.get_job(ctx.engine, finetune.submit(ctx, sweep.id, dataset_id).job_id)
    assert job.status == JobStatus.FAILED and job.error_code == "dataset_unreadable"
    assert train in job.error_message and "no such file" in job.error_message
    assert ctx.client.files.list().data == []  # nothing was uploaded


def test_the_providers_minimum_is_checked_before_upload_even_when_the_config_asks_less(server, tmp_path):
    # Issue 13, #5: min_examples lowered to 3, 5 usable examples, the openai backend: the provider
    # would refuse fewer than 10 after the upload. Refused here, nothing uploaded, one clear reason.
    ctx = make_context(tmp_path, server.base_url)
    sweep, dataset_id = make_sweep(ctx, config=sweep_config(dataset={"min_examples": 3}))
    train = store.get_dataset(ctx.engine, dataset_id).train_path
    lines = open(train).read().splitlines()
    with open(train, "w") as f:
        f.write("\n".join(lines[:5]) + "\n")
    job = store.get_job(ctx.engine, finetune.submit(ctx, sweep.id, dataset_id).job_id)
    assert job.status == JobStatus.FAILED and job.error_code == "refused_locally"
    assert "5 examples, fewer than 10 (the openai backend's minimum)" in job.error_message
    assert ctx.client.files.list().data == [] and job.provider_job_id is None


def test_a_training_file_resaved_with_a_byte_order_mark_is_read(server, tmp_path):
    ctx = make_context(tmp_path, server.base_url)
    sweep, dataset_id = make_sweep(ctx)
    train = store.get_dataset(ctx.engine, dataset_id).train_path
    text = open(train, encoding="utf-8").read()
    with open(train, "w", encoding="utf-8-sig") as f:  # as a Windows editor saves it
        f.write(text)
    job = store.get_job(ctx.engine, finetune.submit(ctx, sweep.id, dataset_id).job_id)
    assert job.status != JobStatus.FAILED, job.error_message
    job = store.get_job(ctx.engine, job.id)
    assert ctx.client.files.content(job.training_file_id).content == text.encode()  # sent as UTF-8, no mark

    sweep, dataset_id = make_sweep(ctx, "latin")
    train = store.get_dataset(ctx.engine, dataset_id).train_path
    with open(train, "wb") as f:
        f.write(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')  # Latin-1
    job = store.get_job(ctx.engine, finetune.submit(ctx, sweep.id, dataset_id).job_id)
    assert job.status == JobStatus.FAILED and job.error_code == "dataset_unreadable"
    assert "not UTF-8 text (byte 46, line 1" in job.error_message


def test_the_poll_interval_stays_below_the_visibility_timeout(server, tmp_path):
    ctx = make_context(tmp_path, server.base_url, GRIDTUNE_FINETUNE_POLL_SECONDS=86400,
                       GRIDTUNE_VISIBILITY_TIMEOUT=120)
    sweep, dataset_id = make_sweep(ctx)
    assert finetune.submit(ctx, sweep.id, dataset_id).poll_in == 30.0


@pytest.mark.parametrize(("name", "suffix"), [
    ("superhero", "superhero"),
    ("my sweep/v2 (test)", "my-sweep-v2-test"),
    ("!!!", None),
    ("x" * 100, "x" * 64),
])
def test_suffix_from_the_sweep_name(name, suffix):
    assert openai_backend.job_suffix(sweep_config().finetune, name) == suffix


def test_configured_suffix_and_hyperparameters():
    settings = sweep_config(finetune={"suffix": "SuperHero", "batch_size": 4, "seed": 1}).finetune
    request = openai_backend.job_request(settings, openai_backend.job_suffix(settings, "ignored"), "file-1", None)
    assert request == {
        "model": "gpt-4o-mini-2024-07-18",
        "training_file": "file-1",
        "suffix": "SuperHero",
        "seed": 1,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
    }
