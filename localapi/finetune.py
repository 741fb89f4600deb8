"""`/v1/fine_tuning/jobs`: jobs that walk OpenAI's statuses on a timer, their events, and the
`ft:` models that succeeded jobs leave behind for `/v1/chat/completions`."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import tokens
from .config import ServerConfig
from .errors import Handler, RequestError, error_response, invalid_request, not_found, read_json_object
from .files import FileStore, StoredFile

FORBIDDEN_MESSAGE = (
    "OpenAI is winding down the fine-tuning platform. Fine-tuning is not available to this organization. "
    "See https://platform.openai.com/docs/deprecations for the schedule."
)
MAX_SUFFIX_LENGTH = 64
MIN_TRAINING_EXAMPLES = 10
TRAINING_REPORTS = 5  # metrics events while running, one per step
FAIL_AT_REPORT = 3  # where finetune_outcome="fail" stops the run
MESSAGE_KEYS = frozenset({"role", "content", "name", "function_call", "weight"})
TRAINING_ROLES = ("system", "user", "assistant", "function")
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
ORGANIZATION = "org-local"
DEFAULT_PAGE_SIZE = 20
HYPERPARAMETER_RANGES = {"n_epochs": (1, 50), "batch_size": (1, 256)}


class TrainingFileError(ValueError):
    """A training file that fails OpenAI's chat-format checks; the message names the line."""


@dataclass(frozen=True)
class TrainingData:
    examples: int
    tokens: int


def _check_example(line_number: int, line: str) -> int:
    """One JSONL line's token count, or TrainingFileError saying what is wrong with it."""
    where = f"Line {line_number}"
    try:
        example = json.loads(line)
    except ValueError:
        raise TrainingFileError(f"{where}: not valid JSON.") from None
    if not isinstance(example, dict):
        raise TrainingFileError(f"{where}: each line must be a JSON object.")
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TrainingFileError(f"{where}: 'messages' must be a non-empty list.")
    for index, message in enumerate(messages, 1):
        at = f"{where}, message {index}"
        if not isinstance(message, dict):
            raise TrainingFileError(f"{at}: each message must be a JSON object.")
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            raise TrainingFileError(f"{at}: unrecognized key {unknown[0]!r}.")
        if message.get("role") not in TRAINING_ROLES:
            raise TrainingFileError(f"{at}: invalid role {message.get('role')!r}.")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise TrainingFileError(f"{at}: 'content' must be a non-empty string.")
    if not any(message["role"] == "assistant" for message in messages):
        raise TrainingFileError(f"{where}: the example has no assistant message.")
    return tokens.count_messages(messages)


