"""Small proofs for guarantees in docs/reliability.md that had none that could fail.

Each test names the mechanism it holds; bench/mutants.py removes that mechanism and expects the
test to fail.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from gridtune.settings import Settings
from gridtune.sweep import parse_config
from models import RowState, store
from models.schema import utcnow
from tests.unit.test_generation import CONFIG
from worker.context import WorkerContext
from worker.generation import record_internal_failure, run_request
from worker.tokens import count_messages


def context(tmp_path, base_url="http://127.0.0.1:9/v1", key="sk-test-guarantees-0123456789", **settings):
    return WorkerContext(Settings(DATABASE_URL=f"sqlite:///{tmp_path}/g.db", OPENAI_API_KEY=key,
                                  OPENAI_BASE_URL=base_url, GRIDTUNE_BACKOFF_CAP=0.01, **settings))


def new_sweep(ctx):
    return store.create_or_resume_sweep(ctx.engine, "g", parse_config(CONFIG))[0]


# --- §1: the unique key + insert-or-ignore (models/store.py::insert_generation) -----------------
def test_a_second_insert_for_a_request_is_ignored(tmp_path):
    ctx = context(tmp_path)
    sweep = new_sweep(ctx)
    row = dict(sweep_id=sweep.id, request_index=2, repeat=0, params={}, prompt="p", input_text="i",
               finished_at=utcnow())
    assert store.insert_generation(ctx.engine, {**row, "state": RowState.OK, "response_text": "first"})
    assert not store.insert_generation(ctx.engine, {**row, "state": RowState.OK, "response_text": "second"})
    [stored] = list(store.iter_rows(ctx.engine, sweep.id))
    assert stored.response_text == "first"


# --- §5: permanent API errors fail the row after one call (worker/generation.py, llm.classify) --
class FixedStatus(BaseHTTPRequestHandler):
    """A real HTTP server that answers every chat completion with one status and an OpenAI body."""

    status = 400
    calls: list[str] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).calls.append(self.path)
        body = json.dumps({"error": {"message": f"refused with {self.status}", "type": "invalid_request_error",
                                     "code": None}}).encode()
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, kind", [(400, "bad_request"), (404, "not_found"), (422, "bad_request")])
def test_permanent_errors_are_sent_once(tmp_path, status, kind):
    handler = type("Handler", (FixedStatus,), {"status": status, "calls": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ctx = context(tmp_path, base_url=f"http://127.0.0.1:{server.server_port}/v1", GRIDTUNE_MAX_ATTEMPTS=3)
        sweep = new_sweep(ctx)
        outcome = run_request(ctx, sweep.id, 0)
    finally:
        server.shutdown()
        server.server_close()
    assert outcome.retry_in is None and outcome.stored
    [row] = list(store.iter_rows(ctx.engine, sweep.id))
    assert row.state == RowState.FAILED and row.error_kind == kind and f"refused with {status}" in row.error
    assert handler.calls == ["/v1/chat/completions"]  # one call: retrying cannot help
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == "running"  # and the sweep goes on


# --- §8: stored errors pass through llm.redact -------------------------------------------------
def test_stored_errors_never_carry_the_key(tmp_path):
    key = "sk-SECRETCANARY-guarantees-42"
    ctx = context(tmp_path, key=key)
    sweep = new_sweep(ctx)
    record_internal_failure(ctx, sweep.id, 1, RuntimeError(f"header Authorization: Bearer {key} rejected"))
    [row] = list(store.iter_rows(ctx.engine, sweep.id))
    assert key not in row.error and "Bearer *** rejected" in row.error


# --- §10: local training goes to the `finetune` queue (worker/app.py task_routes) ----------------
def test_local_training_is_published_to_the_finetune_queue(redis_db):
    from worker.app import app
    from worker.tasks import finetune_local

    with app.connection_for_write(redis_db) as conn:
        finetune_local.apply_async((42,), connection=conn)
    client = redis.Redis.from_url(redis_db)
    assert client.llen("gridtune") == 0
    [message] = client.lrange("finetune", 0, -1)
    message = json.loads(message)
    assert message["headers"]["task"] == "gridtune.finetune_local"
    assert json.loads(base64.b64decode(message["body"]))[0] == [42]


# --- token counts against known values -----------------------------------------------------------
def test_token_counts_match_openais_published_examples():
    """OpenAI cookbook, "How to count tokens with tiktoken": the encodings of two strings, and its
    six-message example (129 prompt tokens for gpt-4-0613 / cl100k_base, 124 for gpt-4o /
    o200k_base). The cookbook adds one token per `name` field (four here); gridtune's requests
    and training examples never carry names, so its count is four less."""
    from worker.tokens import _encoding

    assert _encoding("cl100k_base").encode_ordinary("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert _encoding("cl100k_base").encode_ordinary("Hello, world!") == [9906, 11, 1917, 0]
    assert _encoding("o200k_base").encode_ordinary("Hello, world!") == [13225, 11, 2375, 0]
    messages = [
        {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate "
                                      "jargon into plain English."},
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "system", "name": "example_assistant", "content": "Things working well together will increase "
                                                                   "revenue."},
        {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to "
                                                              "touch base on opportunities for increased leverage."},
        {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about "
                                                                   "how to do better."},
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
                                    "deliverable."},
    ]
    names = sum("name" in m for m in messages)
    assert count_messages(messages, "cl100k_base") == 129 - names
    assert count_messages(messages, "o200k_base") == 124 - names
