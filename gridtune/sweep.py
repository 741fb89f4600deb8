"""Sweep configs: load and validate a TOML file, expand its grid lazily.

Everything that can be wrong with a config is found here, at load time: a template that names an
undeclared dimension (or uses attribute access, indexing or positional fields) is refused before
anything is stored or enqueued, never at request time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gridtune.errors import ConfigError, UserError
from gridtune.files import bundled as package_file, read_text

Scalar = str | int | float | bool

DEFAULT_CONFIG = "superhero.toml"
# The same sweep on the packaged local model (no key, no network): the default without OPENAI_API_KEY.
LOCAL_CONFIG = "superhero-local.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Templates(_Section):
    prompt: str = Field(description="The generation prompt sent to the model.")
    input: str = Field(description="The short input that becomes the fine-tuning example's user turn.")
    system: str | None = Field(None, description="Optional system message for generation and training.")


class ModelSettings(_Section):
    name: str = "gpt-4o-mini"
    # Sampling parameters are sent only when the config sets them (unset: the server's default),
    # so a server that does not know one never sees it.
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_output_tokens: int = Field(500, ge=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    # Server-specific request fields, sent as they are (the SDK's extra_body), e.g. a self-hosted
    # server's own switch for sampling: [model.extra_body] do_sample = true
    extra_body: dict[str, Any] | None = None
    # Newer models take max_completion_tokens; some compatible servers only know max_tokens.
    token_param: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens"
    # The provider's limits for this model; unset = learnt from x-ratelimit-* headers.
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    # Up to 4 sequences that end an answer (not included in it); the answer counts as whole.
    stop: list[str] | None = Field(None, min_length=1, max_length=4)
    # --- issue 10: how the sweep is run and paid for (not part of the fingerprint: see RUN_OPTIONS)
    # The spend cap in USD (--max-cost overrides): requests stop before the next could pass it.
    max_cost_usd: float | None = Field(None, gt=0)
    # "online": one API call per request; "batch": the provider's Batch API (half price, <= 24 h).
    mode: Literal["online", "batch"] = "online"
    # At most this many requests in flight at the endpoint (GRIDTUNE_MAX_IN_FLIGHT overrides), e.g.
    # 1 for a server that runs one request at a time; unset = the adaptive limit alone.
    max_in_flight: int | None = Field(None, ge=1)

    @field_validator("extra_body")
    @classmethod
    def _no_standard_fields(cls, body: dict[str, Any] | None) -> dict[str, Any] | None:
        standard = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                    "frequency_penalty", "presence_penalty", "seed", "stop", "stream"}
        if body and (clash := sorted(standard & set(body))):
            raise ValueError(f"{', '.join(clash)} cannot be set here: use the [model] key of that name "
                             "(stream is not supported)")
        return body


# [model] fields that change how a sweep runs, not what it asks for: changing them on resume is not a
# different config (and sweeps stored before they existed keep their fingerprint).
RUN_OPTIONS = ("max_cost_usd", "mode", "max_in_flight")


# Answers that look like a refusal: case-insensitive regular expressions searched in the answer.
# Anchored on the phrasing of refusals, so "I can't be stopped!" in a hero's voice is not one.
DEFAULT_REFUSAL_PATTERNS = (
    r"^\W*I(?:['’]m| am) sorry\b",
    r"\bI (?:can(?:['’]t|not)|won['’]t|am unable to|['’]m unable to|am not able to) "
    r"(?:help|assist|comply|provide|create|write|fulfill|do that|generate)\b",
    r"\bas an AI\b",
    r"\bI(?:['’]m| am) (?:just )?an AI\b",
    r"\bas a language model\b",
)


class DatasetSettings(_Section):
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    split_seed: int = 0
    legacy_format: bool = Field(False, description="Also write the prompt/completion form (' ->', ' END').")
    min_examples: int = Field(10, ge=1)
    # --- issue 9: the dataset report (not part of the fingerprint: see REPORT_OPTIONS)
    # Answers whose estimated Jaccard similarity (MinHash of word 3-grams) with an earlier answer
    # reaches this are near-duplicates: flagged in report.json, dropped only when asked.
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1)
    drop_near_duplicates: bool = False
    refusal_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSAL_PATTERNS))
    drop_refusal_like: bool = False

    @field_validator("refusal_patterns")
    @classmethod
    def _compilable(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return patterns


# [dataset] fields added with the dataset report: left out of the fingerprint while at their
# defaults, so sweeps stored before they existed keep theirs (a changed value is a changed config).
REPORT_OPTIONS = ("near_duplicate_threshold", "drop_near_duplicates", "refusal_patterns", "drop_refusal_like")


class FinetuneSettings(_Section):
    backend: Literal["openai", "local", "none"] = "openai"
    base_model: str = "gpt-4o-mini-2024-07-18"
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = None
    # Examples longer than this many tokens are dropped before submitting.
    max_example_tokens: int = Field(65_536, ge=16)
    # local backend (LoRA on transformers + peft)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    learning_rate: float = Field(2e-4, gt=0)
    max_steps: int | None = Field(None, ge=1)
    max_seq_length: int = Field(256, ge=8)


class AskSettings(_Section):
    temperature: float = Field(0.7, ge=0, le=2)
    max_output_tokens: int = Field(256, ge=1)
    # An input the sweep's summary asks the tuned model (default: the first request's input).
    example: str | None = None


class EvalSettings(_Section):
    """[eval]: what `python -m producer eval` asks, and what the finalizer keeps out of training."""

    # The last `holdout_repeats` repeats of every cell never enter training.
    holdout_repeats: int = Field(0, ge=0)
    # Whole values of a dimension never seen in training (generalisation): {power = ["flight"]}.
    holdout_cells: dict[str, list[Scalar]] = Field(default_factory=dict)
    # Free inputs, in the input template's form where possible: "18, man, can eat a lot".
    inputs: list[str] = Field(default_factory=list)
    # The pairwise judge; unset = [model] name (the model that wrote the data).
    judge_model: str | None = Field(None, min_length=1)
    # The generation prompt's length limit in words, for the judge-free check.
    max_words: int = Field(100, ge=1)
    # Base and tuned model answer with these settings.
    temperature: float = Field(0.7, ge=0, le=2)
    max_output_tokens: int = Field(256, ge=1)

    @field_validator("inputs")
    @classmethod
    def _non_empty_inputs(cls, inputs: list[str]) -> list[str]:
        if any(not text.strip() for text in inputs):
            raise ValueError("an input is empty")
        if len(set(inputs)) != len(inputs):
            raise ValueError("an input is listed twice")
        return inputs


class SweepConfig(_Section):
    name: str | None = Field(None, description="Default sweep name when --name is not given.")
    repeats: int = Field(1, description="Requests per combination.")
    dimensions: dict[str, list[Scalar]]
    templates: Templates
    model: ModelSettings = ModelSettings()
    dataset: DatasetSettings = DatasetSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    ask: AskSettings = AskSettings()
    # None = no held-out set (and, for the fingerprint, a config stored before [eval] existed).
    eval: EvalSettings | None = None

    @field_validator("repeats")
    @classmethod
    def _positive_repeats(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"repeats must be at least 1, got {value}")
        return value

    @field_validator("dimensions")
    @classmethod
    def _usable_dimensions(cls, dims: dict[str, list[Scalar]]) -> dict[str, list[Scalar]]:
        if not dims:
            raise ValueError("declare at least one dimension")
        for name, values in dims.items():
            if not name.isidentifier():
                raise ValueError(f"dimension name {name!r} must be an identifier (letters, digits, _)")
            if not values:
                raise ValueError(f"dimension {name!r} has no values")
            keys = [json.dumps(v) for v in values]
            if len(set(keys)) != len(keys):
                raise ValueError(f"dimension {name!r} lists a value twice")
        return dims

    # --- the grid, never materialised -------------------------------------------------------
    @cached_property
    def combinations(self) -> int:
        return math.prod(len(v) for v in self.dimensions.values())

    @cached_property
    def total_requests(self) -> int:
        return self.combinations * self.repeats

    def params(self, index: int) -> tuple[dict[str, Scalar], int]:
        """The parameters and repeat number of request `index` (itertools.product order)."""
        if not 0 <= index < self.total_requests:
            raise IndexError(index)
        combo, repeat = divmod(index, self.repeats)
        values: dict[str, Scalar] = {}
        for name, options in reversed(list(self.dimensions.items())):
            combo, position = divmod(combo, len(options))
            values[name] = options[position]
        return {name: values[name] for name in self.dimensions}, repeat

    def render(self, params: dict[str, Scalar]) -> tuple[str, str]:
        """(generation prompt, fine-tuning input) for one combination."""
        return self.templates.prompt.format(**params), self.templates.input.format(**params)

    def snapshot(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the config's content; `name` is excluded so renaming is not a change."""
        body = {k: v for k, v in self.snapshot().items() if k != "name" and not (k == "eval" and v is None)}
        body["model"] = {k: v for k, v in body["model"].items() if k not in RUN_OPTIONS}
        defaults = DatasetSettings().model_dump(mode="json")
        body["dataset"] = {k: v for k, v in body["dataset"].items() if k not in REPORT_OPTIONS or v != defaults[k]}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_template(label: str, template: str, dimensions: dict[str, list[Scalar]]) -> None:
    """Only plain `{dimension}` fields are allowed: no conversion (`!r`), no format spec (`:>10`).

    A value is inserted as it is written in the config; conversions and specs would change the
    text the model sees in ways the config does not show (`{a!r}` adds quotes). ConfigError if not.
    """
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"templates.{label}: {exc}") from None
    for _, field, spec, _conversion in fields:
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise ConfigError(
                f"templates.{label}: positional field {{{field}}} is not allowed; "
                f"name a dimension: {', '.join(dimensions)}"
            )
        if not field.isidentifier():
            raise ConfigError(
                f"templates.{label}: field {{{field}}} is not allowed: only plain dimension names, "
                "no attribute access or indexing"
            )
        if field not in dimensions:
            raise ConfigError(
                f"templates.{label}: {{{field}}} is not a declared dimension "
                f"(declared: {', '.join(dimensions)})"
            )
        if _conversion or spec:
            written = f"{{{field}{'!' + _conversion if _conversion else ''}{':' + spec if spec else ''}}}"
            raise ConfigError(f"templates.{label}: {written} is not allowed: write {{{field}}} (no conversion "
                              "or format spec; values are inserted as written)")
    # Format specs must suit every value of their dimension: try each value once.
    longest = max(len(v) for v in dimensions.values())
    for i in range(longest):
        sample = {name: values[i % len(values)] for name, values in dimensions.items()}
        try:
            template.format(**sample)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"templates.{label}: cannot render with {sample}: {exc}") from None


