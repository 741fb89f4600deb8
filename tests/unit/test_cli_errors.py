"""Bad input: one line on stderr naming the problem, exit code 2, never a traceback.

Config problems go through `producer.cli.main` in-process (they are found before any service is
touched). Problems that depend on the environment (database, broker, API key) run the CLI in a
subprocess, so the Celery app is configured from that environment as in real use.
"""

from __future__ import annotations

import csv
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.support import clean_env, wait_for

GOOD = """
repeats = 1
[dimensions]
age = [18, 30]
gender = ["man", "woman"]
[templates]
prompt = "A {age}-year-old {gender}."
input = "{age}, {gender}"
[dataset]
min_examples = 4
[finetune]
backend = "none"
"""


@pytest.fixture
def redis_db(tmp_path):
    """A private, empty redis-server: no other test run's workers consume from it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                               "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def up():
        try:
            return client.ping()
        except redis.RedisError:
            return False

    wait_for(up, 10, 0.05, "redis-server")
    yield url
    server.kill()
    server.wait(10)


def error_line(stderr: str) -> str:
    """The single `gridtune: error:` line (and no traceback anywhere)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("gridtune: error:")]
    assert len(lines) == 1, stderr
    assert "\n" not in lines[0]
    return lines[0]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    from producer.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


def cli(args: list[str], cwd: Path, timeout: float = 60, **env: str) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "producer", *args], cwd=cwd, env=clean_env(**env),
                            capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stderr


def write(tmp_path: Path, text: str | bytes, name: str = "sweep.toml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


# --- config problems (in-process) ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("repeats = [1\n", "not valid TOML"),
        (GOOD.replace("A {age}", "A {height}"), "{height} is not a declared dimension"),
        (GOOD.replace("A {age}", "A {age.__class__}"), "no attribute access or indexing"),
        (GOOD.replace("A {age}", "A {age[0]}"), "no attribute access or indexing"),
        (GOOD.replace("A {age}", "A {0}"), "positional field {0}"),
        (GOOD.replace("A {age}", "A {}"), "positional field {}"),
        (GOOD.replace('{age}, {gender}"', '{gender.upper}"'), "templates.input"),
        (GOOD.replace('gender = ["man", "woman"]', "gender = []"), "dimension 'gender' has no values"),
        (GOOD.replace("repeats = 1", "repeats = 0"), "repeats must be at least 1, got 0"),
        (GOOD.replace("repeats = 1", "repeats = -3"), "repeats must be at least 1, got -3"),
        (GOOD.replace("[dimensions]\nage = [18, 30]\ngender = [\"man\", \"woman\"]", "[dimensions]"),
         "declare at least one dimension"),
    ],
    ids=["malformed-toml", "undeclared", "attribute", "index", "positional-0", "positional-empty",
         "input-template", "empty-dimension", "repeats-0", "repeats-negative", "no-dimensions"],
)
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, text, expected):
    code, err = run_main(["sweep", "--config", write(tmp_path, text)], capsys)
    assert code == 2, err
    line = error_line(err)
    assert expected in line, line
    assert not (tmp_path / "gridtune.db").exists(), "a config error must be found before the database is touched"


def test_non_utf8_config(tmp_path, capsys):
    code, err = run_main(["sweep", "--config", write(tmp_path, GOOD.encode().replace(b"man", b"caf\xe9"))], capsys)
    assert code == 2
    assert "not UTF-8" in error_line(err)


def test_binary_config(tmp_path, capsys):
    code, err = run_main(["sweep", "--config", write(tmp_path, b"\x7fELF\x02\x01\x01\x00\x00\x00" * 20)], capsys)
    assert code == 2
    assert "binary file" in error_line(err)


def test_missing_config_file(tmp_path, capsys):
    code, err = run_main(["sweep", "--config", str(tmp_path / "nope.toml")], capsys)
    assert code == 2
    assert "no such file" in error_line(err)


def test_huge_grid_refused_before_anything_is_stored_or_enqueued(tmp_path, redis_db):
    """10^9 combinations: refused with the count, no database file, no message in the broker."""
    values = ", ".join(str(i) for i in range(1000))
    huge = f"""
[dimensions]
a = [{values}]
b = [{values}]
c = [{values}]
[templates]
prompt = "{{a}} {{b}} {{c}}"
input = "{{a}}"
"""
    code, err = cli(["sweep", "--config", write(tmp_path, huge), "--name", "huge"], tmp_path,
                    CELERY_BROKER_URL=redis_db, DATABASE_URL=f"sqlite:///{tmp_path / 'g.db'}")
    assert code == 2, err
    line = error_line(err)
    assert "1,000,000,000" in line and "GRIDTUNE_MAX_REQUESTS" in line, line
    assert not (tmp_path / "g.db").exists()
    assert redis.Redis.from_url(redis_db).dbsize() == 0


