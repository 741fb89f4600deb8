"""docker-compose.yml, Dockerfile and .env.example agree with the code (no Docker engine needed).

The compose file parses; every command points at something that exists (the `worker` Celery app,
the `producer` and `localapi` modules, Flower); every environment variable named in compose and in
.env.example is one the code (or an image) reads, and every variable the code reads is documented;
the API key reaches the workers only; workers scale; the image installs the project as non-root.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from gridtune.settings import Settings
from tests.support import ROOT, clean_env

# Read by the images, not by gridtune (gridtune reads everything through Settings).
CODE_EXTRAS: set[str] = set()
IMAGE_VARS = {"FLOWER_BASIC_AUTH", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
SECRET = "OPENAI_API_KEY"
ENV_LINE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")


def settings_vars() -> set[str]:
    names = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        names.update(alias.choices if hasattr(alias, "choices") else [alias])
    return {n for n in names if isinstance(n, str)}


def code_vars() -> set[str]:
    return settings_vars() | CODE_EXTRAS


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def environment(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def command_of(service: dict) -> list[str]:
    parts = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        parts += value.split() if isinstance(value, str) else list(value)
    return parts


def env_example() -> dict[str, tuple[str, str]]:
    """NAME -> (value, the comment lines just above it)."""
    found, comment = {}, []
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = ENV_LINE.match(line.strip())
        if match:
            assert match.group(1) not in found, f"{match.group(1)} documented twice"
            found[match.group(1)] = (match.group(2), " ".join(comment))
            comment = []
        elif line.startswith("#") and not line.startswith("# ---"):
            comment.append(line.lstrip("# ").strip())
        else:
            comment = []
    return found


def test_settings_reads_the_variables_we_expect():
    # A guard for the guard: if the alias introspection broke, every check below would be vacuous.
    names = settings_vars()
    assert {"DATABASE_URL", "CELERY_BROKER_URL", SECRET, "OPENAI_BASE_URL", "GRIDTUNE_WORKER_CONCURRENCY"} <= names
    assert len(names) == len(Settings.model_fields)


def test_compose_services_and_their_shape(compose):
    services = compose["services"]
    assert {"redis", "postgres", "worker", "flower", "localapi", "producer"} <= set(services)
    assert "healthcheck" in services["redis"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") and not v.startswith((".", "/"))
               for v in services["postgres"]["volumes"]), "postgres needs a named volume"
    for volume in services["postgres"]["volumes"]:
        assert volume.split(":")[0] in compose["volumes"]

    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker, "workers must scale (--scale worker=4)"
    assert worker["build"] in (".", {"context": "."})
    assert command_of(worker)[:4] == ["celery", "-A", "worker", "worker"]
    assert "healthcheck" in worker
    for dependency in ("redis", "postgres"):
        assert worker["depends_on"][dependency]["condition"] == "service_healthy"
    grace = re.fullmatch(r"(\d+)(s|m)", str(worker["stop_grace_period"]))
    assert grace and int(grace.group(1)) * (60 if grace.group(2) == "m" else 1) >= 60, "too short for a warm shutdown"

    flower = services["flower"]
    assert "5555" in " ".join(map(str, flower["ports"]))
    assert "--basic-auth" in " ".join(command_of(flower)) and "FLOWER_BASIC_AUTH" in " ".join(command_of(flower))
    assert "local" in services["localapi"]["profiles"]
    assert "tools" in services["producer"]["profiles"]
    assert services["producer"]["entrypoint"] == ["python", "-m", "producer"]


def test_only_workers_get_the_api_key(compose):
    holders = [name for name, service in compose["services"].items() if SECRET in environment(service)]
    assert holders == ["worker"]
    for name, service in compose["services"].items():
        assert "env_file" not in service, f"{name}: an env_file would hand every variable (the key too) over"
    assert "sk-" not in (ROOT / "docker-compose.yml").read_text().replace("sk-your-key-here", "")


def test_every_variable_is_one_the_code_reads_and_every_one_is_documented(compose):
    known = code_vars() | IMAGE_VARS
    text = (ROOT / "docker-compose.yml").read_text()
    for name, service in compose["services"].items():
        unknown = set(environment(service)) - known
        assert not unknown, f"{name} sets variables nothing reads: {unknown}"
    interpolated = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))
    assert not interpolated - known, f"compose interpolates unknown variables: {interpolated - known}"

    documented = env_example()
    assert not set(documented) - known, f".env.example documents unknown variables: {set(documented) - known}"
    missing = (code_vars() | IMAGE_VARS | interpolated) - set(documented)
    assert not missing, f"not documented in .env.example: {missing}"
    for name, (_, comment) in documented.items():
        assert len(comment) > 10, f"{name} has no comment in .env.example"
    assert documented[SECRET][0] == "sk-your-key-here", "no real-looking key in .env.example"


def test_optional_settings_are_never_set_empty(compose):
    # Settings would read "" as a value (an int field fails, a base URL of "" breaks the client):
    # compose must pass such variables through or leave them unset, never default them to "".
    for name, service in compose["services"].items():
        for var, value in environment(service).items():
            assert value is None or (str(value).strip() and not str(value).endswith(":-}")), f"{name}: {var}={value!r}"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=clean_env(CELERY_BROKER_URL="redis://127.0.0.1:6379/0"))


def test_every_command_refers_to_something_that_exists(compose):
    commands = {name: command_of(service) for name, service in compose["services"].items()}
    seen = set()
    for name, command in commands.items():
        if command[:3] == ["celery", "-A", "worker"]:
            sub = command[3]
            seen.add(sub)
            result = run("-m", "celery", "-A", "worker", sub, "--help")
            assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
        elif command[:2] == ["sh", "-c"]:
            inner = re.search(r"exec celery -A worker (\w+)", command[2])
            assert inner, command
            seen.add(inner.group(1))
            result = run("-m", "celery", "-A", "worker", inner.group(1), "--help")
            assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
        elif command[:2] == ["python", "-m"]:
            result = run("-m", command[2], "--help")
            assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
            seen.add(command[2])
    assert {"worker", "flower", "producer", "localapi"} <= seen
    # The app the workers run registers gridtune's tasks.
    result = run("-c", "from worker.app import app; import worker.tasks; print(sorted(app.tasks))")
    assert result.returncode == 0 and "gridtune.generate" in result.stdout, result.stderr


def test_dockerfile_installs_the_project_as_non_root():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.strip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11-slim")
    assert any(re.search(r"pip install (--no-cache-dir )?\.(\s|$)", line) for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    text = "\n".join(lines)
    assert "OPENAI_API_KEY" not in text and "sk-" not in text, "no secrets in the image"
    for package in ("gridtune", "worker", "producer", "models", "localapi"):
        assert re.search(rf"COPY ({package}|\.) ", text), f"{package} is not copied into the image"
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored and ".venv" in ignored and ".git" in ignored
