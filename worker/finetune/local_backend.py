"""Supervised LoRA fine-tuning on this machine (transformers + peft), and sampling the adapter.

torch, transformers and peft are the optional `local` extra: they are imported inside these
functions only, so the rest of gridtune runs without them. The training loop is plain PyTorch:
chat examples become text through the tokenizer's chat template (or a simple "role: text"
format), the loss covers the assistant's reply only, and every logged step is a FinetuneEvent.
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

from gridtune.sweep import AskSettings, FinetuneSettings
from models import JobStatus, store

log = logging.getLogger(__name__)

MISSING_EXTRA = "the local backend needs `pip install gridtune[local]` (torch, transformers, peft)"
LOCAL_AUTO_EPOCHS = 3
LOCAL_AUTO_BATCH = 8
HEARTBEAT_SECONDS = 30.0
# A running job whose trainer has been silent this long is taken as dead and may be trained again.
STALE_AFTER_SECONDS = 600.0
MAX_LOGGED_STEPS = 200
IGNORE_INDEX = -100  # labels the loss skips: the prompt and the padding


class MissingExtra(Exception):
    pass


def _training_stack():
    try:
        import peft
        import torch
        import transformers
    except ImportError as exc:
        raise MissingExtra(f"{MISSING_EXTRA}; missing: {exc.name}") from None
    transformers.utils.logging.disable_progress_bar()  # progress is in the job's events, not on stderr
    return torch, transformers, peft


def _device(torch) -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- text -----------------------------------------------------------------------------------
def _render_simple(messages: list[dict[str, str]]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def prompt_and_reply(tokenizer, messages: list[dict[str, str]]) -> tuple[str, str]:
    """(prompt text up to the assistant's turn, the assistant's reply as the model should write it)."""
    history, reply = messages[:-1], messages[-1]["content"]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        return "", full  # a template that does not extend its own prompt: train on the whole text
    return _render_simple(history) + "assistant:", " " + reply


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the prompt that asks for the next assistant reply (for sampling)."""
    prompt, _ = prompt_and_reply(tokenizer, [*messages, {"role": "assistant", "content": ""}])
    return _ids(tokenizer, prompt, first=True)


def _ids(tokenizer, text: str, first: bool) -> list[int]:
    # A chat template writes its own special tokens; the simple format gets the tokenizer's BOS.
    add_special = first and not getattr(tokenizer, "chat_template", None)
    return tokenizer(text, add_special_tokens=add_special)["input_ids"] if text else []


def encode_example(tokenizer, messages: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): the prompt's labels are IGNORE_INDEX so only the reply is learnt."""
    prompt, reply = prompt_and_reply(tokenizer, messages)
    prompt_ids = _ids(tokenizer, prompt, first=True)
    reply_ids = _ids(tokenizer, reply, first=not prompt_ids)
    if tokenizer.eos_token_id is not None and not getattr(tokenizer, "chat_template", None):
        reply_ids.append(tokenizer.eos_token_id)  # teaches the model where a description ends
    ids = (prompt_ids + reply_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + reply_ids)[:max_length]
    return ids, labels


