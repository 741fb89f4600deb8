"""Error responses shaped like OpenAI's, `{"error": {"message", "type", "param", "code"}}`, and the
request plumbing that raises them from deep inside a handler."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> web.Response:
    return error_response(400, message, param=param, code=code)


def not_found(message: str, *, param: str | None = None, code: str | None = None) -> web.Response:
    return error_response(404, message, param=param, code=code)


def server_error() -> web.Response:
    return error_response(
        500,
        "The server had an error while processing your request. Sorry about that!",
        type="server_error",
    )


class RequestError(Exception):
    """Raised deep inside request handling; the handler turns it into `response`."""

    def __init__(self, response: web.Response):
        super().__init__(response.text)
        self.response = response


async def read_json_object(request: web.Request) -> dict:
    """The request's JSON body, which must be an object (else a RequestError with OpenAI's 400)."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise RequestError(
            invalid_request(
                "We could not parse the JSON body of your request. The OpenAI API expects a JSON object "
                "payload, but what was sent was not valid JSON."
            )
        )
    return body
