"""Real text generation for the local server: a Hugging Face model with continuous batching.

Why gridtune hosts the model itself instead of fronting `transformers serve`: measured on this
2-core CPU with SmolLM2-135M, `transformers serve --continuous-batching` produced 10 tokens/s for
one request and 26 for eight, ignored temperature and seed (every repeat came back identical), and
its paged attention has no fast CPU path; plain `model.generate` on a static batch of 32 made
117-137 tokens/s. This module keeps the static batch's speed and adds what a sweep needs: requests
join the running batch as soon as a row frees up (continuous batching, so one long reply does not
hold 31 finished rows), and every row samples with its own temperature, top_p, penalties, seed and
stop sequences. The model's forward pass, tokenizer and chat template are transformers'; LoRA
adapters are merged into their base with peft.

One `BatchedGenerator` per model runs its decode loop in a daemon thread; callers `submit()` a
GenerationRequest and wait on the returned Future (cancel it to free the row).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32
# transformers resolves its lazy attributes and model classes on first use; two threads doing that
# at once can see a half-imported module (AttributeError: no attribute 'AutoModelForCausalLM').
# Models that load together (eval's base and adapter) take turns.
_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class GenerationRequest:
    """One chat completion: messages in, sampling knobs as in OpenAI's API (tokens, not words)."""

    messages: list[dict[str, str]]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop sequence) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Row:
    request: GenerationRequest
    future: Future
    prompt_ids: list[int]
    max_tokens: int
    generator: Any  # torch.Generator: this row's own random stream
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    abandoned: bool = False  # the caller stopped waiting: free the row at the next step


@dataclass
class GeneratorStats:
    requests: int = 0
    completion_tokens: int = 0
    steps: int = 0
    max_batch_seen: int = 0
    busy_seconds: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completion_tokens": self.completion_tokens,
            "steps": self.steps,
            "max_batch_seen": self.max_batch_seen,
            "busy_seconds": round(self.busy_seconds, 3),
        }


def load_model(folder: Path, device: str | None = None):
    """(tokenizer, model, device) for a Hugging Face model folder or a peft LoRA adapter folder.

    An adapter is merged into a private copy of its base (named in adapter_config.json), so it
    generates as fast as the base. bf16 on a CUDA GPU that supports it, float32 otherwise.
    """
    import torch
    import transformers

    from gridtune.localmodel import adapter_base, is_adapter, resolve

    transformers.utils.logging.disable_progress_bar()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    if is_adapter(folder):
        import peft

        base_folder = resolve(adapter_base(folder))
        base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=dtype)
        model = peft.PeftModel.from_pretrained(base, folder).merge_and_unload()
        tokenizer_folder = folder if (folder / "tokenizer_config.json").is_file() else base_folder
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer_folder = folder
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    model.to(device).eval()
    return tokenizer, model, device