def check_training_file(content: bytes, min_examples: int = MIN_TRAINING_EXAMPLES) -> TrainingData:
    """Apply OpenAI's chat-format checks to a JSONL file; count its examples and tokens."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise TrainingFileError("The file is not UTF-8 encoded.") from None
    examples = total_tokens = 0
    for line_number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            total_tokens += _check_example(line_number, line)
            examples += 1
    if examples < min_examples:
        raise TrainingFileError(f"The file has {examples} example(s), but must have at least {min_examples}.")
    return TrainingData(examples, total_tokens)


def default_epochs(examples: int) -> int:
    """OpenAI's "auto" epoch count for a file of `examples` examples."""
    if 3 * examples < 100:
        return min(25, 100 // examples)
    if 3 * examples > 25_000:
        return max(1, 25_000 // examples)
    return 3


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


@dataclass
class Event:
    level: str
    message: str
    type: str = "message"
    data: dict[str, Any] | None = None
    id: str = field(default_factory=lambda: _new_id("ftevent-"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "object": "fine_tuning.job.event",
            "created_at": self.created_at,
            "level": self.level,
            "message": self.message,
            "type": self.type,
            "data": self.data or {},
        }


@dataclass
class Job:
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    hyperparameters: dict[str, Any]
    outcome: str  # the server's finetune_outcome when the job was created
    id: str = field(default_factory=lambda: _new_id("ftjob-"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "validating_files"
    finished_at: int | None = None
    estimated_finish: int | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    result_files: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list)  # oldest first

    def log(self, message: str, level: str = "info", **metrics: Any) -> None:
        self.events.append(Event(level, message, "metrics" if metrics else "message", metrics or None))

    def finish(self, status: str) -> None:
        self.status = status
        self.finished_at = int(time.time())
        self.estimated_finish = None

    def fail(self, code: str, message: str, param: str | None = None) -> None:
        self.error = {"code": code, "message": message, "param": param}
        self.finish("failed")
        self.log(message, level="error")

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "object": "fine_tuning.job",
            "model": self.model,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "fine_tuned_model": self.fine_tuned_model,
            "organization_id": ORGANIZATION,
            "result_files": self.result_files,
            "status": self.status,
            "validation_file": self.validation_file,
            "training_file": self.training_file,
            "hyperparameters": self.hyperparameters,
            "method": {"type": "supervised", "supervised": {"hyperparameters": self.hyperparameters}},
            "trained_tokens": self.trained_tokens,
            "error": self.error,
            "seed": self.seed,
            "estimated_finish": self.estimated_finish,
            "user_provided_suffix": self.suffix,
            "integrations": [],
            "metadata": None,
        }


def _bad(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(invalid_request(message, param=param, code=code))


def _parse_hyperparameters(body: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters from `method` or the deprecated top-level `hyperparameters`; unset ones are "auto"."""
    requested = dict(body.get("hyperparameters") or {})
    method = body.get("method")
    if method is not None:
        if not isinstance(method, dict) or method.get("type") != "supervised":
            raise _bad("Only method type 'supervised' is supported by this server.", "method.type", "invalid_value")
        requested.update((method.get("supervised") or {}).get("hyperparameters") or {})
    resolved: dict[str, Any] = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    for name, value in requested.items():
        if name not in resolved:
            raise _bad(f"Unknown hyperparameter: '{name}'.", f"hyperparameters.{name}", "invalid_value")
        if value == "auto":
            continue
        if name in HYPERPARAMETER_RANGES:
            lowest, highest = HYPERPARAMETER_RANGES[name]
            valid = isinstance(value, int) and not isinstance(value, bool) and lowest <= value <= highest
        else:
            valid = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if not valid:
            param = f"hyperparameters.{name}"
            raise _bad(f"Invalid value for hyperparameter '{name}': {value!r}.", param, "invalid_value")
        resolved[name] = value
    return resolved


def _page(items: list, after: str | None, limit_text: str | None, key: Callable[[Any], str]) -> tuple[list, bool]:
    """OpenAI's cursor paging over `items` (newest first): the ones after id `after`, at most `limit`."""
    try:
        limit = int(limit_text) if limit_text is not None else DEFAULT_PAGE_SIZE
    except ValueError:
        raise _bad("Invalid 'limit': expected an integer.", "limit", "invalid_type") from None
    if after is not None:
        ids = [key(item) for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return items[:limit], len(items) > limit


class FineTuning:
    """The jobs, their timers, and the tuned models they produced."""

    def __init__(self, files: FileStore, config: Callable[[], ServerConfig]):
        self._files = files
        self._config = config
        self._jobs: dict[str, Job] = {}
        self._runs: dict[str, asyncio.Task] = {}  # job id -> the task moving it along
        self.tuned_models: set[str] = set()

    def close(self) -> None:
        for run in self._runs.values():
            run.cancel()

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            message = f"No such fine-tuning job: {job_id}"
            raise RequestError(not_found(message, param="fine_tune_id", code="fine_tune_not_found"))
        return job

    def _training_file(self, file_id: object, param: str) -> str:
        stored = self._files.find(file_id) if isinstance(file_id, str) else None
        if stored is None:
            raise _bad(f"invalid {param}: {file_id}", param)
        if stored.purpose != "fine-tune":
            raise _bad(f"File {file_id} has purpose '{stored.purpose}'; fine-tuning needs 'fine-tune'.", param)
        return stored.id

    # --- the timer that moves a job along ----------------------------------------------------

    async def _step(self) -> None:
        await asyncio.sleep(self._config().finetune_step_seconds)

    def _load(self, file_id: str, min_examples: int) -> TrainingData:
        stored = self._files.find(file_id)
        if stored is None:
            raise TrainingFileError(f"File {file_id} was deleted before it could be validated.")
        return check_training_file(stored.content, min_examples)

    async def _run(self, job: Job) -> None:
        """validating_files -> queued -> running -> succeeded | failed, one status per step."""
        await self._step()
        data = self._validate(job)
        if data is None:
            return
        await self._step()
        job.status = "running"
        job.estimated_finish = int(time.time() + (TRAINING_REPORTS + 1) * self._config().finetune_step_seconds)
        job.log("Fine-tuning job started")
        metrics_csv = await self._train(job, data)
        if metrics_csv is not None:
            self._succeed(job, data, metrics_csv)

    def _validate(self, job: Job) -> TrainingData | None:
        """The training file's size, with the job queued; None (the job failed) for a bad file."""
        try:
            data = self._load(job.training_file, MIN_TRAINING_EXAMPLES)
            if job.validation_file:
                self._load(job.validation_file, min_examples=1)
        except TrainingFileError as problem:
            message = f"The job failed due to an invalid training file. {problem}"
            job.fail("invalid_training_file", message, "training_file")
            return None
        hyper = job.hyperparameters
        if hyper["n_epochs"] == "auto":
            hyper["n_epochs"] = default_epochs(data.examples)
        if hyper["batch_size"] == "auto":
            hyper["batch_size"] = max(1, min(256, data.examples // 500))
        if hyper["learning_rate_multiplier"] == "auto":
            hyper["learning_rate_multiplier"] = 1.8
        job.status = "queued"
        job.log("Files validated, moving job to queued state")
        return data

    async def _train(self, job: Job, data: TrainingData) -> str | None:
        """Report progress with a falling loss; the metrics as CSV, or None if the run failed."""
        hyper = job.hyperparameters
        total_steps = hyper["n_epochs"] * -(-data.examples // hyper["batch_size"])
        rng = random.Random(job.seed)
        loss = rng.uniform(1.8, 2.6)
        metrics_csv = "step,train_loss,train_mean_token_accuracy\n"
        for report in range(1, TRAINING_REPORTS + 1):
            await self._step()
            if job.outcome == "fail" and report == FAIL_AT_REPORT:
                job.fail("internal_error", "Fine-tuning failed due to an internal error (simulated by localapi).")
                return None
            step = max(1, total_steps * report // TRAINING_REPORTS)
            loss *= rng.uniform(0.55, 0.8)  # strictly decreasing
            accuracy = round(min(0.99, 0.5 + 0.1 * report + rng.uniform(0, 0.05)), 3)
            job.log(
                f"Step {step}/{total_steps}: training loss={loss:.2f}",
                step=step,
                train_loss=round(loss, 4),
                train_mean_token_accuracy=accuracy,
                total_steps=total_steps,
            )
            metrics_csv += f"{step},{loss:.4f},{accuracy}\n"
        job.log(f"Checkpoint created at step {total_steps}")
        return metrics_csv

    def _succeed(self, job: Job, data: TrainingData, metrics_csv: str) -> None:
        base = job.model.split(":")[1] if job.model.startswith("ft:") else job.model
        job.fine_tuned_model = f"ft:{base}:gridtune:{job.suffix or ''}:{job.id.removeprefix('ftjob-')[:8]}"
        job.trained_tokens = job.hyperparameters["n_epochs"] * data.tokens
        results = self._files.add(StoredFile("step_metrics.csv", "fine-tune-results", metrics_csv.encode()))
        job.result_files = [results.id]
        self.tuned_models.add(job.fine_tuned_model)
        job.log(f"New fine-tuned model created: {job.fine_tuned_model}")
        job.finish("succeeded")
        job.log("The job has successfully completed")

    # --- HTTP handlers -----------------------------------------------------------------------

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", "/v1/fine_tuning/jobs", self.create),
            ("GET", "/v1/fine_tuning/jobs", self.list_jobs),
            ("GET", "/v1/fine_tuning/jobs/{job_id}", self.retrieve),
            ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel", self.cancel),
            ("GET", "/v1/fine_tuning/jobs/{job_id}/events", self.list_events),
        ]

    async def create(self, request: web.Request) -> web.Response:
        config = self._config()
        if config.finetune_outcome == "forbidden":
            return error_response(403, FORBIDDEN_MESSAGE, code="training_not_available")
        body = await read_json_object(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad("Missing required parameter: 'model'.", "model", "missing_required_parameter")
        if "training_file" not in body:
            raise _bad("Missing required parameter: 'training_file'.", "training_file", "missing_required_parameter")
        training_file = self._training_file(body["training_file"], "training_file")
        validation_file = body.get("validation_file")
        if validation_file is not None:
            validation_file = self._training_file(validation_file, "validation_file")
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or len(suffix) > MAX_SUFFIX_LENGTH):
            length = len(suffix) if isinstance(suffix, str) else "?"
            raise _bad(
                f"Invalid 'suffix': string too long. Expected a string with maximum length {MAX_SUFFIX_LENGTH}, "
                f"but got a string with length {length} instead.",
                "suffix",
                "string_above_max_length",
            )
        seed = body.get("seed")
        if seed is None:
            seed = random.randrange(2**31)
        elif not isinstance(seed, int) or isinstance(seed, bool):
            raise _bad("Invalid type for 'seed': expected an integer.", "seed", "invalid_type")

        job = Job(
            model=model,
            training_file=training_file,
            validation_file=validation_file,
            suffix=suffix or None,
            seed=seed,
            hyperparameters=_parse_hyperparameters(body),
            outcome=config.finetune_outcome,
        )
        self._jobs[job.id] = job
        job.log(f"Created fine-tuning job: {job.id}")
        validating = f"Validating training file: {training_file}"
        if validation_file:
            validating += f" and validation file: {validation_file}"
        job.log(validating)
        self._runs[job.id] = asyncio.create_task(self._run(job))
        self._runs[job.id].add_done_callback(lambda _: self._runs.pop(job.id, None))
        return web.json_response(job.to_json())

    async def retrieve(self, request: web.Request) -> web.Response:
        return web.json_response(self._job(request.match_info["job_id"]).to_json())

    async def list_jobs(self, request: web.Request) -> web.Response:
        newest_first = list(reversed(self._jobs.values()))
        jobs, has_more = _page(newest_first, request.query.get("after"), request.query.get("limit"), lambda j: j.id)
        return web.json_response({"object": "list", "data": [j.to_json() for j in jobs], "has_more": has_more})

    async def list_events(self, request: web.Request) -> web.Response:
        job = self._job(request.match_info["job_id"])
        newest_first = list(reversed(job.events))
        events, has_more = _page(newest_first, request.query.get("after"), request.query.get("limit"), lambda e: e.id)
        return web.json_response({"object": "list", "data": [e.to_json() for e in events], "has_more": has_more})

    async def cancel(self, request: web.Request) -> web.Response:
        job = self._job(request.match_info["job_id"])
        if job.status in FINISHED:
            raise _bad(f"Job {job.id} has already finished with status '{job.status}' and cannot be cancelled.")
        run = self._runs.get(job.id)
        if run is not None:
            run.cancel()
        job.finish("cancelled")
        job.log("Fine-tuning job cancelled")
        return web.json_response(job.to_json())
