"""The aiohttp application: auth, chat completions with budgets and injected faults, and the
`/_stats` and `/_admin/*` endpoints that tests and benchmarks use."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import random
import time
from typing import Any

from aiohttp import web

from . import tokens
from .batches import Batches
from .budget import RateLimiter, go_duration
from gridtune.localmodel import LocalModelError, is_local_model

from .chat import ChatRequest, Reply, parse_chat_request, reply_to
from .config import ServerConfig
from .errors import Handler, RequestError, error_response, invalid_request, not_found, read_json_object, server_error
from .files import FileStore
from .finetune import FineTuning
from .inference import GenerationRequest, ModelHost
from .overload import ProcessorSharing
from .stats import ServerStats

# In-flight requests (a long latency, a hanging "timeout" fault) get this long when the server stops.
SHUTDOWN_GRACE_SECONDS = 0.5
FAULT_RETRY_AFTER_SECONDS = 1.0
# Uploads as large as a batch input file may be (200 MB), not aiohttp's default 1 MB.
MAX_BODY_BYTES = 256 * 1024 * 1024
# A 200 whose JSON stops mid-way, as a proxy cutting a response short would leave it.
MALFORMED_BODY = b'{"id": "chatcmpl-malformed", "object": "chat.completion", "choices": [{"index": 0, "message": {"ro'
MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more information on "
    "this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
)


def mask_key(key: str) -> str:
    """Enough of a key to recognise it in an error, never enough to use it."""
    if len(key) < 12:
        return "****"
    return ("sk-" if key.startswith("sk-") else "") + "..." + key[-4:]


def client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class LocalAPIServer:
    """All the server's state and its aiohttp app; runs on whichever event loop awaits start()."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.stats = ServerStats()
        self.limiter = RateLimiter(config.rpm, config.tpm, config.burst_seconds, config.limit_model)
        self.files = FileStore()
        self.fine_tuning = FineTuning(self.files, lambda: self.config)
        # Real models (an alias like smollm2-135m, a model folder, a LoRA adapter folder).
        self.models = ModelHost(config.max_batch)
        self.batches = Batches(self.files, lambda: self.config, self.complete_offline)
        self._fault_rng = random.Random(config.seed)
        self.overload: ProcessorSharing | None = None
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{client_host(self.config.host)}:{self.config.port}/v1"

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        tokens.encoding()  # load the vocabulary now rather than during the first request
        self._runner = web.AppRunner(
            self._build_app(),
            access_log=None,  # cheaper under load, and nothing about a request (or its key) gets logged
            handler_cancellation=True,  # a client that gives up ends its hanging handler
            shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, backlog=1024)
        await site.start()
        # With port 0 the OS picked one: the config now says which.
        self.config = dataclasses.replace(self.config, port=self._runner.addresses[0][1])

    async def close(self) -> None:
        self.fine_tuning.close()
        await asyncio.to_thread(self.models.close)
        self.batches.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def update(self, **fields: Any) -> ServerConfig:
        """Change settings live (ValueError for bad ones); a new budget starts when the limits change."""
        config = self.config.updated(fields)
        old = self.config
        if (config.rpm, config.tpm, config.burst_seconds, config.limit_model) != (
            old.rpm, old.tpm, old.burst_seconds, old.limit_model
        ):
            self.limiter = RateLimiter(config.rpm, config.tpm, config.burst_seconds, config.limit_model)
        if config.seed != old.seed:
            self._fault_rng = random.Random(config.seed)
        self.config = config
        return config

    def reset(self) -> None:
        """Fresh statistics and budgets, e.g. between two benchmark runs."""
        self.stats.reset()
        self.limiter = RateLimiter(self.config.rpm, self.config.tpm, self.config.burst_seconds, self.config.limit_model)
        if self.overload is not None:
            self.overload.max_in_flight = self.overload.in_flight

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.on_response_prepare.append(_add_request_id)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        for method, path, handler in self.files.routes() + self.fine_tuning.routes() + self.batches.routes():
            app.router.add_route(method, path, self._authenticated(handler))
        app.router.add_get("/_stats", self.stats_endpoint)
        app.router.add_get("/_admin/config", self.config_endpoint)
        app.router.add_post("/_admin/config", self.config_endpoint)
        app.router.add_post("/_admin/reset", self.reset_endpoint)
        # Last, so it only sees what nothing else matched (OpenAI answers wrong methods the same way).
        app.router.add_route("*", "/{tail:.*}", self.unknown_route)
        return app

    # --- auth --------------------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> str:
        """The request's API key, or a RequestError with OpenAI's 401 or insufficient_quota 429."""
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise RequestError(error_response(401, MISSING_KEY_MESSAGE, code="invalid_api_key"))
        config = self.config
        if config.api_keys and key not in config.api_keys:
            message = (
                f"Incorrect API key provided: {mask_key(key)}. "
                "You can find your API key at https://platform.openai.com/account/api-keys."
            )
            raise RequestError(error_response(401, message, code="invalid_api_key"))
        if key in config.quota_exhausted_keys:
            raise RequestError(error_response(429, QUOTA_MESSAGE, type="insufficient_quota", code="insufficient_quota"))
        return key

    def _authenticated(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                self._authenticate(request)
                return await handler(request)
            except RequestError as error:
                return error.response

        return guarded

    # --- chat completions --------------------------------------------------------------------

    def _knows_tuned_model(self, model: str) -> bool:
        if model in self.fine_tuning.tuned_models:
            return True
        return self.config.serve_unknown_tuned and model.split(":")[2:3] == ["gridtune"]

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        try:
            key = self._authenticate(request)
            chat = parse_chat_request(await read_json_object(request))
            if is_local_model(chat.model):
                generator = await self._real_model(chat.model)
            elif chat.tuned and not self._knows_tuned_model(chat.model):
                raise RequestError(
                    not_found(
                        f"The model `{chat.model}` does not exist or you do not have access to it.",
                        code="model_not_found",
                    )
                )
        except RequestError as error:
            stats.rejected += 1
            return error.response

        # Faults come before the budget: a failed request costs the client nothing.
        config = self.config
        if config.fault_rate and self._fault_rng.random() < config.fault_rate:
            kind = self._fault_rng.choice(config.faults)
            stats.faults[kind] += 1
            if kind != "timeout":
                return self._fault(kind, request, key, chat)
            await asyncio.sleep(config.hang_seconds)  # the client's timeout fires first

        generation = None
        if is_local_model(chat.model):
            # The real model's answer and token counts replace the simulated ones.
            try:
                generation = await self._generate(generator, chat)
            except RequestError as error:
                return error.response
            reply = Reply(generation.text, generation.finish_reason, generation.completion_tokens)
        else:
            reply = reply_to(chat, config.seed)
        # Like OpenAI's estimate: the prompt plus the most the reply may use (with no limit: what it uses).
        charged_tokens = chat.prompt_tokens + (chat.max_output_tokens or reply.completion_tokens)
        now = time.monotonic()
        limiter = self.limiter
        headers = None
        if limiter.enabled:
            refusal = limiter.try_spend(key, charged_tokens, now)
            headers = limiter.headers(key, now)
            if refusal is not None:
                stats.rate_limited += 1
                # Waiting cannot help a request that is larger than the limit itself.
                # and a per-second server does not say when to retry.
                retry_in = None if refusal.too_large or not refusal.says_when else refusal.wait_seconds
                return self._too_many_requests(refusal.message(chat.model), refusal.kind, retry_in, headers)
        stats.record_accepted(now, charged_tokens, chat.prompt_tokens, reply.completion_tokens)

        delay_ms = config.latency_ms
        if config.latency_jitter_ms:
            delay_ms = max(0.0, delay_ms + random.uniform(-config.latency_jitter_ms, config.latency_jitter_ms))
        if config.overload_capacity:
            await self._overload(config.overload_capacity).serve(delay_ms / 1000)
        elif delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        body = json.dumps(_completion_body(chat, reply, generation.prompt_tokens if generation else None))
        return web.Response(text=body, content_type="application/json", headers=headers)

    def _overload(self, capacity: int) -> ProcessorSharing:
        """The shared server of the overload mode (a new one when the capacity changes)."""
        if self.overload is None or self.overload.capacity != capacity:
            self.overload = ProcessorSharing(capacity)
        return self.overload

    async def _real_model(self, name: str):
        """The loaded generator for a local model name; a 404 naming the problem if it cannot load."""
        try:
            return await asyncio.to_thread(self.models.get, name)
        except LocalModelError as error:
            raise RequestError(not_found(str(error), code="model_not_found")) from None

    async def _generate(self, generator, chat: ChatRequest):
        """The real model's GenerationResult; RequestError (400) for a prompt longer than its context."""
        sampling = chat.sampling
        request = GenerationRequest(
            messages=[{"role": m["role"], "content": tokens.content_text(m.get("content"))} for m in chat.messages],
            max_tokens=chat.max_output_tokens,
            temperature=sampling.get("temperature", 1.0),
            top_p=sampling.get("top_p", 1.0),
            frequency_penalty=sampling.get("frequency_penalty", 0.0),
            presence_penalty=sampling.get("presence_penalty", 0.0),
            seed=sampling.get("seed"),
            stop=chat.stop,
        )
        try:
            future = generator.submit(request)
        except ValueError as error:
            raise RequestError(invalid_request(str(error), param="messages", code="context_length_exceeded")) from None
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            generator.abandon(future)  # the client gave up: free its row in the batch
            raise

    def complete_offline(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """One batch line's chat completion: (status, body), without budgets, faults or latency.
        Always the simulated reply: batches of real local models are not served."""
        try:
            chat = parse_chat_request(body)
        except RequestError as error:
            return error.response.status, json.loads(error.response.text)
        return 200, _completion_body(chat, reply_to(chat, self.config.seed))

    def _too_many_requests(
        self, message: str, kind: str, retry_in: float | None, headers: dict[str, str] | None
    ) -> web.Response:
        headers = dict(headers or {})
        if self.config.retry_after and retry_in is not None:
            headers["retry-after-ms"] = str(math.ceil(retry_in * 1000))
            headers["retry-after"] = str(math.ceil(retry_in))
        return error_response(429, message, type=kind, code="rate_limit_exceeded", headers=headers)

    def _fault(self, kind: str, request: web.Request, key: str, chat: ChatRequest) -> web.StreamResponse:
        if kind == "500":
            return server_error()
        if kind == "malformed":
            return web.Response(body=MALFORMED_BODY, content_type="application/json")
        if kind == "drop":
            if request.transport is not None:
                request.transport.abort()
            return web.Response()  # never sent: the connection is already gone
        # "429": a storm of refusals that the budget did not cause.
        limiter = self.limiter
        headers = limiter.headers(key, time.monotonic()) if limiter.enabled else None
        message = (
            f"Rate limit reached for {chat.model} in organization org-local on requests per min (RPM). "
            f"Please try again in {go_duration(FAULT_RETRY_AFTER_SECONDS)}."
        )
        return self._too_many_requests(message, "requests", FAULT_RETRY_AFTER_SECONDS, headers)

    # --- everything else ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Request counters, plus per real model its generator's (max_batch_seen shows batching)."""
        overload = self.overload
        return {**self.stats.snapshot(), "models": self.models.stats(),
                "overload": None if overload is None else {"capacity": overload.capacity, "in_flight": overload.in_flight,
                                                           "max_in_flight": overload.max_in_flight}}

    async def stats_endpoint(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def config_endpoint(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                self.update(**await read_json_object(request))
            except RequestError as error:
                return error.response
            except ValueError as error:
                return error_response(400, str(error))
        return web.json_response(self.config.public_dict())

    async def reset_endpoint(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response(self.stats.snapshot())

    async def unknown_route(self, request: web.Request) -> web.Response:
        return not_found(f"Invalid URL ({request.method} {request.path})")


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-request-id"] = "req_" + os.urandom(16).hex()


def _completion_body(chat: ChatRequest, reply: Reply, prompt_tokens: int | None = None) -> dict[str, Any]:
    prompt_tokens = chat.prompt_tokens if prompt_tokens is None else prompt_tokens
    return {
        "id": "chatcmpl-" + os.urandom(12).hex(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.content, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": reply.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": prompt_tokens + reply.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_localapi",
    }
