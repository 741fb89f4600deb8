"""Sampling a sweep's tuned model: the remote `fine_tuned_model` or the local LoRA adapter."""

from __future__ import annotations

import openai

from gridtune.errors import UserError
from gridtune.sweep import SweepConfig
from models import JobStatus, store
from models.schema import FinetuneJob, Sweep
from worker.dataset import prompt_messages, prompt_stop
from worker.llm import classify, redact

ASK_RETRIES = 2  # one interactive call: let the SDK ride out a blip


def ask_messages(config: SweepConfig, text: str) -> list[dict[str, str]]:
    """The messages training used, with `text` as the user's turn (worker.dataset's one definition)."""
    return prompt_messages(config, text)


def stop_word(config: SweepConfig) -> str | None:
    """The stop sequence training taught (worker.dataset.prompt_stop): none for the chat format."""
    stops = prompt_stop(config)
    return stops[0] if stops else None


def finished_job(engine, sweep: Sweep) -> FinetuneJob:
    """The sweep's latest job if it produced a model; else a UserError that says why not."""
    job = store.latest_job(engine, sweep.id)
    name = sweep.name
    if job is None:
        raise UserError(f"sweep {name} has no fine-tune job yet (state {sweep.state}): "
                        f"run `python -m producer finetune {name}` once its dataset is ready")
    if job.status == JobStatus.SUCCEEDED:
        return job
    if job.status == JobStatus.SKIPPED:
        raise UserError(f'sweep {name} was not fine-tuned (backend = "none"): set finetune.backend in its '
                        f"config and run `python -m producer finetune {name}`")
    if job.status == JobStatus.UNAVAILABLE:
        raise UserError(f"sweep {name} has no tuned model: {job.error_message}")
    if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise UserError(f"the fine-tune job {job.id} of sweep {name} {job.status}: "
                        f"{job.error_message or 'no reason given'}")
    raise UserError(f"the fine-tune job {job.id} of sweep {name} is still running: status {job.status}; "
                    "follow it with `python -m producer jobs`")


def example_input(config: SweepConfig) -> str:
    """What to ask a sweep's tuned model for a first look: [ask] example, else request 0's input."""
    if config.ask.example:
        return config.ask.example
    from gridtune.sweep import request_at

    return request_at(config, 0).input_text


def sample(ctx, sweep: Sweep, job: FinetuneJob, text: str) -> str:
    """The tuned model's reply to `text` (job: from finished_job); UserError when it cannot answer.

    Remote models and local adapters alike go through the chat completions API: an adapter's
    folder is a model name gridtune's local server loads (see localapi/inference.py).
    """
    config = store.sweep_config(sweep)
    return _ask_remote(ctx, job.fine_tuned_model, config, ask_messages(config, text))


def _ask_remote(ctx, model: str, config: SweepConfig, messages: list[dict[str, str]]) -> str:
    request = {
        "model": model,
        "messages": messages,
        "temperature": config.ask.temperature,
        config.model.token_param: config.ask.max_output_tokens,
    }
    if stop := stop_word(config):
        request["stop"] = [stop]
    try:
        response = ctx.client.with_options(max_retries=ASK_RETRIES).chat.completions.create(**request)
    except openai.OpenAIError as exc:
        raise UserError(redact(f"asking {model}: {classify(exc).message}", ctx.settings)) from None
    return (response.choices[0].message.content or "").strip()