def _encode_file(tokenizer, path: str, max_length: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(the encoded examples that keep part of their reply within max_length, how many did not)."""
    with open(path, encoding="utf-8") as lines:
        examples = [json.loads(line)["messages"] for line in lines if line.strip()]
    encoded = [encode_example(tokenizer, messages, max_length) for messages in examples]
    usable = [pair for pair in encoded if any(label != IGNORE_INDEX for label in pair[1])]
    return usable, len(encoded) - len(usable)


# --- training -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
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


def _batches(torch, encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, generator):
    """Shuffled, right-padded batches of (input_ids, attention_mask, labels)."""
    order = torch.randperm(len(encoded), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in chunk])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk])
        labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in chunk])
        yield input_ids, mask, labels


def _load_base(transformers, torch, base_model: str, device: str):
    if base_model.startswith(("/", "./", "../", "~")) and not Path(base_model).expanduser().is_dir():
        raise FileNotFoundError(f"the base model directory {base_model} does not exist")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_model)
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype).to(device)
    return tokenizer, model


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0  # any id: padded positions are masked out of attention and loss


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
        trained_tokens = _train(ctx, job_id, settings, dataset, adapter_dir, event)
    except Exception as exc:  # noqa: BLE001 - any failure is the job's, reported on its row
        store.set_status(engine, job_id, JobStatus.FAILED, error_code=type(exc).__name__,
                         error_message=_failure_reason(exc))
        return
    except BaseException:
        store.set_status(engine, job_id, JobStatus.FAILED, error_code="interrupted",
                         error_message="training was interrupted")
        raise
    store.set_status(engine, job_id, JobStatus.SUCCEEDED, f"adapter saved to {adapter_dir}",
                     fine_tuned_model=str(adapter_dir), trained_tokens=trained_tokens)


def _failure_reason(exc: Exception) -> str:
    if isinstance(exc, MissingExtra):
        return str(exc)
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return "out of memory: lower finetune.batch_size or finetune.max_seq_length, or use a smaller base model"
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def _train(ctx, job_id: int, settings: FinetuneSettings, dataset, adapter_dir: Path, event) -> int:
    """The training run itself; returns the number of tokens trained on."""
    torch, transformers, peft = _training_stack()
    engine = ctx.engine
    device = _device(torch)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    tokenizer, model = _load_base(transformers, torch, settings.base_model, device)
    usable, skipped = _encode_file(tokenizer, dataset.train_path, settings.max_seq_length)
    if not usable:
        raise ValueError(f"no example has room for its reply within max_seq_length = {settings.max_seq_length}")
    if skipped:
        event(f"{skipped} examples skipped: the prompt fills max_seq_length")
    model = peft.get_peft_model(model, peft.LoraConfig(
        task_type="CAUSAL_LM", r=settings.lora_r, lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout, target_modules="all-linear",
    ))
    plan = Plan.of(settings, len(usable))
    total = plan.total_steps
    log_every = max(1, total // MAX_LOGGED_STEPS)
    event(f"training {settings.base_model} on {device}: {len(usable)} examples, {plan.epochs} epochs, "
          f"batch {plan.batch_size}, {total} steps, LoRA r={settings.lora_r}",
          type="plan", device=device, steps=total, epochs=plan.epochs, batch_size=plan.batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate)
    generator = torch.Generator().manual_seed(settings.seed or 0)
    pad_id = _pad_id(tokenizer)
    model.train()
    step = trained_tokens = 0
    last_beat = time.monotonic()
    for epoch in range(1, plan.epochs + 1):
        for input_ids, mask, labels in _batches(torch, usable, plan.batch_size, pad_id, generator):
            if step == total:
                break
            loss = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            trained_tokens += int(mask.sum())
            if step % log_every == 0 or step == total:
                event(f"step {step}/{total}: loss {loss.item():.4f}",
                      type="metrics", step=step, epoch=epoch, loss=round(loss.item(), 6))
            if time.monotonic() - last_beat > HEARTBEAT_SECONDS:
                store.heartbeat(engine, job_id)
                last_beat = time.monotonic()
    if dataset.validation_path:
        validation_loss = _evaluate(torch, model, tokenizer, dataset.validation_path, settings, pad_id, device)
        if validation_loss is not None:
            event(f"validation loss {validation_loss:.4f}", type="metrics", step=step, validation_loss=validation_loss)
    _save(model, tokenizer, adapter_dir)
    return trained_tokens


def _evaluate(torch, model, tokenizer, path: str, settings: FinetuneSettings, pad_id: int, device: str) -> float | None:
    """Mean loss over the validation examples (None if none has a reply within max_seq_length)."""
    encoded, _ = _encode_file(tokenizer, path, settings.max_seq_length)
    if not encoded:
        return None
    model.eval()
    losses = []
    with torch.no_grad():
        for input_ids, mask, labels in _batches(torch, encoded, 8, pad_id, torch.Generator().manual_seed(0)):
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            losses.append(out.loss.item())
    model.train()
    return round(sum(losses) / len(losses), 6)


def _save(model, tokenizer, adapter_dir: Path) -> None:
    """Write the adapter and its tokenizer beside each other, replacing an earlier run's in one move."""
    staging = adapter_dir.with_name(adapter_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    staging.rename(adapter_dir)


# --- sampling -------------------------------------------------------------------------------
def generate(adapter_dir: str, base_model: str, messages: list[dict[str, str]], ask: AskSettings,
             stop: str | None = None) -> str:
    """The adapter's reply to `messages` (raises MissingExtra without the `local` extra)."""
    torch, transformers, peft = _training_stack()
    device = _device(torch)
    if not Path(adapter_dir).is_dir():
        raise FileNotFoundError(f"the adapter directory {adapter_dir} is gone")
    _, base = _load_base(transformers, torch, base_model, device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(adapter_dir)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).to(device)
    model.eval()
    prompt = encode_prompt(tokenizer, messages)
    sampling = {"do_sample": True, "temperature": ask.temperature} if ask.temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            input_ids=torch.tensor([prompt], device=device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
            max_new_tokens=ask.max_output_tokens,
            pad_token_id=_pad_id(tokenizer),
            **sampling,
        )
    text = tokenizer.decode(output[0][len(prompt):], skip_special_tokens=True)
    if stop and stop in text:
        text = text[:text.index(stop)]
    return text.strip()