def eval_problems(config: SweepConfig) -> list[str]:
    """What is wrong with [eval] given the grid: unknown dimensions or values, nothing left to train on."""
    settings = config.eval
    if settings is None:
        return []
    problems = []
    if settings.holdout_repeats >= config.repeats:
        problems.append(f"eval.holdout_repeats: {settings.holdout_repeats} of {config.repeats} repeats leaves "
                        "none for training")
    for name, values in settings.holdout_cells.items():
        if name not in config.dimensions:
            problems.append(f"eval.holdout_cells: {name!r} is not a declared dimension "
                            f"(declared: {', '.join(config.dimensions)})")
            continue
        declared = {json.dumps(v) for v in config.dimensions[name]}
        if unknown := [v for v in values if json.dumps(v) not in declared]:
            problems.append(f"eval.holdout_cells.{name}: {', '.join(map(repr, unknown))} not among its values")
        elif {json.dumps(v) for v in values} >= declared:
            problems.append(f"eval.holdout_cells.{name}: holds out every value, leaving nothing for training")
    return problems


def heldout_source(config: SweepConfig, params: dict[str, Scalar], repeat: int) -> str | None:
    """Why request (params, repeat) is held out of training: "heldout_cell" (one of its values is in
    [eval] holdout_cells), "heldout_repeat" (one of the last holdout_repeats repeats), or None.

    Pure and deterministic: the finalizer and `eval` call it on the stored rows and agree.
    """
    settings = config.eval
    if settings is None:
        return None
    for name, values in settings.holdout_cells.items():
        if name in params and json.dumps(params[name]) in {json.dumps(v) for v in values}:
            return "heldout_cell"
    if repeat >= config.repeats - settings.holdout_repeats:
        return "heldout_repeat"
    return None


