"""The one settings object: everything gridtune reads from the environment.

Operators and scripts rely on the plain names DATABASE_URL, CELERY_BROKER_URL, OPENAI_API_KEY and
OPENAI_BASE_URL; gridtune's own knobs are prefixed GRIDTUNE_. Secrets are SecretStr so that no
repr, log line or task argument can carry them by accident.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gridtune.errors import UserError


def _default_model_cache() -> Path:
    from gridtune.localmodel import default_cache_dir

    return default_cache_dir()


def _env(name: str, *more: str):
    return AliasChoices(name, *more)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    # --- where things live -------------------------------------------------------------------
    database_url: str = Field("sqlite:///gridtune.db", validation_alias=_env("DATABASE_URL"))
    # Unset = embedded mode: an in-process worker on an in-memory broker.
    broker_url: str | None = Field(None, validation_alias=_env("CELERY_BROKER_URL"))
    # Default: the broker's Redis. Chords need a backend that counts header results.
    result_backend: str | None = Field(None, validation_alias=_env("CELERY_RESULT_BACKEND"))
    # The shared rate budget and cool-downs. Default: the broker's Redis.
    redis_url: str | None = Field(None, validation_alias=_env("GRIDTUNE_REDIS_URL"))
    data_dir: Path = Field(Path("gridtune-data"), validation_alias=_env("GRIDTUNE_DATA_DIR"))
    # USD per 1M tokens for cost estimates; None = the bundled gridtune/prices.toml.
    prices_path: Path | None = Field(None, validation_alias=_env("GRIDTUNE_PRICES"))
    # Local models converted once (a packaged GGUF -> safetensors folder), shared by every sweep.
    model_cache_dir: Path = Field(default_factory=lambda: _default_model_cache(),
                                  validation_alias=_env("GRIDTUNE_MODEL_CACHE"))

    # --- the model API -----------------------------------------------------------------------
    openai_api_key: SecretStr | None = Field(None, validation_alias=_env("OPENAI_API_KEY"))
    openai_base_url: str | None = Field(None, validation_alias=_env("OPENAI_BASE_URL"))
    request_timeout: float = Field(60.0, gt=0, validation_alias=_env("GRIDTUNE_REQUEST_TIMEOUT"))
    # Overrides for the shared budget (else: the sweep config, else learnt from headers).
    rpm: int | None = Field(None, ge=1, validation_alias=_env("GRIDTUNE_RPM"))
    tpm: int | None = Field(None, ge=1, validation_alias=_env("GRIDTUNE_TPM"))
    # How much of the rate the shared budget may hand out at once. Below the provider's own
    # enforcement period (about 1 s) so that scheduling jitter between workers does not add up to
    # a burst the provider refuses.
    burst_seconds: float = Field(0.5, gt=0, validation_alias=_env("GRIDTUNE_BURST_SECONDS"))
    # Requests in flight per endpoint (worker/ratelimit/concurrency.py). A fixed cap for servers
    # known to run one request at a time (overrides the config's [model] max_in_flight), and the
    # adaptive limit for servers that queue instead of refusing: latency above
    # latency_tolerance x the unloaded latency counts as a queue.
    max_in_flight: int | None = Field(None, ge=1, validation_alias=_env("GRIDTUNE_MAX_IN_FLIGHT"))
    adaptive_in_flight: bool = Field(True, validation_alias=_env("GRIDTUNE_ADAPTIVE_IN_FLIGHT"))
    latency_tolerance: float = Field(1.3, gt=1, validation_alias=_env("GRIDTUNE_LATENCY_TOLERANCE"))
    # Spend the room a provider reports (`x-ratelimit-remaining-*`, e.g. a token bucket that holds a
    # minute) faster than the rate; off = always pace at the rate with `burst_seconds` of burst.
    headroom: bool = Field(True, validation_alias=_env("GRIDTUNE_HEADROOM"))
    max_attempts: int = Field(8, ge=1, validation_alias=_env("GRIDTUNE_MAX_ATTEMPTS"))
    # Waits up to this long are slept inside the task; longer ones give the worker slot back
    # (task retry with a countdown).
    max_inline_wait: float = Field(5.0, ge=0, validation_alias=_env("GRIDTUNE_MAX_INLINE_WAIT"))
    backoff_cap: float = Field(60.0, gt=0, validation_alias=_env("GRIDTUNE_BACKOFF_CAP"))
    # This many failed attempts in a row, all the same kind and message (any request, any worker),
    # stop the sweep: the endpoint is dead or wrong (worker/health.py).
    dead_endpoint_failures: int = Field(10, ge=1, validation_alias=_env("GRIDTUNE_DEAD_ENDPOINT_FAILURES"))
    # ... and only once that streak has lasted this many seconds (a restart blip is not a dead endpoint).
    dead_endpoint_seconds: float = Field(5.0, ge=0, validation_alias=_env("GRIDTUNE_DEAD_ENDPOINT_SECONDS"))

    # --- Celery ------------------------------------------------------------------------------
    # A message not acked within this many seconds is delivered again (Redis transport); every
    # countdown we schedule stays well below it.
    visibility_timeout: int = Field(3600, ge=4, validation_alias=_env("GRIDTUNE_VISIBILITY_TIMEOUT"))
    worker_concurrency: int = Field(100, ge=1, validation_alias=_env("GRIDTUNE_WORKER_CONCURRENCY"))
    embedded_concurrency: int = Field(32, ge=1, validation_alias=_env("GRIDTUNE_EMBEDDED_CONCURRENCY"))
    # Task events feed Flower; turn them off only if nobody watches (they cost a publish per state).
    task_events: bool = Field(True, validation_alias=_env("GRIDTUNE_TASK_EVENTS"))
    # Celery's two INFO lines per task ("received", "succeeded"): off by default, they cost CPU at
    # hundreds of tasks per second; failures, retries' reasons and gridtune's own lines stay.
    task_log_lines: bool = Field(False, validation_alias=_env("GRIDTUNE_TASK_LOG_LINES"))
    enqueue_batch: int = Field(1000, ge=1, validation_alias=_env("GRIDTUNE_ENQUEUE_BATCH"))
    finetune_poll_seconds: float = Field(30.0, gt=0, validation_alias=_env("GRIDTUNE_FINETUNE_POLL_SECONDS"))
    # `sweep --wait` / `status --watch` re-send a sweep's missing requests after it has looked
    # stalled (rows missing, nothing queued, unacked or in flight) for this many seconds.
    stall_seconds: float = Field(60.0, gt=0, validation_alias=_env("GRIDTUNE_STALL_SECONDS"))
    # Refuse grids larger than this before anything is stored or enqueued.
    max_requests: int = Field(5_000_000, ge=1, validation_alias=_env("GRIDTUNE_MAX_REQUESTS"))

    @field_validator("broker_url", "result_backend", "redis_url", "openai_base_url", mode="before")
    @classmethod
    def _url_or_unset(cls, value: object, info: ValidationInfo) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None  # an empty variable means unset
        schemes = _URL_SCHEMES[info.field_name]
        scheme = value.split("://", 1)[0].lower() if isinstance(value, str) and "://" in value else None
        if scheme is None or (schemes and scheme not in schemes):
            expected = ", ".join(f"{s}://" for s in schemes[:3]) or "scheme://"
            raise ValueError(f"not a URL gridtune can use (expected {expected}...)")
        return value

    @field_validator("data_dir", "model_cache_dir")
    @classmethod
    def _a_folder(cls, path: Path) -> Path:
        if path.exists() and not path.is_dir():
            raise ValueError("exists and is not a folder")
        return path

    @field_validator("prices_path")
    @classmethod
    def _prices_file(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError("no such file (a TOML price table like gridtune/prices.toml)")
        return path

    # --- batch mode (the provider's Batch API) -------------------------------------------------
    # One batch input file holds at most this many requests and bytes (OpenAI: 50,000 and 200 MB).
    batch_max_requests: int = Field(50_000, ge=1, validation_alias=_env("GRIDTUNE_BATCH_MAX_REQUESTS"))
    batch_max_bytes: int = Field(200_000_000, ge=1024, validation_alias=_env("GRIDTUNE_BATCH_MAX_BYTES"))
    # How often a batch in flight is polled (its results come within 24 h).
    batch_poll_seconds: float = Field(60.0, gt=0, validation_alias=_env("GRIDTUNE_BATCH_POLL_SECONDS"))

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    @property
    def shared_redis_url(self) -> str | None:
        """The Redis that holds the rate budget: explicit, else the broker's when it is Redis."""
        if self.redis_url:
            return self.redis_url
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return None

    @property
    def max_countdown(self) -> float:
        """The longest retry countdown that cannot outlive the broker's visibility timeout."""
        return max(1.0, self.visibility_timeout / 4)


