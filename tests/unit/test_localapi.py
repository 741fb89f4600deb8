"""localapi's chat completions, auth, rate limits, faults, admin endpoints and CLI, through the real
openai SDK against the real server."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import bpe_openai
import httpx2
import openai
import pytest

import localapi
from localapi.__main__ import build_parser, main

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "gpt-4o-mini"
PROMPT = (
    "Imagine a complete and detailed description of a 40-year-old woman fictional character who has the "
    "superpower of healing. Write out the description in one paragraph."
)
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?(ms|s))$")
ENCODING = bpe_openai.get_encoding("o200k_base")
# One connection pool for every SDK client: building a client's own costs ~0.2 s.
HTTP = httpx2.Client()


def sdk(handle, api_key="sk-test-0123456789abcdef"):
    return openai.OpenAI(base_url=handle.base_url, api_key=api_key, max_retries=0, http_client=HTTP)


def ask(client, content=PROMPT, **params):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **params)


def root_url(handle):
    return handle.base_url.removesuffix("/v1")


# --- chat completions ----------------------------------------------------------------------------


def test_reply_reflects_the_prompt_and_is_deterministic():
    with localapi.running() as server:
        client = sdk(server)
        first = ask(client, temperature=0.7)
        text = first.choices[0].message.content
        assert first.object == "chat.completion" and first.model == MODEL and first.id.startswith("chatcmpl-")
        assert first.choices[0].message.role == "assistant" and first.choices[0].finish_reason == "stop"
        for term in ("40-year-old", "woman", "healing"):
            assert term in text
        assert 60 <= len(text.split()) <= 110
        assert ask(client, temperature=0.7).choices[0].message.content == text
        assert ask(client, temperature=1.3).choices[0].message.content != text
        assert ask(client, temperature=0.7, seed=7).choices[0].message.content != text

        other = ask(client, "Describe a retired lighthouse keeper who collects meteorites.").choices[0].message.content
        assert "retired lighthouse keeper" in other and "meteorites" in other


def test_usage_counts_tokens_like_openai():
    with localapi.running() as server:
        completion = sdk(server).chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": "You write characters."}, {"role": "user", "content": PROMPT}],
        )
    expected_prompt = 3 + sum(
        3 + len(ENCODING.encode(role)) + len(ENCODING.encode(content))
        for role, content in (("system", "You write characters."), ("user", PROMPT))
    )
    usage = completion.usage
    assert usage.prompt_tokens == expected_prompt
    assert usage.completion_tokens == len(ENCODING.encode(completion.choices[0].message.content))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("limit_param", ["max_completion_tokens", "max_tokens"])
def test_output_longer_than_the_limit_is_cut_with_finish_reason_length(limit_param):
    with localapi.running() as server:
        client = sdk(server)
        full = ask(client).choices[0].message.content
        cut = ask(client, **{limit_param: 7})
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 7
    assert full.startswith(cut.choices[0].message.content) and len(cut.choices[0].message.content) < len(full)


def test_stop_sequence_ends_the_reply_before_it():
    with localapi.running() as server:
        client = sdk(server)
        full = ask(client).choices[0].message.content
        stop_word = full.split()[5]
        stopped = ask(client, stop=[stop_word, "never-there"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[: full.index(stop_word)]


def test_bad_bodies_get_openai_400s():
    with localapi.running() as server:
        client = sdk(server)
        with pytest.raises(openai.BadRequestError) as empty:
            client.chat.completions.create(model=MODEL, messages=[])
        with pytest.raises(openai.BadRequestError) as no_model:
            client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError) as bad_limit:
            ask(client, max_completion_tokens=0)
        with pytest.raises(openai.BadRequestError) as streamed:
            ask(client, stream=True)
        stats = server.stats()
    assert (empty.value.param, empty.value.code) == ("messages", "empty_array")
    assert empty.value.type == "invalid_request_error"
    assert "model" in no_model.value.message
    assert bad_limit.value.param == "max_completion_tokens"
    assert streamed.value.param == "stream"
    assert (stats["requests"], stats["rejected"], stats["accepted"]) == (4, 4, 0)


def test_unknown_fine_tuned_model_is_404_model_not_found():
    with localapi.running() as server:
        with pytest.raises(openai.NotFoundError) as missing:
            sdk(server).chat.completions.create(
                model="ft:gpt-4o-mini-2024-07-18:gridtune::abcdefgh", messages=[{"role": "user", "content": "hi"}]
            )
    assert missing.value.code == "model_not_found"


def test_unknown_route_is_an_openai_404_with_a_request_id():
    with localapi.running() as server:
        response = httpx2.get(server.base_url + "/engines", headers={"Authorization": "Bearer sk-x"})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Invalid URL (GET /v1/engines)"
    assert response.headers["x-request-id"].startswith("req_")


# --- auth ----------------------------------------------------------------------------------------


def test_missing_or_unknown_keys_are_401_and_the_key_is_never_echoed():
    secret = "sk-proj-supersecretvalue9876"
    with localapi.running(api_keys=("sk-good-key-000000",)) as server:
        with pytest.raises(openai.AuthenticationError) as unknown:
            ask(sdk(server, api_key=secret))
        missing = httpx2.post(server.base_url + "/chat/completions", json={"model": MODEL, "messages": []})
        assert ask(sdk(server, api_key="sk-good-key-000000")).choices[0].message.content
    assert unknown.value.code == "invalid_api_key"
    assert "supersecretvalue" not in unknown.value.response.text and "sk-...9876" in unknown.value.message
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"


def test_quota_exhausted_key_gets_insufficient_quota():
    with localapi.running(quota_exhausted_keys=("sk-broke-0000000000",)) as server:
        with pytest.raises(openai.RateLimitError) as broke:
            ask(sdk(server, api_key="sk-broke-0000000000"))
        assert ask(sdk(server)).choices  # other keys are fine
    assert (broke.value.code, broke.value.type) == ("insufficient_quota", "insufficient_quota")
    assert "retry-after" not in broke.value.response.headers


# --- rate limits ---------------------------------------------------------------------------------


def test_rate_limit_headers_describe_the_budget():
    with localapi.running(rpm=3000, tpm=1_000_000) as server:
        raw = sdk(server).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=500
        )
        completion = raw.parse()
    headers = raw.headers
    assert headers["x-ratelimit-limit-requests"] == "3000"
    assert headers["x-ratelimit-remaining-requests"] == "2999"
    assert headers["x-ratelimit-limit-tokens"] == "1000000"
    # Charged like OpenAI's estimate: the prompt plus the most the reply may use.
    assert int(headers["x-ratelimit-remaining-tokens"]) == 1_000_000 - completion.usage.prompt_tokens - 500
    assert GO_DURATION.match(headers["x-ratelimit-reset-requests"]) and headers["x-ratelimit-reset-requests"] == "20ms"
    assert GO_DURATION.match(headers["x-ratelimit-reset-tokens"])
    assert raw.headers["x-request-id"].startswith("req_")


def test_no_rate_limit_headers_without_limits():
    with localapi.running() as server:
        raw = sdk(server).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert not [name for name in raw.headers if name.startswith("x-ratelimit")]


def test_a_burst_beyond_the_rpm_is_refused_like_openai():
    # 60 RPM held over 1 s: 1 request at once, then one a second.
    with localapi.running(rpm=60) as server:
        client = sdk(server)
        outcomes = []
        for _ in range(4):
            try:
                ask(client, content="hi")
                outcomes.append("ok")
            except openai.RateLimitError as refused:
                outcomes.append(refused)
        stats = server.stats()
    refusals = [o for o in outcomes if o != "ok"]
    # The second comes well within the second it would take to earn it back.
    assert outcomes[0] == "ok" and outcomes[1] != "ok"
    refused = outcomes[1]
    assert (refused.code, refused.type, refused.param) == ("rate_limit_exceeded", "requests", None)
    assert re.search(
        rf"^Rate limit reached for {MODEL} in organization org-local on requests per min \(RPM\): "
        r"Limit 60, Used 1, Requested 1\. Please try again in \d+ms\.",
        refused.message.removeprefix("Error code: 429 - "),
    )
    headers = refused.response.headers
    assert 0 < int(headers["retry-after-ms"]) <= 1000 and headers["retry-after"] == "1"
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert stats["rate_limited"] == len(refusals) and stats["accepted"] == 4 - len(refusals)
    assert stats["max_requests_per_60s"] <= 60


def test_many_threads_never_get_more_than_the_limit_in_a_minute():
    rpm = 30
    with localapi.running(rpm=rpm, burst_seconds=60) as server:  # the whole minute may go at once
        client = sdk(server)
        results = []

        def burst():
            for _ in range(10):
                try:
                    results.append(ask(client, content="hi") is not None)
                except openai.RateLimitError:
                    results.append(False)

        threads = [threading.Thread(target=burst) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = server.stats()
    assert results.count(True) == rpm and stats["accepted"] == rpm
    assert stats["max_requests_per_60s"] == rpm and stats["rate_limited"] == 50 - rpm


def test_a_request_larger_than_the_tpm_is_refused_without_retry_after():
    with localapi.running(tpm=1000) as server:
        with pytest.raises(openai.RateLimitError) as too_large:
            ask(sdk(server), max_completion_tokens=2000)
    assert too_large.value.type == "tokens" and "Request too large" in too_large.value.message
    assert "retry-after" not in too_large.value.response.headers


def test_retry_after_headers_can_be_turned_off():
    with localapi.running(rpm=60, retry_after=False) as server:
        client = sdk(server)
        ask(client, content="hi")
        with pytest.raises(openai.RateLimitError) as refused:
            ask(client, content="hi")
    assert "retry-after" not in refused.value.response.headers
    assert "retry-after-ms" not in refused.value.response.headers


# --- faults --------------------------------------------------------------------------------------


def test_each_fault_kind_surfaces_as_the_sdk_error_a_real_outage_gives():
    with localapi.running(rpm=600, fault_rate=1.0, faults=("500",), hang_seconds=10) as server:
        client = sdk(server)
        with pytest.raises(openai.InternalServerError) as server_error:
            ask(client)
        assert server_error.value.type == "server_error"

        server.update(faults=("timeout",))
        with pytest.raises(openai.APITimeoutError):
            ask(client.with_options(timeout=0.3))

        server.update(faults=("drop",))
        with pytest.raises(openai.APIConnectionError) as dropped:
            ask(client)
        assert not isinstance(dropped.value, openai.APITimeoutError)

        server.update(faults=("malformed",))
        with pytest.raises(json.JSONDecodeError):
            ask(client)

        server.update(faults=("429",))
        with pytest.raises(openai.RateLimitError) as storm:
            ask(client)
        assert storm.value.code == "rate_limit_exceeded" and storm.value.response.headers["retry-after"] == "1"
        # Faults come before the budget: none of the five cost anything.
        assert storm.value.response.headers["x-ratelimit-remaining-requests"] == "600"

        stats = server.stats()
    assert stats["faults"] == {"500": 1, "timeout": 1, "drop": 1, "malformed": 1, "429": 1}
    assert stats["accepted"] == 0 and stats["rate_limited"] == 0


def test_stopping_does_not_wait_for_a_hanging_request():
    errors = []
    with localapi.running(fault_rate=1.0, faults=("timeout",), hang_seconds=60) as server:
        client = sdk(server)

        def hang():
            try:
                ask(client, content="hi")
            except openai.APIConnectionError as error:
                errors.append(error)

        caller = threading.Thread(target=hang)
        caller.start()
        deadline = time.monotonic() + 5
        while server.stats()["faults"].get("timeout") != 1:
            assert time.monotonic() < deadline, "the request never arrived"
            time.sleep(0.01)
        started = time.monotonic()
    assert time.monotonic() - started < 5, "stopping waited for the hang"
    caller.join(timeout=5)
    assert len(errors) == 1 and not isinstance(errors[0], openai.APITimeoutError)


def test_fault_draws_follow_the_seed():
    def outcomes(seed):
        with localapi.running(fault_rate=0.5, faults=("500",), seed=seed) as server:
            client = sdk(server)
            results = []
            for _ in range(20):
                try:
                    ask(client, content="hi")
                    results.append("ok")
                except openai.InternalServerError:
                    results.append("500")
            return results

    first = outcomes(seed=3)
    assert first == outcomes(seed=3)
    assert 0 < first.count("500") < 20
    assert first != outcomes(seed=4)


# --- live settings and admin endpoints -----------------------------------------------------------


def test_admin_endpoints_change_config_and_reset_stats():
    with localapi.running() as server:
        client = sdk(server)
        ask(client, content="hi")
        assert httpx2.get(root_url(server) + "/_stats").json()["accepted"] == 1

        changed = httpx2.post(root_url(server) + "/_admin/config", json={"fault_rate": 1, "faults": ["500"]})
        assert changed.status_code == 200 and changed.json()["faults"] == ["500"]
        with pytest.raises(openai.InternalServerError):
            ask(client, content="hi")

        rejected = httpx2.post(root_url(server) + "/_admin/config", json={"fault_rate": 3})
        assert rejected.status_code == 400 and "fault_rate" in rejected.json()["error"]["message"]
        assert httpx2.post(root_url(server) + "/_admin/config", json={"port": 1}).status_code == 400

        reset = httpx2.post(root_url(server) + "/_admin/reset").json()
        assert reset["requests"] == 0 and reset["faults"] == {}
        assert server.config.fault_rate == 1


def test_update_changes_latency_live_and_rejects_unknown_fields():
    with localapi.running() as server:
        client = sdk(server)
        server.update(latency_ms=300)
        started = time.monotonic()
        ask(client, content="hi")
        assert time.monotonic() - started >= 0.3
        with pytest.raises(ValueError, match="unknown config fields"):
            server.update(latnecy_ms=1)
        assert server.stats()["accepted"] == 1
        server.reset()
        assert server.stats()["accepted"] == 0


# --- CLI -----------------------------------------------------------------------------------------


def _read_line(stream, timeout):
    """The next line of `stream`, or None after `timeout` seconds."""
    line = []
    reader = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0] if line else None


def test_cli_prints_its_url_serves_and_exits_on_sigterm():
    process = subprocess.Popen(
        [sys.executable, "-m", "localapi", "--port", "0", "--rpm", "100", "--faults", "500,drop"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        line = _read_line(process.stdout, timeout=30)
        assert line is not None, process.stderr.read() if process.poll() is not None else "no output in 30 s"
        match = re.fullmatch(r"localapi listening on (http://127\.0\.0\.1:(\d+)/v1)\n", line)
        assert match, line
        client = openai.OpenAI(base_url=match[1], api_key="sk-cli", max_retries=0, http_client=HTTP)
        response = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        assert response.headers["x-ratelimit-limit-requests"] == "100"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    "flags", [["--fault-rate", "2"], ["--finetune-outcome", "maybe"], ["--faults", "500,boom"], ["--rpm", "x"]]
)
def test_cli_rejects_bad_flags_with_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(flags)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


def test_cli_has_a_flag_for_every_config_field():
    destinations = {action.dest for action in build_parser()._actions}
    assert {field.name for field in dataclasses.fields(localapi.ServerConfig)} <= destinations
    args = build_parser().parse_args(["--faults", "500,drop", "--api-keys", "a,b", "--no-retry-after", "--rpm", "9"])
    config = localapi.ServerConfig(**vars(args))
    assert (config.faults, config.api_keys, config.retry_after, config.rpm) == (("500", "drop"), ("a", "b"), False, 9)


def test_a_restarted_server_can_serve_models_tuned_by_an_earlier_run():
    model = "ft:gpt-4o-mini-2024-07-18:gridtune:heroes:abcdefgh"
    with localapi.running(serve_unknown_tuned=True) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "18, man, can eat a lot"}])
        assert reply.choices[0].message.content
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="ft:gpt-4o-mini:someone-else::x", messages=[{"role": "user", "content": "hi"}])