def parse_input(config: SweepConfig, text: str) -> dict[str, Scalar] | None:
    """The dimension values a free input spells in the input template's form, else None.

    "18, man, can eat a lot" with "{age}, {gender}, {power}" -> {"age": 18, "gender": "man",
    "power": "can eat a lot"}: a value equal to a declared one (as written) takes its type.
    """
    pattern, names = "", []
    for literal, field, _spec, _conversion in string.Formatter().parse(config.templates.input):
        pattern += re.escape(literal)
        if field is not None:
            if field in names:
                pattern += f"(?P={field})"
            else:
                pattern += f"(?P<{field}>.+?)"
                names.append(field)
    match = re.fullmatch(pattern, text.strip(), flags=re.DOTALL)
    if match is None or not names:
        return None
    cell: dict[str, Scalar] = {}
    for name in names:
        raw = match.group(name).strip()
        cell[name] = next((v for v in config.dimensions[name] if str(v) == raw), raw)
    return cell


def _describe(error: ValidationError) -> str:
    """Every problem, on one line: "repeats: must be ...; templates: Field required"."""
    problems = []
    for problem in error.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "config"
        message = problem["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
        if problem["type"] == "missing" and len(problem["loc"]) == 1:
            message = f"missing (add a [{where}] table)" if where in ("dimensions", "templates") else "missing"
        elif problem["type"] == "extra_forbidden":
            message = "unknown key"
        elif problem["type"] in ("int_type", "float_type", "bool_type", "string_type") and "input" in problem:
            message += f" (got {problem['input']!r}: write it without quotes)" if isinstance(problem["input"], str) \
                else f" (got {problem['input']!r})"
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


def parse_config(text: str, source: str = "config", max_requests: int | None = None) -> SweepConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        # Strict: "3" is not 3, and 1 is not true. A value of the wrong type is refused, not coerced.
        config = SweepConfig.model_validate(raw, strict=True)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    for label in ("prompt", "input", "system"):
        template = getattr(config.templates, label)
        if template is not None:
            try:
                check_template(label, template, config.dimensions)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
    if problems := eval_problems(config):
        raise ConfigError(f"{source}: " + "; ".join(problems))
    from gridtune.backend_rules import config_problems

    if problems := config_problems(config):
        raise ConfigError(f"{source}: " + "; ".join(problems))
    if max_requests is not None and config.total_requests > max_requests:
        raise ConfigError(
            f"{source}: the grid has {config.total_requests:,} requests "
            f"({config.combinations:,} combinations x {config.repeats} repeats), more than the "
            f"limit of {max_requests:,} (GRIDTUNE_MAX_REQUESTS)"
        )
    return config


def load_config(path: str | Path | None = None, max_requests: int | None = None,
                bundled: str = DEFAULT_CONFIG) -> SweepConfig:
    """Load a sweep config file; None = the shipped `bundled` one (the tutorial's 294 requests).

    The file is read by `gridtune.files.read_text` (UTF-8, or any UTF with a byte-order mark);
    every problem is a ConfigError naming the file.
    """
    if path is None:
        file, source = package_file("sweeps", bundled), f"sweeps/{bundled}"
    else:
        file, source = Path(path), str(path)
    try:
        text = read_text(file, "TOML sweep config")
    except UserError as exc:
        raise ConfigError(str(exc)) from None
    return parse_config(text, source, max_requests)


def config_from_snapshot(snapshot: dict[str, Any]) -> SweepConfig:
    """Rebuild a stored config (already validated when the sweep was created)."""
    return SweepConfig.model_validate(snapshot)


@dataclass(frozen=True)
class Request:
    """One request of a sweep: what the worker sends and stores."""

    index: int
    params: dict[str, Scalar]
    repeat: int
    prompt: str
    input_text: str


def request_at(config: SweepConfig, index: int) -> Request:
    params, repeat = config.params(index)
    prompt, input_text = config.render(params)
    return Request(index, params, repeat, prompt, input_text)
