"""Supervised LoRA fine-tuning on this machine: TRL's SFTTrainer + peft.

Who does what: `gridtune.localmodel` turns the configured base model (an alias such as
`smollm2-135m`, or a folder) into a Hugging Face folder; `datasets` holds the JSONL examples in
memory; TRL's SFTTrainer tokenizes them with the tokenizer's chat template, masks the prompt so
the loss covers the assistant's reply only, and runs the transformers Trainer loop; peft's LoRA
is what it trains. gridtune keeps the job row: the plan, step/loss events, heartbeats, the
validation loss before and after, and the adapter folder (which localapi serves by its path).

torch, transformers, peft, trl and datasets are the optional `local` extra: they are imported
inside these functions only, so the rest of gridtune runs without them. A missing extra, model
package or folder is a LocalModelError: one line saying what to install or fix.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gridtune import localmodel
from gridtune.localmodel import LocalModelError
from gridtune.sweep import FinetuneSettings
from models import JobStatus, store

log = logging.getLogger(__name__)

LOCAL_AUTO_EPOCHS = 3
LOCAL_AUTO_BATCH = 8
HEARTBEAT_SECONDS = 30.0
# A running job whose trainer has been silent this long is taken as dead and may be trained again.
STALE_AFTER_SECONDS = 600.0
MAX_LOGGED_STEPS = 200
# Validation passes during training (besides before and after): the report's validation curve.
VALIDATIONS_DURING_TRAINING = 3
EVAL_BATCH = 8
# trl needs datasets; both are imported here directly.
TRAINING_MODULES = (*localmodel.TRAINING_STACK, "datasets")


def _training_stack():
    localmodel.require_modules(TRAINING_MODULES)  # one line naming the `local` extra
    import datasets
    import peft
    import torch
    import transformers
    import trl

    transformers.utils.logging.disable_progress_bar()  # progress is in the job's events, not on stderr
    datasets.disable_progress_bars()
    return torch, transformers, peft, trl, datasets


def check_ready(base_model: str, cache_dir: Path | None = None) -> None:
    """Before training in this process: the `local` extra is installed and `base_model` resolves.

    Imports nothing heavy; an alias not yet converted is converted now (about 20 s, once; training
    would do it anyway). Raises LocalModelError (one line, exit 2) naming what to install or fix.
    """
    localmodel.require_modules(TRAINING_MODULES)
    _base_folder(base_model, cache_dir)


def _device(torch) -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- examples -------------------------------------------------------------------------------
def prompt_completion(messages: list[dict[str, str]]) -> dict[str, Any]:
    """One chat example as TRL's conversational prompt-completion record.

    {"prompt": [the messages before the reply], "completion": [the assistant's reply]}: TRL
    renders both with the tokenizer's chat template (which closes the turn, so the model learns
    to stop) and leaves the prompt's tokens out of the loss.
    """
    return {"prompt": messages[:-1], "completion": [messages[-1]]}


def read_examples(path: str) -> list[dict[str, Any]]:
    """The training (or validation) JSONL file as prompt-completion records."""
    with open(path, encoding="utf-8") as lines:
        return [prompt_completion(json.loads(line)["messages"]) for line in lines if line.strip()]


# --- training -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How long to train: epochs, examples per step and optimizer steps in all."""

    epochs: int
    batch_size: int
    total_steps: int

    @classmethod
    def of(cls, settings: FinetuneSettings, examples: int) -> Plan:
        epochs = LOCAL_AUTO_EPOCHS if settings.n_epochs == "auto" else settings.n_epochs
        batch_size = LOCAL_AUTO_BATCH if settings.batch_size == "auto" else settings.batch_size
        steps_per_epoch = math.ceil(examples / batch_size)
        total = epochs * steps_per_epoch
        if settings.max_steps is not None and settings.max_steps < total:
            # max_steps caps the run: fewer epochs, the last one perhaps cut short.
            total = settings.max_steps
            epochs = math.ceil(total / steps_per_epoch)
        return cls(epochs, batch_size, total)


@dataclass
class Outcome:
    """What a finished run reports; losses are mean token cross-entropy (nats) over reply tokens."""

    trained_tokens: int | None = None
    train_loss: float | None = None
    validation_loss_before: float | None = None
    validation_loss_after: float | None = None


def train(ctx, job_id: int, on_event: Callable[[str], None] | None = None) -> None:
    """Train the job's adapter; every outcome ends up on the job row (this never raises, but for ^C)."""
    engine = ctx.engine
    if not store.claim_local(engine, job_id, STALE_AFTER_SECONDS):
        job = store.get_job(engine, job_id)
        log.info("local fine-tune job %s is %s: not training it here", job_id, job.status)
        return
    job = store.get_job(engine, job_id)
    sweep = store.get_sweep_by_id(engine, job.sweep_id)
    settings = store.sweep_config(sweep).finetune
    dataset = store.get_dataset(engine, job.dataset_id)
    adapter_dir = (ctx.settings.data_dir / sweep.name / "adapter").resolve()

    def event(message: str, **data: Any) -> None:
        store.add_event(engine, job_id, message, data=data or None)
        log.info("local fine-tune job %s: %s", job_id, message)
        if on_event:
            on_event(message)

    try:
        outcome = _train(ctx, job_id, settings, dataset, adapter_dir, event)
    except Exception as exc:  # noqa: BLE001 - any failure is the job's, reported on its row
        store.set_status(engine, job_id, JobStatus.FAILED, error_code=type(exc).__name__,
                         error_message=_failure_reason(exc))
        return
    except BaseException:
        store.set_status(engine, job_id, JobStatus.FAILED, error_code="interrupted",
                         error_message="training was interrupted")
        raise
    store.set_status(engine, job_id, JobStatus.SUCCEEDED, f"adapter saved to {adapter_dir}",
                     fine_tuned_model=str(adapter_dir), trained_tokens=outcome.trained_tokens,
                     train_loss=outcome.train_loss, validation_loss_before=outcome.validation_loss_before,
                     validation_loss_after=outcome.validation_loss_after)


def _failure_reason(exc: Exception) -> str:
    if isinstance(exc, LocalModelError):
        return str(exc)  # already one line that says what to install or fix
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return "out of memory: lower finetune.batch_size or finetune.max_seq_length, or use a smaller base model"
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def _base_folder(base_model: str, cache_dir: Path | None) -> Path:
    """The Hugging Face folder of `base_model` (an alias or a path); LocalModelError if there is none."""
    folder = localmodel.resolve(base_model, cache_dir)
    if localmodel.is_adapter(folder):
        raise LocalModelError(f"the base model {base_model} is a LoRA adapter: name its base model instead")
    return folder


def _load_base(transformers, torch, folder: Path, device: str):
    """(tokenizer, model) of a base folder; bf16 on a GPU that has it, else fp32."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    return tokenizer, model


def _train(ctx, job_id: int, settings: FinetuneSettings, dataset, adapter_dir: Path, event) -> Outcome:
    """The training run itself: evaluate, train, evaluate, save the adapter."""
    folder = _base_folder(settings.base_model, ctx.settings.model_cache_dir)  # fails fast, before heavy imports
    torch, transformers, peft, trl, datasets = _training_stack()
    device = _device(torch)
    tokenizer, model = _load_base(transformers, torch, folder, device)
    if not getattr(tokenizer, "chat_template", None):
        # The local server renders prompts with the chat template too: train what it will serve.
        raise LocalModelError(f"the base model {settings.base_model} has no chat template: "
                              "use an instruct/chat model")
    train_records = read_examples(dataset.train_path)
    validation_records = read_examples(dataset.validation_path) if dataset.validation_path else []
    work_dir = adapter_dir.with_name(adapter_dir.name + ".trainer")  # Trainer's output_dir; nothing is kept
    seed = settings.seed if settings.seed is not None else 0
    args = trl.SFTConfig(
        output_dir=str(work_dir),
        per_device_train_batch_size=Plan.of(settings, len(train_records)).batch_size,
        per_device_eval_batch_size=EVAL_BATCH,
        learning_rate=settings.learning_rate,
        max_length=settings.max_seq_length,
        completion_only_loss=True,
        seed=seed,
        data_seed=seed,
        bf16=device == "cuda" and torch.cuda.is_bf16_supported(),
        # Activations of a small model fit anywhere; recomputing them only costs time. On a GPU
        # (large models) TRL's default stays: checkpointing on.
        activation_checkpointing=device == "cuda",
        save_strategy="no",
        # every eval_steps (set with the plan below), for the validation curve
        eval_strategy="steps" if validation_records else "no",
        report_to="none",
        disable_tqdm=True,
        logging_strategy="steps",
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
    )
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=settings.lora_r, lora_alpha=settings.lora_alpha,
                           lora_dropout=settings.lora_dropout, target_modules="all-linear")
    progress = _progress_callback(transformers, ctx.engine, job_id, event)
    trainer = trl.SFTTrainer(
        model=model, args=args, processing_class=tokenizer, peft_config=lora, callbacks=[progress],
        train_dataset=datasets.Dataset.from_list(train_records),
        eval_dataset=datasets.Dataset.from_list(validation_records) if validation_records else None,
    )
    trainer.remove_callback(transformers.PrinterCallback)  # it prints every log dict on stdout
    usable = len(trainer.train_dataset)
    if not usable:
        raise ValueError(f"no example has room for its reply within max_seq_length = {settings.max_seq_length}")
    if skipped := len(train_records) - usable:
        event(f"{skipped} examples skipped: the prompt fills max_seq_length")
    # TRL dropped the examples whose prompt fills max_seq_length: plan on the ones left. The
    # Trainer reads max_steps and logging_steps when train() starts.
    plan = Plan.of(settings, usable)
    trainer.args.max_steps = plan.total_steps
    trainer.args.logging_steps = max(1, plan.total_steps // MAX_LOGGED_STEPS)
    if trainer.eval_dataset is not None and len(trainer.eval_dataset):
        trainer.args.eval_steps = max(1, math.ceil(plan.total_steps / (VALIDATIONS_DURING_TRAINING + 1)))
    else:
        trainer.args.eval_strategy = "no"  # nothing left to validate on
    progress.total = plan.total_steps
    event(f"training {settings.base_model} on {device} with TRL SFTTrainer: {usable} examples, {plan.epochs} "
          f"epochs, batch {plan.batch_size}, {plan.total_steps} steps, LoRA r={settings.lora_r}",
          type="plan", device=device, steps=plan.total_steps, epochs=plan.epochs, batch_size=plan.batch_size)

    outcome = Outcome()
    if trainer.eval_dataset is not None and len(trainer.eval_dataset):
        # LoRA's B matrices start at zero: this is the base model's own loss.
        outcome.validation_loss_before = _validation_loss(trainer)
        event(f"validation loss before training {outcome.validation_loss_before:.4f}", type="metrics",
              step=0, validation_loss=outcome.validation_loss_before)
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    outcome.train_loss = progress.last_loss
    outcome.trained_tokens = progress.num_tokens
    event(f"trained {plan.total_steps} steps in {seconds:.1f}s ({seconds / plan.total_steps:.2f}s/step)",
          type="timing", seconds=round(seconds, 3), steps=plan.total_steps)
    if outcome.validation_loss_before is not None:
        outcome.validation_loss_after = _validation_loss(trainer)
        event(f"validation loss after training {outcome.validation_loss_after:.4f} "
              f"(before {outcome.validation_loss_before:.4f})", type="metrics", step=plan.total_steps,
              validation_loss=outcome.validation_loss_after)
    _save(trainer.model, tokenizer, adapter_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    return outcome


def _validation_loss(trainer) -> float:
    return round(float(trainer.evaluate()["eval_loss"]), 6)


def _progress_callback(transformers, engine, job_id: int, event):
    """A TrainerCallback (a class built here: transformers is imported only when training)."""

    class ProgressCallback(transformers.TrainerCallback):
        """Stores each logged step as a job event and keeps the job's heartbeat going."""

        def __init__(self, engine, job_id: int, event):
            self.engine, self.job_id, self.event = engine, job_id, event
            self.total = 0
            self.last_loss: float | None = None
            self.num_tokens: int | None = None
            self.last_beat = time.monotonic()
            self.training = False  # evaluations outside train() (before, after) are reported by _train

        def on_train_begin(self, args, state, control, **kwargs):
            self.training = True

        def on_train_end(self, args, state, control, **kwargs):
            self.training = False

        def _beat(self) -> None:
            if time.monotonic() - self.last_beat > HEARTBEAT_SECONDS:
                store.heartbeat(self.engine, self.job_id)
                self.last_beat = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True  # the last step is always an event, whatever logging_steps
                control.should_evaluate = False  # _train validates after training anyway
            self._beat()

        def on_prediction_step(self, args, state, control, **kwargs):
            self._beat()  # a long validation set is no sign of a dead trainer

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "eval_loss" in logs and self.training:
                loss = round(float(logs["eval_loss"]), 6)
                self.event(f"step {state.global_step}/{self.total}: validation loss {loss:.4f}", type="metrics",
                           step=state.global_step, validation_loss=loss)
                return
            if not logs or "loss" not in logs:
                return  # the end-of-training summary is reported by _train
            loss = round(float(logs["loss"]), 6)
            self.last_loss = loss
            if "num_tokens" in logs:
                self.num_tokens = int(logs["num_tokens"])
            step = state.global_step
            self.event(f"step {step}/{self.total}: loss {loss:.4f}", type="metrics", step=step,
                       epoch=math.ceil(state.epoch or 1), loss=loss)

    return ProgressCallback(engine, job_id, event)


def _save(model, tokenizer, adapter_dir: Path) -> None:
    """Write the adapter and its tokenizer beside each other, replacing an earlier run's in one move."""
    staging = adapter_dir.with_name(adapter_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    staging.rename(adapter_dir)


# --- issue 9: validation loss of base and tuned on held-out references ---------------------------
def heldout_losses(settings: FinetuneSettings, adapter: str, groups: dict[str, list[list[dict[str, str]]]],
                   cache_dir: Path | None = None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """The training run's own validation loss (TRL's evaluate: mean cross-entropy in nats over the
    reply tokens, prompt masked, `max_seq_length` truncation) of the base model and of base +
    `adapter`, on each group of chat examples (a grid cell's held-out references) and on all.

    Returns ({group: {"base", "tuned"}}, {"base", "tuned"}). LocalModelError when the extra, the
    base or the adapter is missing.
    """
    import tempfile

    folder = _base_folder(settings.base_model, cache_dir)
    localmodel.resolve(adapter, cache_dir)  # the adapter folder exists: one line if not
    torch, transformers, peft, trl, datasets = _training_stack()
    device = _device(torch)
    tokenizer, model = _load_base(transformers, torch, folder, device)
    model = peft.PeftModel.from_pretrained(model, adapter).to(device)
    names = {f"g{i}": group for i, group in enumerate(groups)}
    records = {name: [prompt_completion(m) for m in groups[group]] for name, group in names.items()}
    records["all"] = [record for name in names for record in records[name]]
    with tempfile.TemporaryDirectory(prefix="gridtune-eval-") as work_dir:
        args = trl.SFTConfig(
            output_dir=work_dir, per_device_eval_batch_size=EVAL_BATCH, max_length=settings.max_seq_length,
            completion_only_loss=True, bf16=device == "cuda" and torch.cuda.is_bf16_supported(),
            save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, dataloader_pin_memory=device == "cuda",
        )
        trainer = trl.SFTTrainer(model=model, args=args, processing_class=tokenizer,
                                 train_dataset=datasets.Dataset.from_list(records["all"]),  # required; never trained
                                 eval_dataset={name: datasets.Dataset.from_list(rows) for name, rows in records.items()})
        trainer.remove_callback(transformers.PrinterCallback)
        tuned = trainer.evaluate()
        with model.disable_adapter():  # the same weights without LoRA: the base model
            base = trainer.evaluate()

    def pair(name: str) -> dict[str, float] | None:
        key = f"eval_{name}_loss"
        if key not in tuned or key not in base:
            return None  # every example of the group was longer than max_seq_length
        return {"base": round(float(base[key]), 6), "tuned": round(float(tuned[key]), 6)}

    return {group: pair(name) for name, group in names.items()}, pair("all")