# --- the environment (subprocess) ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url at all", "DATABASE_URL is not a database URL"),
        ("foodb://user@host/x", "unsupported database"),
        ("postgresql://postgres@127.0.0.1:1/x", "cannot reach the database at postgresql://postgres@127.0.0.1:1/x"),
    ],
    ids=["unparseable", "unknown-dialect", "unreachable"],
)
@pytest.mark.parametrize("command", [["sweep"], ["status", "x"], ["list"]], ids=["sweep", "status", "list"])
def test_bad_database_url(tmp_path, url, expected, command):
    code, err = cli(command, tmp_path, DATABASE_URL=url)
    assert code == 2, err
    assert expected in error_line(err)


def test_database_password_not_echoed(tmp_path):
    code, err = cli(["list"], tmp_path, DATABASE_URL="postgresql://postgres:hunter2secret@127.0.0.1:1/x")
    assert code == 2, err
    assert "hunter2secret" not in err
    assert "cannot reach the database" in error_line(err)


def test_unreachable_broker(tmp_path):
    code, err = cli(["sweep", "--config", write(tmp_path, GOOD)], tmp_path, timeout=60,
                    CELERY_BROKER_URL="redis://127.0.0.1:1/0")
    assert code == 2, err
    line = error_line(err)
    assert "cannot reach the broker at redis://127.0.0.1:1/0" in line, line


def test_missing_api_key_with_base_url(tmp_path):
    """Embedded with OPENAI_BASE_URL (a real-API-like setting) but no key: refused, not guessed."""
    code, err = cli(["sweep", "--config", write(tmp_path, GOOD)], tmp_path,
                    OPENAI_BASE_URL="https://api.example.invalid/v1")
    assert code == 2, err
    assert "OPENAI_API_KEY is not set" in error_line(err)


@pytest.mark.parametrize("command", [["status", "nope"], ["export", "nope", "--csv", "x.csv"]],
                         ids=["status", "export"])
def test_unknown_sweep_name(tmp_path, capsys, command):
    code, err = run_main(command, capsys)
    assert code == 2, err
    assert "no sweep named 'nope'" in error_line(err)
    assert not (tmp_path / "x.csv").exists()


def test_existing_name_with_different_config(tmp_path, redis_db):
    """A distributed `sweep` whose name exists with another config: exit 2, nothing enqueued."""
    from gridtune.sweep import load_config
    from models import get_engine, store

    db = f"sqlite:///{tmp_path / 'g.db'}"
    store.create_or_resume_sweep(get_engine(db), "taken", load_config(write(tmp_path, GOOD, "first.toml")))
    other = write(tmp_path, GOOD.replace("[18, 30]", "[18, 30, 40]"), "second.toml")
    code, err = cli(["sweep", "--config", other, "--name", "taken"], tmp_path,
                    CELERY_BROKER_URL=redis_db, DATABASE_URL=db)
    assert code == 2, err
    assert "already exists with a different config" in error_line(err)
    assert redis.Redis.from_url(redis_db).llen("gridtune") == 0


# --- export --------------------------------------------------------------------------------------
def test_export_csv_has_the_tutorials_columns(tmp_path, capsys, monkeypatch):
    from gridtune.settings import reset_settings
    from gridtune.sweep import load_config, request_at
    from models import RowState, get_engine, store

    db = f"sqlite:///{tmp_path / 'g.db'}"
    monkeypatch.setenv("DATABASE_URL", db)
    reset_settings()
    engine = get_engine(db)
    config = load_config(None)
    sweep, _ = store.create_or_resume_sweep(engine, "tutorial", config)
    for index in (0, 1, 5):
        request = request_at(config, index)
        store.insert_generation(engine, dict(
            sweep_id=sweep.id, request_index=index, repeat=request.repeat, params=request.params,
            prompt=request.prompt, input_text=request.input_text, state=RowState.OK,
            response_text=f"hero {index}", finish_reason="stop"))
    out = tmp_path / "out.csv"
    code, err = run_main(["export", "tutorial", "--csv", str(out)], capsys)
    assert code == 0, err
    with open(out, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    header = list(rows[0])
    assert header[:7] == ["age", "gender", "power", "prompt", "sub_prompt", "response_txt", "finish_reason"]
    assert len(rows) == 3
    first = request_at(config, 0)
    assert rows[0]["age"] == str(first.params["age"]) and rows[0]["power"] == first.params["power"]
    assert rows[0]["prompt"] == first.prompt and rows[0]["sub_prompt"] == first.input_text
    assert rows[0]["response_txt"] == "hero 0" and rows[0]["finish_reason"] == "stop"


def test_export_needs_an_output(tmp_path, capsys):
    code, err = run_main(["export", "whatever"], capsys)
    assert code == 2
    assert "--csv PATH" in error_line(err)
