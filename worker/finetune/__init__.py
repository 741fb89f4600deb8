"""The fine-tune step: a dataset -> a FinetuneJob row -> a tuned model (remote) or adapter (local).

The Celery tasks call these three functions and schedule the Step they return. None of them
raises for an API or training failure: the job row says what happened, and the sweep ends DONE.
Backends: `openai` (any provider with OpenAI's fine-tuning API), `local` (LoRA with TRL's
SFTTrainer + peft, the optional `local` extra) and `none` (stop at the dataset).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gridtune.backend_rules import dataset_problems
from gridtune.errors import UserError
from models import JobStatus, SweepState, store
from models.schema import Dataset, FinetuneJob
from worker.finetune.estimate import estimate_training, example_tokens

log = logging.getLogger(__name__)

# The error code of a job that the backend's rules refused before anything was uploaded.
REFUSED_LOCALLY = "refused_locally"


@dataclass(frozen=True)
class Step:
    """What to do next for `job_id`: poll again in `poll_in` seconds, train locally, or nothing."""

    job_id: int | None
    poll_in: float | None = None
    run_local: bool = False


def poll_interval(settings) -> float:
    # A countdown longer than the broker's visibility timeout would be delivered twice.
    return min(settings.finetune_poll_seconds, settings.max_countdown)


def submit(ctx, sweep_id: int, dataset_id: int) -> Step:
    """Start fine-tuning the sweep's dataset with the backend its config names."""
    engine = ctx.engine
    active = store.active_job(engine, sweep_id, dataset_id)
    if active is not None:
        log.info("fine-tune job %s (%s) is still %s: continuing it", active.id, active.backend, active.status)
        return next_step(ctx, active)
    config = store.sweep_config(store.get_sweep_by_id(engine, sweep_id))
    settings = config.finetune
    dataset = store.get_dataset(engine, dataset_id)
    store.set_sweep_state(engine, sweep_id, SweepState.FINETUNING)
    job = store.create_job(engine, sweep_id, dataset_id, settings.backend, settings.base_model)
    if not _check_and_estimate(ctx, job, dataset, config):
        return Step(job.id)
    if settings.backend == "none":
        store.set_status(engine, job.id, JobStatus.SKIPPED,
                         f'backend = "none": the dataset is ready at {dataset.train_path}')
        return Step(job.id)
    if settings.backend == "local":
        store.set_status(engine, job.id, JobStatus.QUEUED, "waiting for a worker on the `finetune` queue")
        return Step(job.id, run_local=True)
    from worker.finetune import openai_backend

    return openai_backend.start(ctx, store.get_job(engine, job.id))


def poll(ctx, job_id: int) -> Step:
    """Follow a remote job one step (or submit it again after a transient failure)."""
    job = store.get_job(ctx.engine, job_id)
    if job.status in JobStatus.FINAL or job.backend != "openai":
        return Step(job.id)  # a duplicate or stray poll message: nothing to do
    from worker.finetune import openai_backend

    return openai_backend.poll(ctx, job)


def train_local(ctx, job_id: int, on_event=None) -> None:
    """LoRA training on this machine; `on_event(message)` is told of each stored progress event.

    The job row ends succeeded (adapter path, train loss, validation loss before/after) or failed
    with a one-line reason; see worker.finetune.local_backend.train.
    """
    from worker.finetune import local_backend

    local_backend.train(ctx, job_id, on_event)


def next_step(ctx, job: FinetuneJob) -> Step:
    """The step that carries an unfinished job on from where it is."""
    if job.status in JobStatus.FINAL:
        return Step(job.id)
    if job.backend == "local":
        return Step(job.id, run_local=True)
    return Step(job.id, poll_in=0 if job.provider_job_id is None else poll_interval(ctx.settings))


def _check_and_estimate(ctx, job: FinetuneJob, dataset: Dataset, config) -> bool:
    """Count, check and price the training file; a dataset that cannot be used fails the job (False)."""
    engine = ctx.engine
    try:
        counts = example_tokens(dataset.train_path, dataset.encoding)
    except UserError as exc:
        store.set_status(engine, job.id, JobStatus.FAILED, error_code="dataset_unreadable",
                         error_message=f"cannot use the training file: {exc}; "
                                         "rebuild the dataset by running the sweep again")
        return False
    # The backend's rules, checked here so that nothing is uploaded that the provider would refuse.
    files = [path for path in (dataset.train_path, dataset.validation_path) if path]
    if problems := dataset_problems(config, counts, files):
        store.set_status(engine, job.id, JobStatus.FAILED, error_code=REFUSED_LOCALLY,
                         error_message=f"not submitted: {'; '.join(problems)}: {dataset.train_path}")
        return False
    estimate = estimate_training(counts, config.finetune)
    store.update_job(engine, job.id, estimated_tokens=estimate.training_tokens,
                     estimated_cost_usd=estimate.cost_usd)
    store.add_event(engine, job.id, estimate.describe(config.finetune.base_model), data=estimate.as_data())
    return True
