"""localapi's files and fine-tuning jobs through the real openai SDK."""

import json
import re
import time

import bpe_openai
import httpx2
import openai
import pytest

import localapi

BASE_MODEL = "gpt-4o-mini-2024-07-18"
ENCODING = bpe_openai.get_encoding("o200k_base")
# One connection pool for every SDK client: building a client's own costs ~0.2 s.
HTTP = httpx2.Client()
STEP = 0.02  # finetune_step_seconds: a job finishes in well under a second
TERMINAL = ("succeeded", "failed", "cancelled")
STATUS_ORDER = ["validating_files", "queued", "running", "succeeded"]


def example(age: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You describe characters."},
            {"role": "user", "content": f"{age}, man, can eat a lot"},
            {"role": "assistant", "content": f"A {age}-year-old man with a legendary appetite."},
        ]
    }


def jsonl(examples) -> bytes:
    return "".join(json.dumps(e) + "\n" for e in examples).encode()


GOOD_FILE = jsonl(example(age) for age in range(18, 30))


def file_tokens(examples) -> int:
    """OpenAI's count: 3 per message + the encoded values, + 3 per example."""
    return sum(
        3 + sum(3 + len(ENCODING.encode(m["role"])) + len(ENCODING.encode(m["content"])) for m in e["messages"])
        for e in examples
    )


def sdk(handle):
    return openai.OpenAI(base_url=handle.base_url, api_key="sk-test-finetune-0000", max_retries=0, http_client=HTTP)


def upload(client, content=GOOD_FILE, purpose="fine-tune"):
    return client.files.create(file=("train.jsonl", content), purpose=purpose)