class BatchedGenerator:
    """Continuous-batching generation for one model; thread-safe `submit`, one decode thread."""

    def __init__(self, tokenizer, model, device: str, max_batch: int = DEFAULT_MAX_BATCH):
        import torch

        self.torch = torch
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.max_batch = max_batch
        self.stats = GeneratorStats()
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {t for t in [*eos, tokenizer.eos_token_id] if t is not None}
        self.pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        self.context_limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self._waiting: deque[_Row] = deque()
        self._rows_by_future: dict[int, _Row] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="localapi-generate", daemon=True)
        self._thread.start()

    # --- the caller's side -------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def submit(self, request: GenerationRequest) -> Future:
        """A Future of GenerationResult; ValueError (now) for a prompt longer than the context."""
        ids = self.prompt_ids(request.messages)
        room = self.context_limit - len(ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {self.context_limit}")
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        row = _Row(request, Future(), ids, min(request.max_tokens or room, room),
                   self.torch.Generator(device=self.device).manual_seed(seed))
        with self._wake:
            if self._closed:
                raise RuntimeError("the generator is closed")
            self._waiting.append(row)
            self._rows_by_future[id(row.future)] = row
            self._wake.notify()
        return row.future

    def abandon(self, future: Future) -> None:
        """The caller no longer waits for `future` (its client went away): stop generating it."""
        with self._wake:
            row = self._rows_by_future.pop(id(future), None)
            if row is not None:
                row.abandoned = True

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(10)

    # --- the decode loop ---------------------------------------------------------------------
    def _run(self) -> None:
        rows: list[_Row] = []
        state = None  # (cache, attention mask [B, L], next positions [B]) of `rows`
        while True:
            with self._wake:
                while not rows and not self._waiting and not self._closed:
                    self._wake.wait()
                if self._closed:
                    break
                joining = []
                while self._waiting and len(rows) + len(joining) < self.max_batch:
                    row = self._waiting.popleft()
                    if row.abandoned:
                        continue
                    row.future.set_running_or_notify_cancel()
                    joining.append(row)
            started = time.monotonic()
            try:
                with self.torch.inference_mode():
                    if joining:
                        state = self._join(rows, state, joining)
                        rows = rows + joining
                    rows, state = self._step(rows, state)
            except Exception as exc:  # noqa: BLE001 - every waiting caller learns of it
                log.exception("generation failed")
                for row in rows:
                    if not row.future.done():
                        row.future.set_exception(exc)
                rows, state = [], None
            self.stats.busy_seconds += time.monotonic() - started
        for row in [*rows, *self._waiting]:
            if not row.future.done():
                row.future.set_exception(RuntimeError("the server is shutting down"))

    def _forward(self, input_ids, mask, positions, cache):
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        return out.logits[:, -1, :].float(), _returned_cache(out)

    def _join(self, rows: list[_Row], state, joining: list[_Row]):
        """Prefill the joining rows (left-padded) and merge their cache into the running batch's."""
        torch = self.torch
        width = max(len(r.prompt_ids) for r in joining)
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in joining],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in joining],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, None)
        self._choose(joining, logits)
        next_positions = mask.sum(-1)
        if state is None:
            return cache, mask, next_positions
        old_cache, old_mask, old_positions = state
        length = max(old_mask.shape[1], mask.shape[1])
        for old_layer, new_layer in zip(old_cache.layers, cache.layers):
            old_layer.keys = torch.cat([_left_pad(old_layer.keys, length, 2), _left_pad(new_layer.keys, length, 2)])
            old_layer.values = torch.cat([_left_pad(old_layer.values, length, 2), _left_pad(new_layer.values, length, 2)])
        merged_mask = torch.cat([_left_pad(old_mask, length, 1), _left_pad(mask, length, 1)])
        return old_cache, merged_mask, torch.cat([old_positions, next_positions])

    def _step(self, rows: list[_Row], state):
        """Finish rows that are done; feed every other row its last token once."""
        torch = self.torch
        rows, state = self._evict(rows, state)
        if not rows:
            return rows, None
        cache, mask, positions = state
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(rows))
        last = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=self.device)], dim=1)
        logits, cache = self._forward(last, mask, positions[:, None], cache)
        self.stats.steps += 1
        self._choose(rows, logits)
        return rows, (cache, mask, positions + 1)

    def _evict(self, rows: list[_Row], state):
        keep = [i for i, r in enumerate(rows) if r.finish_reason is None and not r.abandoned]
        for row in rows:
            if row.finish_reason is not None or row.abandoned:
                with self._wake:
                    self._rows_by_future.pop(id(row.future), None)
            if row.finish_reason is not None and not row.future.done():
                self.stats.requests += 1
                self.stats.completion_tokens += len(row.generated)
                row.future.set_result(GenerationResult(row.text, row.finish_reason, len(row.prompt_ids),
                                                       len(row.generated)))
        if len(keep) == len(rows):
            return rows, state
        if not keep:
            return [], None
        torch = self.torch
        cache, mask, positions = state
        index = torch.tensor(keep, device=self.device)
        mask = mask.index_select(0, index)
        # Columns that only held evicted rows' tokens are padding for everyone left: drop them.
        first = int((mask.sum(0) > 0).nonzero()[0])
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        return [rows[i] for i in keep], (cache, mask[:, first:], positions.index_select(0, index))

    def _choose(self, rows: list[_Row], logits) -> None:
        """Sample each row's next token with its own settings and random stream; mark finished rows."""
        torch = self.torch
        for i, row in enumerate(rows):
            if row.request.frequency_penalty or row.request.presence_penalty:
                if row.generated:
                    counts = torch.bincount(torch.tensor(row.generated, device=self.device),
                                            minlength=logits.shape[1]).float()[: logits.shape[1]]
                    logits[i] -= row.request.frequency_penalty * counts + row.request.presence_penalty * (counts > 0)
        temperatures = torch.tensor([r.request.temperature for r in rows], device=self.device)
        greedy = temperatures <= 0
        probs = torch.softmax(logits / temperatures.clamp(min=1e-5)[:, None], dim=-1)
        top_p = torch.tensor([r.request.top_p for r in rows], device=self.device)
        if bool((top_p < 1).any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest set of most likely tokens whose mass reaches top_p.
            sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) > top_p[:, None]] = 0
            probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
        best = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            token = best[i] if greedy[i] else int(torch.multinomial(probs[i], 1, generator=row.generator))
            self._append(row, token)

    def _append(self, row: _Row, token: int) -> None:
        if token in self.eos_ids:
            row.finish_reason = "stop"
            row.text = self._decode(row.generated)
            return
        row.generated.append(token)
        stop = row.request.stop
        if stop:
            text = self._decode(row.generated)
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                row.finish_reason, row.text = "stop", text[:cut]
                return
        if len(row.generated) >= row.max_tokens:
            row.finish_reason = "length"
            row.text = self._decode(row.generated)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _returned_cache(output):
    # transformers 5 renamed past_key_values to cache; accept either spelling of the output.
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _left_pad(tensor, length: int, dim: int):
    """`tensor` grown to `length` along `dim` with zeros in front: cache keys/values [B, H, T, D]
    (dim 2) and attention masks [B, T] (dim 1); the zeros are masked out."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    import torch.nn.functional as F

    return F.pad(tensor, (0, 0) * (tensor.dim() - 1 - dim) + (missing, 0))


class ModelHost:
    """The real models a server has loaded, by the name clients send (alias, folder or adapter path).

    Loading takes seconds (a packaged alias is converted once, minutes on first use), so `get`
    is called off the event loop; a lock per name keeps two first requests from loading twice.
    """

    def __init__(self, max_batch: int = DEFAULT_MAX_BATCH, cache_dir: Path | None = None):
        self.max_batch = max_batch
        self.cache_dir = cache_dir
        self._generators: dict[str, BatchedGenerator] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> BatchedGenerator:
        """The generator for `name`, loading it on first use (LocalModelError if it cannot be found)."""
        from gridtune.localmodel import MISSING_EXTRA, LocalModelError, resolve

        generator = self._generators.get(name)
        if generator is not None:
            return generator
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._generators:
                started = time.monotonic()
                try:
                    with _LOAD_LOCK:
                        tokenizer, model, device = load_model(resolve(name, self.cache_dir))
                except ImportError as exc:
                    raise LocalModelError(f"{MISSING_EXTRA}; missing: {exc.name}") from None
                self._generators[name] = BatchedGenerator(tokenizer, model, device, self.max_batch)
                log.info("loaded %s on %s in %.1fs", name, device, time.monotonic() - started)
            return self._generators[name]

    def stats(self) -> dict[str, Any]:
        return {name: g.stats.snapshot() for name, g in list(self._generators.items())}

    def close(self) -> None:
        for generator in list(self._generators.values()):
            generator.close()
        self._generators.clear()