# Accepted URL schemes per setting (an empty tuple: any scheme://...).
_URL_SCHEMES = {
    "broker_url": ("redis", "rediss", "amqp", "amqps", "pyamqp", "sqs", "memory", "filesystem",
                   "sqla+sqlite", "sqla+postgresql"),
    "result_backend": (),
    "redis_url": ("redis", "rediss", "unix"),
    "openai_base_url": ("http", "https"),
}


def _variable(loc: tuple) -> str:
    """The environment variable a pydantic error location names."""
    name = str(loc[0]) if loc else "?"
    field = Settings.model_fields.get(name)
    alias = getattr(field, "validation_alias", None) if field else None
    if alias is not None and getattr(alias, "choices", None):
        return str(alias.choices[0])
    return name.upper()


def load_settings(**overrides) -> Settings:
    """Settings from the environment (and `overrides`), every variable checked.

    Raises UserError (exit code 2) with one line naming each bad variable and its value,
    e.g. "GRIDTUNE_RPM=-5: must be at least 1"; secrets are never echoed.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            variable = _variable(error["loc"])
            # Values are echoed except secrets and URLs (a URL may carry a password).
            secret = any(word in variable for word in ("KEY", "URL", "BACKEND"))
            shown = "" if secret or error.get("input") is None else f"={str(error['input'])[:80]}"
            message = error["msg"].removeprefix("Value error, ")
            message = (message.replace("Input should be", "must be").replace("greater than or equal to", "at least")
                       .replace("greater than", "more than"))
            problems.append(f"{variable}{shown}: {message}")
        raise UserError("; ".join(problems)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()


def reset_settings() -> None:
    """Forget the cached settings (tests change the environment)."""
    get_settings.cache_clear()