def wait_for_end(client, job_id, timeout=10.0):
    """Poll until the job is finished; returns (final job, statuses in the order they were seen)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if not seen or seen[-1] != job.status:
            seen.append(job.status)
        if job.status in TERMINAL:
            return job, seen
        time.sleep(STEP / 4)
    raise AssertionError(f"job {job_id} still {seen[-1]} after {timeout}s")


def test_files_can_be_uploaded_listed_read_and_deleted():
    with localapi.running() as server:
        client = sdk(server)
        uploaded = upload(client)
        assert uploaded.id.startswith("file-") and uploaded.object == "file"
        assert (uploaded.bytes, uploaded.filename, uploaded.purpose, uploaded.status) == (
            len(GOOD_FILE),
            "train.jsonl",
            "fine-tune",
            "processed",
        )
        assert client.files.retrieve(uploaded.id).id == uploaded.id
        assert [f.id for f in client.files.list(purpose="fine-tune")] == [uploaded.id]
        assert client.files.content(uploaded.id).read() == GOOD_FILE
        assert client.files.delete(uploaded.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(uploaded.id)
        with pytest.raises(openai.BadRequestError):
            upload(client, purpose="training")


def test_a_job_walks_every_status_to_a_tuned_model_that_answers():
    with localapi.running(finetune_step_seconds=STEP) as server:
        client = sdk(server)
        training_file = upload(client)
        created = client.fine_tuning.jobs.create(
            model=BASE_MODEL,
            training_file=training_file.id,
            seed=42,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        )
        assert created.object == "fine_tuning.job" and created.id.startswith("ftjob-")
        assert (created.status, created.fine_tuned_model) == ("validating_files", None)
        assert created.organization_id == "org-local"

        job, seen = wait_for_end(client, created.id)
        assert job.status == "succeeded", job.error
        assert seen == sorted(seen, key=STATUS_ORDER.index), seen
        assert job.fine_tuned_model == f"ft:{BASE_MODEL}:gridtune::{created.id.removeprefix('ftjob-')[:8]}"
        assert job.trained_tokens == 2 * file_tokens(example(age) for age in range(18, 30))
        assert job.hyperparameters.n_epochs == 2 and job.finished_at and job.seed == 42
        assert client.files.content(job.result_files[0]).read().startswith(b"step,train_loss")

        events = client.fine_tuning.jobs.list_events(created.id, limit=100).data
        messages = [e.message for e in reversed(events)]  # the API lists newest first
        assert messages[-1] == "The job has successfully completed"
        milestones = ("Validating training file", "Files validated", "Fine-tuning job started", "New fine-tuned model")
        for milestone in milestones:
            assert any(m.startswith(milestone) for m in messages), milestone
        metrics = [e for e in reversed(events) if e.type == "metrics"]
        losses = [e.data["train_loss"] for e in metrics]
        assert len(metrics) >= 3 and losses == sorted(losses, reverse=True) and len(set(losses)) == len(losses)
        assert re.fullmatch(r"Step \d+/\d+: training loss=\d+\.\d\d", metrics[0].message)

        reply = client.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "18, man, can eat a lot"}]
        ).choices[0].message.content
    assert reply.startswith("Fine-tuned profile:")
    for term in ("18", "man", "eat a lot"):
        assert term in reply


def test_the_suffix_goes_into_the_model_name_and_is_limited_to_64_characters():
    with localapi.running(finetune_step_seconds=STEP) as server:
        client = sdk(server)
        training_file = upload(client).id
        with pytest.raises(openai.BadRequestError) as too_long:
            client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=training_file, suffix="x" * 65)
        created = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=training_file, suffix="heroes")
        job, _ = wait_for_end(client, created.id)
    assert too_long.value.param == "suffix"
    assert job.fine_tuned_model.startswith(f"ft:{BASE_MODEL}:gridtune:heroes:")
    assert job.hyperparameters.n_epochs == 8  # "auto" for 12 examples: min(25, 100 // 12)


def test_unknown_training_file_is_a_400():
    with localapi.running() as server:
        with pytest.raises(openai.BadRequestError) as unknown:
            sdk(server).fine_tuning.jobs.create(model=BASE_MODEL, training_file="file-nope")
    assert unknown.value.param == "training_file" and "file-nope" in unknown.value.message


def _lines(*examples) -> bytes:
    return "".join(e + "\n" for e in examples).encode()


GOOD_LINE = json.dumps(example(20))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (_lines(*[GOOD_LINE] * 2, "{not json", *[GOOD_LINE] * 9), "Line 3: not valid JSON"),
        (_lines(*[GOOD_LINE] * 4, json.dumps({"messages": []}), *[GOOD_LINE] * 9), "Line 5: 'messages' must be"),
        (
            _lines(*[GOOD_LINE] * 10, json.dumps({"messages": [{"role": "user", "content": "hi"}]})),
            "Line 11: the example has no assistant message",
        ),
        (
            _lines(
                GOOD_LINE,
                json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}),
                *[GOOD_LINE] * 9,
            ),
            "Line 2, message 1: 'content' must be a non-empty string",
        ),
        (
            _lines(json.dumps({"messages": [{"role": "robot", "content": "x"}]}), *[GOOD_LINE] * 10),
            "Line 1, message 1: invalid role 'robot'",
        ),
        (_lines(*[GOOD_LINE] * 9), "has 9 example(s), but must have at least 10"),
    ],
)
def test_a_bad_training_file_fails_the_job_naming_the_problem(content, problem):
    with localapi.running(finetune_step_seconds=STEP) as server:
        client = sdk(server)
        created = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=upload(client, content).id)
        job, _ = wait_for_end(client, created.id)
    assert job.status == "failed" and job.fine_tuned_model is None
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert problem in job.error.message


def test_the_fail_outcome_fails_mid_training_with_an_error_event():
    with localapi.running(finetune_step_seconds=STEP, finetune_outcome="fail") as server:
        client = sdk(server)
        created = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=upload(client).id)
        job, seen = wait_for_end(client, created.id)
        events = client.fine_tuning.jobs.list_events(created.id).data
    assert job.status == "failed" and job.error.code and job.error.message and job.fine_tuned_model is None
    assert "running" in seen
    assert events[0].level == "error" and events[0].message == job.error.message


def test_the_forbidden_outcome_refuses_like_the_winding_down_platform():
    with localapi.running(finetune_outcome="forbidden") as server:
        client = sdk(server)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=upload(client).id)
    assert refused.value.code == "training_not_available" and refused.value.type == "invalid_request_error"
    assert "winding down the fine-tuning platform" in refused.value.message


def test_jobs_can_be_listed_paged_and_cancelled():
    with localapi.running(finetune_step_seconds=30) as server:  # nothing advances during the test
        client = sdk(server)
        training_file = upload(client).id
        ids = [client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=training_file).id for _ in range(3)]

        first_page = client.fine_tuning.jobs.list(limit=2)
        assert [j.id for j in first_page.data] == ids[::-1][:2] and first_page.has_more
        rest = client.fine_tuning.jobs.list(after=ids[1], limit=2)
        assert [j.id for j in rest.data] == [ids[0]] and not rest.has_more

        events = client.fine_tuning.jobs.list_events(ids[0], limit=1)
        assert len(events.data) == 1 and events.has_more
        assert events.data[0].object == "fine_tuning.job.event" and events.data[0].type == "message"

        cancelled = client.fine_tuning.jobs.cancel(ids[0])
        assert cancelled.status == "cancelled"
        assert client.fine_tuning.jobs.retrieve(ids[0]).status == "cancelled"
        with pytest.raises(openai.BadRequestError):
            client.fine_tuning.jobs.cancel(ids[0])
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.retrieve("ftjob-missing")
