"""The model API as gridtune uses it: one client per process, and what each failure means.

Retries have one owner: this layer (driven by the generation task), not the SDK. The SDK's own
`max_retries` is 0, because its sleeps would hold a worker slot, ignore the cluster-wide cool-down
and multiply with ours.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone
from typing import Mapping

import openai

from gridtune.errors import UserError
from gridtune.settings import Settings

LOCAL_PLACEHOLDER_KEY = "sk-local-gridtune"


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


_TRY_AGAIN = re.compile(r"try again in (\d+(?:\.\d+)?)(ms|s)\b", re.IGNORECASE)


def retry_after_seconds(headers: Mapping[str, str] | None, message: str = "") -> float | None:
    """retry-after-ms, else retry-after (seconds or an HTTP date), else "try again in 6.596s"."""
    headers = headers or {}
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
    except ValueError:
        pass
    if (value := headers.get("retry-after")) is not None:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = parsedate_to_datetime(value)
                return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
            except (TypeError, ValueError):
                pass
    if match := _TRY_AGAIN.search(message):
        amount = float(match.group(1))
        return amount / 1000 if match.group(2).lower() == "ms" else amount
    return None


def _short(exc: openai.APIStatusError) -> str:
    code = f" {exc.code}" if getattr(exc, "code", None) else ""
    return f"HTTP {exc.status_code}{code}: {exc.message}"


def classify(exc: BaseException) -> Failure:
    """What an exception from a chat-completion call means for the row and the sweep."""
    # Order matters: APITimeoutError is an APIConnectionError.
    if isinstance(exc, openai.APITimeoutError):
        return Failure("timeout", "request timed out", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        return Failure("connection", f"connection failed: {exc.__cause__ or exc}", retryable=True)
    if isinstance(exc, openai.RateLimitError):
        if exc.code == "insufficient_quota" or getattr(exc, "type", None) == "insufficient_quota":
            return Failure("quota", _short(exc), retryable=False, stops_sweep=True)
        headers = exc.response.headers if exc.response is not None else {}
        return Failure("rate_limited", _short(exc), retryable=True,
                       retry_after=retry_after_seconds(headers, exc.message))
    if isinstance(exc, openai.AuthenticationError):
        return Failure("auth", _short(exc), retryable=False, stops_sweep=True)
    if isinstance(exc, openai.PermissionDeniedError):
        return Failure("permission", _short(exc), retryable=False, stops_sweep=True)
    if isinstance(exc, openai.NotFoundError):
        return Failure("not_found", _short(exc), retryable=False)
    if isinstance(exc, (openai.BadRequestError, openai.UnprocessableEntityError)):
        return Failure("bad_request", _short(exc), retryable=False)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        # 408, 409 and 5xx are worth another try (as the SDK itself would); other 4xx are not.
        retryable = status in (408, 409) or status >= 500
        headers = exc.response.headers if exc.response is not None else {}
        return Failure("server_error" if status >= 500 else "client_error", _short(exc), retryable,
                       retry_after=retry_after_seconds(headers) if retryable else None)
    if isinstance(exc, (openai.APIResponseValidationError, ValueError)):
        # A 200 whose body is not the JSON we expect: a broken proxy or server; try again.
        return Failure("malformed", f"malformed response: {exc.__class__.__name__}", retryable=True)
    return Failure("unexpected", f"{exc.__class__.__name__}: {exc}", retryable=False)


def backoff(attempt: int, cap: float, base: float = 1.0) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    return random.uniform(0, min(cap, base * 2 ** max(0, attempt)))
