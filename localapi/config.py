"""The server's settings: one dataclass shared by the Python API, the CLI and `/_admin/config`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .budget import LIMIT_MODELS

FAULT_KINDS = ("500", "timeout", "drop", "malformed", "429")
FINETUNE_OUTCOMES = ("succeed", "fail", "forbidden")
# Changing these would need a new listening socket, so they are fixed once the server runs.
STARTUP_ONLY_FIELDS = frozenset({"host", "port", "max_batch"})


@dataclass(frozen=True)
class ServerConfig:
    """Frozen: a running server changes settings through `update`, which validates the new whole."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 = let the OS pick a free port
    latency_ms: float = 0
    latency_jitter_ms: float = 0
    rpm: int | None = None
    tpm: int | None = None
    # Limits are enforced over short periods too: a bucket holding this many seconds of the limit.
    burst_seconds: float = 1.0
    # How the limits are enforced: "window", "token-bucket" or "per-second" (localapi/budget.py).
    limit_model: str = "window"
    fault_rate: float = 0.0
    faults: tuple[str, ...] = FAULT_KINDS
    hang_seconds: float = 30
    retry_after: bool = True
    api_keys: tuple[str, ...] = ()  # empty = any non-empty bearer key
    quota_exhausted_keys: tuple[str, ...] = ()
    finetune_outcome: str = "succeed"
    finetune_step_seconds: float = 0.2
    # Also answer `ft:<base>:gridtune:...` models this server did not train: it keeps nothing on
    # disk, so a model tuned by an earlier run would otherwise be unknown after a restart.
    serve_unknown_tuned: bool = False
    seed: int = 0
    # Overload mode (localapi/overload.py): this many requests run at full speed at once, each
    # taking latency_ms; more share the server and all of them slow down. None = off.
    overload_capacity: int | None = None
    # Real models: how many requests one model generates together (continuous batching).
    max_batch: int = 32
    # /v1/batches: seconds from create to the end, share of lines that fail (500), share done
    # before the batch expires (1 = it completes).
    batch_seconds: float = 0.3
    batch_failure_rate: float = 0.0
    batch_completion_fraction: float = 1.0

    def __post_init__(self) -> None:
        for name in ("faults", "api_keys", "quota_exhausted_keys"):
            if isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a sequence of strings, not one string")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
        if self.fault_rate > 0 and not self.faults:
            raise ValueError("fault_rate > 0 needs at least one fault kind")
        if not 0 <= self.fault_rate <= 1:
            raise ValueError("fault_rate must be between 0 and 1")
        if self.finetune_outcome not in FINETUNE_OUTCOMES:
            raise ValueError(f"finetune_outcome must be one of {', '.join(FINETUNE_OUTCOMES)}")
        for name in ("rpm", "tpm"):
            limit = getattr(self, name)
            if limit is not None and limit <= 0:
                raise ValueError(f"{name} must be positive (or None for no limit)")
        for name in ("latency_ms", "latency_jitter_ms", "hang_seconds", "finetune_step_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.overload_capacity is not None and self.overload_capacity < 1:
            raise ValueError("overload_capacity must be at least 1 (or None for off)")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        for name in ("batch_failure_rate", "batch_completion_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.batch_seconds < 0:
            raise ValueError("batch_seconds must not be negative")
        if self.limit_model not in LIMIT_MODELS:
            raise ValueError(f"limit_model must be one of {', '.join(LIMIT_MODELS)}")
        if self.burst_seconds <= 0:
            raise ValueError("burst_seconds must be positive")

    def updated(self, fields: Mapping[str, Any]) -> ServerConfig:
        """A copy with `fields` changed; ValueError for unknown or startup-only fields."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
        fixed = {name for name in set(fields) & STARTUP_ONLY_FIELDS if fields[name] != getattr(self, name)}
        if fixed:
            raise ValueError(f"cannot change {', '.join(sorted(fixed))} while the server runs")
        try:
            return dataclasses.replace(self, **fields)
        except TypeError as exc:  # e.g. a string where a number belongs, from a JSON body
            raise ValueError(str(exc)) from exc

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data, with the API keys left out."""
        data = dataclasses.asdict(self)
        for secret in ("api_keys", "quota_exhausted_keys"):
            data[secret] = len(data[secret])
        return data
