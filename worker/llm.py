"""The model API as gridtune uses it: one client per process, and what each failure means.

Retries have one owner: this layer (driven by the generation task), not the SDK. The SDK's own
`max_retries` is 0, because its sleeps would hold a worker slot, ignore the cluster-wide cool-down
and multiply with ours.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Mapping

import httpx2
import openai

from gridtune.errors import UserError
from gridtune.settings import Settings
from worker.ratelimit.durations import wait_hint_seconds

LOCAL_PLACEHOLDER_KEY = "sk-local-gridtune"
# "Service unavailable" (vLLM, Ollama and others when their queue is full) and 529 "overloaded".
OVERLOAD_STATUSES = frozenset({503, 529})


def make_client(settings: Settings) -> openai.OpenAI:
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    if not key:
        raise UserError(
            "OPENAI_API_KEY is not set: export it (or OPENAI_BASE_URL with any key for a compatible "
            "server); embedded runs without a key use the local server instead"
        )
    return openai.OpenAI(
        api_key=key,
        base_url=settings.openai_base_url,
        timeout=settings.request_timeout,
        max_retries=0,
    )


def post_chat_completion(client: openai.OpenAI, params: Mapping[str, Any]) -> httpx2.Response:
    """POST /chat/completions through the SDK's client; returns the raw response (status 2xx).

    `params` are `chat.completions.create`'s keyword arguments (`extra_body` merged into the
    body). The SDK still adds auth, base URL, timeout and headers and raises its APIStatusError /
    APITimeoutError / APIConnectionError; what this skips is `create`'s per-call type-driven
    transform of plain dicts and its response wrapper (~0.4 ms of CPU per request), since the
    body is parsed as JSON by the caller anyway.
    """
    body = {name: value for name, value in params.items() if name != "extra_body"}
    body.update(params.get("extra_body") or {})
    return client.post("/chat/completions", body=body, cast_to=httpx2.Response)


def budget_key(model: str, settings: Settings) -> str:
    """Names a shared rate budget: model + a short hash of (key, endpoint); never the key itself."""
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
    digest = hashlib.sha256(f"{key}|{settings.openai_base_url or ''}".encode()).hexdigest()[:12]
    return f"{model}:{digest}"


def redact(text: str, settings: Settings) -> str:
    """Remove the API key from a message before it is stored or logged (defence in depth)."""
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
    return text.replace(key, "***") if len(key) >= 8 else text


@dataclass(frozen=True)
class Failure:
    kind: str  # rate_limited, quota, auth, permission, bad_request, not_found, server_error, timeout, connection, malformed
    message: str
    retryable: bool
    stops_sweep: bool = False
    retry_after: float | None = None  # what the server asked for, in seconds
    # A sign that the server queues more than it can serve (a timeout, 503, 529): the shared
    # in-flight limit is cut for every worker, not just this request retried.
    overload: bool = False


def retry_after_seconds(headers: Mapping[str, str] | None, message: str = "") -> float | None:
    """The wait the server asked for, in seconds: `worker.ratelimit.wait_hint_seconds` (one parser)."""
    return wait_hint_seconds(headers, message)


def classify_status(status: int, message: str, code: str | None = None, error_type: str | None = None,
                    headers: Mapping[str, str] | None = None, prefix: str = "") -> Failure:
    """What an HTTP status (with the provider's message and error code) means for the row and sweep.

    The one mapping for every error a server names by status, whether it came as a real HTTP
    status or inside a 2xx body (`completion_problem`). `prefix` starts the stored message.
    """
    text = f"{prefix}HTTP {status}{f' {code}' if code else ''}: {message}"
    if status == 429:
        if code == "insufficient_quota" or error_type == "insufficient_quota":
            return Failure("quota", text, retryable=False, stops_sweep=True)
        return Failure("rate_limited", text, retryable=True, retry_after=retry_after_seconds(headers, message))
    if status == 401:
        return Failure("auth", text, retryable=False, stops_sweep=True)
    if status == 403:
        return Failure("permission", text, retryable=False, stops_sweep=True)
    if status == 404:
        return Failure("not_found", text, retryable=False)
    if status in (400, 422):
        return Failure("bad_request", text, retryable=False)
    # 408, 409 and 5xx are worth another try (as the SDK itself would); other 4xx are not.
    retryable = status in (408, 409) or status >= 500
    return Failure("server_error" if status >= 500 else "client_error", text, retryable,
                   retry_after=retry_after_seconds(headers, message) if retryable else None,
                   overload=status in OVERLOAD_STATUSES)


def classify(exc: BaseException) -> Failure:
    """What an exception from a chat-completion call means for the row and the sweep."""
    # Order matters: APITimeoutError is an APIConnectionError.
    if isinstance(exc, openai.APITimeoutError):
        # A timeout at a server that queues is the queue itself: retried at once, the request
        # would wait behind the answer the server is still generating for nobody.
        return Failure("timeout", "request timed out", retryable=True, overload=True)
    if isinstance(exc, openai.APIConnectionError):
        return Failure("connection", f"connection failed: {exc.__cause__ or exc}", retryable=True)
    if isinstance(exc, openai.APIStatusError):
        headers = exc.response.headers if exc.response is not None else {}
        return classify_status(exc.status_code, exc.message, getattr(exc, "code", None),
                               getattr(exc, "type", None), headers)
    if isinstance(exc, (openai.APIResponseValidationError, ValueError)):
        # A 200 whose body is not the JSON we expect: a broken proxy or server; try again.
        return Failure("malformed", f"malformed response: {exc.__class__.__name__}", retryable=True)
    return Failure("unexpected", f"{exc.__class__.__name__}: {exc}", retryable=False)


def _status_named(*candidates: Any) -> int | None:
    """The first candidate that reads as an HTTP error status (400..599), e.g. 503 or "503"."""
    for value in candidates:
        if isinstance(value, bool):
            continue
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and 400 <= value <= 599:
            return value
    return None


# Error codes some gateways put in a 2xx body without a numeric status.
_CODE_STATUS = {"rate_limit_exceeded": 429, "insufficient_quota": 429, "invalid_api_key": 401,
                "model_not_found": 404, "context_length_exceeded": 400, "invalid_request_error": 400}


def completion_problem(body: Any, headers: Mapping[str, str] | None = None) -> Failure | None:
    """Why a 2xx body is not a chat completion (None when it is one).

    An `error` object is classified like the status it names (`error.code`/`error.status`/
    `status`, or a known error code; else a retryable server error), keeping the provider's
    message. No `choices` list, or an `object` other than "chat.completion", is `malformed`
    (retryable, like a body that is not JSON).
    """
    if not isinstance(body, dict):
        return Failure("malformed", "malformed response: the body is not a JSON object", retryable=True)
    error = body.get("error")
    if error:
        details = error if isinstance(error, dict) else {"message": str(error)}
        message = str(details.get("message") or details.get("msg") or error)[:1000]
        code = details.get("code")
        status = _status_named(code, details.get("status"), details.get("status_code"), body.get("status"),
                               body.get("status_code"))
        code_text = str(code) if code is not None and not _status_named(code) else None
        if status is None:
            status = _CODE_STATUS.get(code_text or "", _CODE_STATUS.get(str(details.get("type")), 500))
        return classify_status(status, message, code_text, details.get("type"), headers,
                               prefix="a 2xx body carrying an error: ")
    kind = body.get("object")
    if kind is not None and kind != "chat.completion":
        return Failure("malformed", f"malformed response: object {str(kind)[:80]!r}, not a chat.completion",
                       retryable=True)
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return Failure("malformed", "malformed response: no choices in the completion", retryable=True)
    return None


def backoff(attempt: int, cap: float, base: float = 1.0) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    return random.uniform(0, min(cap, base * 2 ** max(0, attempt)))
