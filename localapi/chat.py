"""`/v1/chat/completions` bodies: validation with OpenAI's 400 messages, and the deterministic reply."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

from . import judge, text, tokens
from .errors import RequestError, invalid_request

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_STOP_SEQUENCES = 4
# (parameter, lowest, highest) for the sampling knobs; they only reseed the reply here.
_NUMBER_RANGES = (
    ("temperature", 0, 2),
    ("top_p", 0, 1),
    ("frequency_penalty", -2, 2),
    ("presence_penalty", -2, 2),
)


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    max_output_tokens: int | None
    stop: tuple[str, ...]
    sampling: dict[str, Any]  # temperature, top_p, penalties, seed: whatever the client sent
    prompt_tokens: int

    @property
    def tuned(self) -> bool:
        return self.model.startswith("ft:")

    def last_user_text(self) -> str:
        users = [m for m in self.messages if m["role"] == "user"] or self.messages
        return tokens.content_text(users[-1].get("content"))


@dataclass(frozen=True)
class Reply:
    content: str
    finish_reason: str
    completion_tokens: int


def _bad(message: str, param: str | None, code: str | None) -> RequestError:
    return RequestError(invalid_request(message, param=param, code=code))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_messages(messages: object) -> list[dict[str, Any]]:
    if messages is None:
        raise _bad("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise _bad("Invalid type for 'messages': expected an array.", "messages", "invalid_type")
    if not messages:
        raise _bad(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            "messages",
            "empty_array",
        )
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _bad(f"Invalid type for '{where}': expected an object.", where, "invalid_type")
        if message.get("role") not in ROLES:
            supported = ", ".join(f"'{role}'" for role in ROLES)
            raise _bad(
                f"Invalid value: {json.dumps(message.get('role'))}. Supported values are: {supported}.",
                f"{where}.role",
                "invalid_value",
            )
        content = message.get("content")
        if content is None and message["role"] != "assistant":
            param = f"{where}.content"
            raise _bad(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
        if content is not None and not isinstance(content, (str, list)):
            param = f"{where}.content"
            raise _bad(f"Invalid type for '{param}': expected a string or an array.", param, "invalid_type")
    return messages


def _parse_max_output_tokens(body: dict[str, Any]) -> int | None:
    # max_completion_tokens replaced max_tokens; both are still accepted.
    for param in ("max_completion_tokens", "max_tokens"):
        value = body.get(param)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(f"Invalid type for '{param}': expected an integer.", param, "invalid_type")
        if value < 1:
            raise _bad(
                f"Invalid '{param}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
                param,
                "integer_below_min_value",
            )
        return value
    return None


def _parse_stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_SEQUENCES:
        return tuple(s for s in stop if s)
    raise _bad(
        f"Invalid 'stop': expected a string or an array of at most {MAX_STOP_SEQUENCES} strings.",
        "stop",
        "invalid_value",
    )


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    """Validate a chat completion body; RequestError carries OpenAI's 400 for the first problem."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("you must provide a model parameter", None, None)
    messages = _parse_messages(body.get("messages"))
    # Said plainly rather than answered in a shape the client did not ask for.
    if body.get("stream"):
        raise _bad("This server does not stream: leave 'stream' unset or false.", "stream", "unsupported_value")
    if body.get("n", 1) != 1:
        raise _bad("This server returns one choice: leave 'n' unset or 1.", "n", "unsupported_value")
    sampling = {}
    for param, lowest, highest in _NUMBER_RANGES:
        value = body.get(param)
        if value is None:
            continue
        if not _is_number(value) or not lowest <= value <= highest:
            raise _bad(
                f"Invalid '{param}': expected a number between {lowest} and {highest}, but got {json.dumps(value)}.",
                param,
                "invalid_value",
            )
        sampling[param] = value
    seed = body.get("seed")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise _bad("Invalid type for 'seed': expected an integer.", "seed", "invalid_type")
        sampling["seed"] = seed
    return ChatRequest(
        model=model,
        messages=messages,
        max_output_tokens=_parse_max_output_tokens(body),
        stop=_parse_stop(body.get("stop")),
        sampling=sampling,
        prompt_tokens=tokens.count_messages(messages),
    )


def reply_to(request: ChatRequest, server_seed: int) -> Reply:
    """The same request (model, messages, sampling knobs) always gets the same reply."""
    fingerprint = json.dumps([server_seed, request.model, request.messages, request.sampling], sort_keys=True)
    rng = random.Random(hashlib.blake2b(fingerprint.encode(), digest_size=8).digest())
    # A pairwise judge's prompt gets a verdict (localapi/judge.py); everything else a description.
    content = judge.verdict(request.last_user_text()) or text.describe(request.last_user_text(), rng,
                                                                        tuned=request.tuned)

    finish_reason = "stop"
    encoded = tokens.encode(content)
    if request.max_output_tokens is not None and len(encoded) > request.max_output_tokens:
        encoded = encoded[: request.max_output_tokens]
        content = tokens.decode(encoded)
        finish_reason = "length"
    # Whichever ends the text first wins: the token limit or a stop sequence (which is not returned).
    cut = min((i for i in (content.find(s) for s in request.stop) if i >= 0), default=-1)
    if cut >= 0:
        content = content[:cut]
        encoded = tokens.encode(content)
        finish_reason = "stop"
    return Reply(content, finish_reason, len(encoded))
