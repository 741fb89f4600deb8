"""`/v1/batches`: OpenAI's Batch API on a timer, with output and error files.

A batch reads its `purpose="batch"` input file (one `{"custom_id", "method", "url", "body"}` line
per request, one model, at most MAX_REQUESTS lines), walks validating -> in_progress ->
finalizing -> completed over `batch_seconds`, and leaves an output file (successes) and an error
file (failed lines), each line `{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}`, in an order that is NOT the input's. Settings (ServerConfig):
`batch_seconds`, `batch_failure_rate` (lines that fail with a 500), `batch_completion_fraction`
(below 1: the batch expires with that share of its lines done; the rest are `batch_expired`
errors). Cancel gives cancelling -> cancelled with what was done so far.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .config import ServerConfig
from .errors import Handler, RequestError, invalid_request, not_found, read_json_object
from .files import FileStore, StoredFile

MAX_REQUESTS = 50_000
ENDPOINTS = ("/v1/chat/completions",)
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
DEFAULT_PAGE_SIZE = 20
# One line's outcome: (status code, response body).
Complete = Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]


@dataclass
class Batch:
    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    id: str = field(default_factory=lambda: "batch_" + uuid.uuid4().hex[:24])
    status: str = "validating"
    created_at: int = field(default_factory=lambda: int(time.time()))
    times: dict[str, int] = field(default_factory=dict)  # in_progress_at, completed_at, ...
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    cancel_requested: bool = False

    def move(self, status: str) -> None:
        self.status = status
        self.times[f"{status}_at"] = int(time.time())

    def to_json(self) -> dict[str, Any]:
        body = {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "input_file_id": self.input_file_id,
            "completion_window": "24h", "status": self.status, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, "created_at": self.created_at,
            "expires_at": self.created_at + 24 * 3600,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }
        for name in ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"):
            body[f"{name}_at"] = self.times.get(f"{name}_at")
        return body


def _line_error(line: int, code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


def parse_input(content: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(requests, validation errors) of an input file, checked as OpenAI checks it."""
    requests, errors, seen, models = [], [], set(), set()
    for number, raw in enumerate(content.decode("utf-8", "replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            errors.append(_line_error(number, "invalid_json_line", "This line is not parseable as valid JSON."))
            continue
        if not isinstance(line, dict) or not isinstance(line.get("body"), dict):
            errors.append(_line_error(number, "invalid_request", "Each line needs an object 'body'."))
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            errors.append(_line_error(number, "missing_required_parameter", "Missing 'custom_id'."))
            continue
        if custom_id in seen:
            errors.append(_line_error(number, "duplicate_custom_id",
                                      "The custom_id for this request is a duplicate of another request."))
            continue
        if line.get("method") != "POST" or line.get("url") not in ENDPOINTS:
            errors.append(_line_error(number, "invalid_url", "The URL provided for this request does not match "
                                                             "the batch endpoint."))
            continue
        seen.add(custom_id)
        models.add(line["body"].get("model"))
        requests.append(line)
    if len(models) > 1:
        errors.append(_line_error(None, "mismatched_model", "The batch input file contains requests for more "
                                                            "than one model."))
    if len(requests) > MAX_REQUESTS:
        errors.append(_line_error(None, "too_many_requests", f"A batch may hold at most {MAX_REQUESTS} requests."))
    if not requests and not errors:
        errors.append(_line_error(None, "empty_file", "The batch input file is empty."))
    return requests, errors


class Batches:
    def __init__(self, files: FileStore, config: Callable[[], ServerConfig], complete: Complete):
        self.files = files
        self._config = config
        self._complete = complete
        self._batches: dict[str, Batch] = {}
        self._runs: dict[str, asyncio.Task] = {}

    def close(self) -> None:
        for run in self._runs.values():
            run.cancel()

    def _batch(self, batch_id: str) -> Batch:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise RequestError(not_found(f"No batch found with id '{batch_id}'.", param="batch_id"))
        return batch

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", "/v1/batches", self.create),
            ("GET", "/v1/batches", self.list_batches),
            ("GET", "/v1/batches/{batch_id}", self.retrieve),
            ("POST", "/v1/batches/{batch_id}/cancel", self.cancel),
        ]

    # --- the run -----------------------------------------------------------------------------

    async def _run(self, batch: Batch, content: bytes) -> None:
        config = self._config()
        step = config.batch_seconds / 3
        await asyncio.sleep(step)
        requests, errors = parse_input(content)
        if errors:
            batch.errors = errors[:1000]
            batch.move("failed")
            return
        batch.total = len(requests)
        if not batch.cancel_requested:
            batch.move("in_progress")
            await asyncio.sleep(step)
        rng = random.Random(f"{config.seed}:{batch.id}")
        done = round(len(requests) * config.batch_completion_fraction) if not batch.cancel_requested else 0
        outputs, failures = await asyncio.to_thread(self._process, requests, done, config.batch_failure_rate, rng,
                                                    "batch_cancelled" if batch.cancel_requested else "batch_expired")
        batch.move("finalizing" if not batch.cancel_requested else "cancelling")
        await asyncio.sleep(step)
        batch.completed = len(outputs)
        batch.failed = len(failures)
        if outputs:
            batch.output_file_id = self._write(f"{batch.id}_output.jsonl", outputs)
        if failures:
            batch.error_file_id = self._write(f"{batch.id}_error.jsonl", failures)
        if batch.cancel_requested:
            batch.move("cancelled")
        else:
            batch.move("completed" if done == len(requests) else "expired")

    def _process(self, requests: list[dict[str, Any]], done: int, failure_rate: float, rng: random.Random,
                 unfinished_code: str) -> tuple[list[str], list[str]]:
        outputs, failures = [], []
        for position, line in enumerate(requests):
            result: dict[str, Any] = {"id": "batch_req_" + os.urandom(12).hex(), "custom_id": line["custom_id"],
                                      "response": None, "error": None}
            if position >= done:
                result["error"] = {"code": unfinished_code, "message": (
                    "This request could not be executed before the completion window expired."
                    if unfinished_code == "batch_expired" else "This request was cancelled.")}
                failures.append(json.dumps(result))
                continue
            if failure_rate and rng.random() < failure_rate:
                status, body = 500, {"error": {"message": "The server had an error while processing your request.",
                                               "type": "server_error", "param": None, "code": None}}
            else:
                status, body = self._complete(line["body"])
            result["response"] = {"status_code": status, "request_id": "req_" + os.urandom(12).hex(), "body": body}
            (outputs if status == 200 else failures).append(json.dumps(result))
        rng.shuffle(outputs)  # the output's order is not the input's
        return outputs, failures

    def _write(self, filename: str, lines: list[str]) -> str:
        content = ("\n".join(lines) + "\n").encode()
        return self.files.add(StoredFile(filename=filename, purpose="batch_output", content=content)).id

    # --- HTTP handlers -----------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise RequestError(invalid_request("Missing required parameter: 'input_file_id'.", param="input_file_id"))
        stored = self.files.get(file_id)
        if stored.purpose != "batch":
            raise RequestError(invalid_request(f"File {file_id} has purpose {stored.purpose!r}; a batch needs "
                                               "purpose 'batch'.", param="input_file_id"))
        if body.get("endpoint") not in ENDPOINTS:
            raise RequestError(invalid_request(f"Invalid endpoint {body.get('endpoint')!r}.", param="endpoint"))
        if body.get("completion_window") != "24h":
            raise RequestError(invalid_request("completion_window must be '24h'.", param="completion_window"))
        metadata = body.get("metadata")
        batch = Batch(input_file_id=file_id, endpoint=body["endpoint"],
                      metadata=metadata if isinstance(metadata, dict) else None)
        self._batches[batch.id] = batch
        self._runs[batch.id] = asyncio.create_task(self._run(batch, stored.content))
        return web.json_response(batch.to_json())

    async def retrieve(self, request: web.Request) -> web.Response:
        return web.json_response(self._batch(request.match_info["batch_id"]).to_json())

    async def list_batches(self, request: web.Request) -> web.Response:
        batches = list(reversed(self._batches.values()))
        after = request.query.get("after")
        if after:
            ids = [b.id for b in batches]
            batches = batches[ids.index(after) + 1:] if after in ids else []
        try:
            limit = max(1, min(100, int(request.query.get("limit", DEFAULT_PAGE_SIZE))))
        except ValueError:
            raise RequestError(invalid_request("limit must be an integer.", param="limit")) from None
        page = batches[:limit]
        return web.json_response({"object": "list", "data": [b.to_json() for b in page],
                                  "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                                  "has_more": len(batches) > limit})

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self._batch(request.match_info["batch_id"])
        if batch.status in FINAL:
            raise RequestError(invalid_request(f"Cannot cancel a batch with status {batch.status!r}."))
        batch.cancel_requested = True
        if batch.status in ("validating", "in_progress"):
            batch.move("cancelling")
        return web.json_response(batch.to_json())
