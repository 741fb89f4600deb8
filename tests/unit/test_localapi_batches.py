"""The local server's /v1/batches, through the real SDK: validation, listing, cancel, output order."""

from __future__ import annotations

import json
import time

import openai
import pytest

import localapi


def line(custom_id: str, model: str = "gpt-4o-mini", **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"hero {custom_id}"}], "max_completion_tokens": 20}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body, **extra}


def submit(client, lines, purpose="batch"):
    content = "\n".join(json.dumps(item) for item in lines).encode()
    uploaded = client.files.create(file=("in.jsonl", content), purpose=purpose)
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")


def wait_end(client, batch_id):
    deadline = time.monotonic() + 10
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return batch


@pytest.fixture
def client():
    with localapi.running(batch_seconds=0.1) as server:
        yield openai.OpenAI(base_url=server.base_url, api_key="sk-test-batches", max_retries=0)


def test_results_match_by_custom_id_and_come_in_another_order(client):
    batch = wait_end(client, submit(client, [line(f"r{i}") for i in range(40)]).id)
    assert batch.status == "completed" and batch.request_counts.completed == 40 and batch.error_file_id is None
    results = [json.loads(raw) for raw in client.files.content(batch.output_file_id).text.splitlines()]
    ids = [r["custom_id"] for r in results]
    assert sorted(ids) == sorted(f"r{i}" for i in range(40)) and ids != [f"r{i}" for i in range(40)]
    assert all(f"hero {r['custom_id']}" in r["response"]["body"]["choices"][0]["message"]["content"] for r in results)


@pytest.mark.parametrize(("lines", "code"), [
    ([line("a"), line("a")], "duplicate_custom_id"),
    ([line("a"), line("b", model="gpt-4o")], "mismatched_model"),
    ([line("a", url="/v1/embeddings")], "invalid_url"),
])
def test_a_bad_input_file_fails_the_batch_with_the_reason(client, lines, code):
    batch = wait_end(client, submit(client, lines).id)
    assert batch.status == "failed" and batch.errors.data[0].code == code


def test_a_batch_needs_a_batch_file_and_a_24h_window(client):
    with pytest.raises(openai.BadRequestError, match="purpose"):
        submit(client, [line("a")], purpose="fine-tune")
    uploaded = client.files.create(file=("in.jsonl", json.dumps(line("a")).encode()), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="24h"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_list_and_cancel(client):
    first = submit(client, [line("a")])
    second = submit(client, [line("b")])
    assert [b.id for b in client.batches.list()] == [second.id, first.id]
    cancelled = client.batches.cancel(second.id)
    assert cancelled.status == "cancelling"
    assert wait_end(client, second.id).status == "cancelled"
    assert wait_end(client, first.id).status == "completed"
    with pytest.raises(openai.BadRequestError, match="Cannot cancel"):
        client.batches.cancel(first.id)
