"""What a new user's first hour does to gridtune (issue 13, #4-5, #8-12, #14): each kind of input
is read correctly or refused with one line naming the actual problem (exit 2), and the outputs say
where things are and what to run next."""

from __future__ import annotations

import subprocess
import sys

import pytest

import localapi
from gridtune.backend_rules import grid_problems
from gridtune.errors import ConfigError
from gridtune.sweep import load_config, parse_config
from tests.scripted import Reply, ScriptedServer, completion
from tests.support import ROOT, clean_env
from tests.unit.test_cli_errors import GOOD, cli, error_line, write


# --- 4. every file gridtune reads: read correctly or refused naming the problem --------------------
@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_configs_saved_with_a_byte_order_mark_are_read(tmp_path, encoding):
    text = GOOD.replace('"man"', '"homme \u00e9\u00e8"')
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data  # the codec writes no mark; editors do
    config = load_config(write(tmp_path, data))
    assert config.dimensions["gender"] == ["homme \u00e9\u00e8", "woman"]


@pytest.mark.parametrize(("data", "expected"), [
    (GOOD.replace('"man"', '"caf\u00e9"').encode("latin-1"), "not UTF-8 text (byte 55, line 5"),
    (GOOD.encode("utf-16-le"), "UTF-16 without a byte-order mark"),
    (b"\xff\xfe" + b"\x00\xd8" + "x".encode("utf-16-le"), "not valid UTF-16"),
])
def test_config_encodings_that_cannot_be_read_are_named(tmp_path, data, expected):
    code, err = cli(["sweep", "--config", write(tmp_path, data)], tmp_path)
    assert code == 2 and expected in error_line(err) and "sweep.toml" in error_line(err)


def test_a_bad_price_table_is_one_line(tmp_path):
    prices = write(tmp_path, "[models.x]\ninput = 'cheap'\n", "prices.toml")
    code, err = cli(["status", "nope"], tmp_path, GRIDTUNE_PRICES=str(tmp_path / "missing.toml"))
    assert code == 2 and "GRIDTUNE_PRICES" in error_line(err) and "no such file" in error_line(err)
    from gridtune import pricing
    from gridtune.errors import UserError

    with pytest.raises(UserError, match="model 'x' needs input and output prices"):
        pricing._table(prices)


# --- 5. provider rules checked before paying ------------------------------------------------------
def test_a_grid_with_fewer_combinations_than_usable_examples_is_refused_before_anything(tmp_path):
    # 2 x 2 = 4 combinations x 5 repeats: a server that ignores sampling answers each repeat alike,
    # and the duplicates leave 4 examples, fewer than the 10 the config (and OpenAI) needs.
    config = write(tmp_path, GOOD.replace("repeats = 1", "repeats = 5").replace("min_examples = 4", "min_examples = 10"))
    code, err = cli(["sweep", "--config", config], tmp_path, DATABASE_URL=f"sqlite:///{tmp_path}/g.db")
    assert code == 2 and "the grid has 4 combinations, fewer than the 10 usable examples needed" in error_line(err)
    assert not (tmp_path / "g.db").exists()


def test_held_out_cells_do_not_count_towards_the_training_minimum():
    # 3 x 4 = 12 combinations, enough for 10; holding out one age for evaluation leaves 2 x 4 = 8.
    text = (GOOD.replace("age = [18, 30]", "age = [18, 30, 40]")
            .replace('gender = ["man", "woman"]', 'gender = ["man", "woman", "girl", "boy"]')
            .replace("repeats = 1", "repeats = 2").replace("min_examples = 4", "min_examples = 10")
            + "[eval]\nholdout_cells = { age = [40] }\n")
    assert grid_problems(parse_config(text.replace("holdout_cells = { age = [40] }", ""))) == []
    problems = grid_problems(parse_config(text))
    assert problems and problems[0].startswith(
        "the grid has 8 combinations outside [eval] holdout_cells (of 12), fewer than the 10 usable examples needed")


@pytest.mark.parametrize(("section", "expected"), [
    ('n_epochs = 100', "finetune.n_epochs = 100: the openai backend accepts 1 to 50"),
    ('batch_size = 1000', "finetune.batch_size = 1000: the openai backend accepts 1 to 256"),
    ('max_example_tokens = 100000', "the openai backend refuses examples over 65,536 tokens"),
    ('suffix = "' + "s" * 65 + '"', "finetune.suffix"),
    ('learning_rate_multipler = 2', "finetune.learning_rate_multipler: unknown key"),
])
def test_backend_rules_in_the_config_are_checked_at_load_time(section, expected):
    text = GOOD.replace('backend = "none"', f'backend = "openai"\n{section}')
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        parse_config(text)


def sweep_with_openai_finetune(tmp_path, **server_options) -> subprocess.CompletedProcess:
    """`sweep` of a 10-combination grid whose fine-tune goes to the simulated OpenAI API."""
    config = write(tmp_path, GOOD.replace("age = [18, 30]", "age = [18, 30, 40, 50, 60]")
                   .replace('backend = "none"', 'backend = "openai"')
                   .replace("min_examples = 4", "min_examples = 10\nvalidation_fraction = 0"))
    with localapi.running(**server_options) as server:
        return subprocess.run([sys.executable, "-m", "producer", "sweep", "--config", config, "--name", "ft"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=180,
                              env=clean_env(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=server.base_url,
                                            GRIDTUNE_FINETUNE_POLL_SECONDS="0.1",
                                            DATABASE_URL=f"sqlite:///{tmp_path}/g.db",
                                            GRIDTUNE_DATA_DIR=str(tmp_path / "data")))


def test_a_failed_fine_tune_makes_sweep_exit_non_zero(tmp_path):
    swept = sweep_with_openai_finetune(tmp_path, finetune_outcome="fail", finetune_step_seconds=0.05)
    # The dataset was fine (10 examples), the provider's job failed: the command must say so.
    assert "sweep ft: done" in swept.stdout and "fine-tune openai failed" in swept.stdout, swept.stdout + swept.stderr
    assert swept.returncode == 1
    assert "next      fix the cause above, then: python -m producer finetune ft" in swept.stdout


def test_a_provider_that_refuses_fine_tuning_is_an_expected_outcome(tmp_path):
    # OpenAI's 403 training_not_available (everyone from 2027-01-06): recorded, explained, exit 0.
    swept = sweep_with_openai_finetune(tmp_path, finetune_outcome="forbidden")
    assert "unavailable" in swept.stdout, swept.stdout + swept.stderr
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert "next      python -m producer export ft --training-set train.jsonl" in swept.stdout


# --- 8. every environment variable checked at start-up -------------------------------------------
@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("GRIDTUNE_MAX_REQUESTS", "abc", "GRIDTUNE_MAX_REQUESTS=abc: must be a valid integer"),
    ("GRIDTUNE_RPM", "-5", "GRIDTUNE_RPM=-5: must be at least 1"),
    ("GRIDTUNE_TPM", "0", "GRIDTUNE_TPM=0: must be at least 1"),
    ("GRIDTUNE_REQUEST_TIMEOUT", "0", "GRIDTUNE_REQUEST_TIMEOUT=0: must be more than 0"),
    ("GRIDTUNE_MAX_ATTEMPTS", "0", "GRIDTUNE_MAX_ATTEMPTS=0: must be at least 1"),
    ("GRIDTUNE_BURST_SECONDS", "-1", "GRIDTUNE_BURST_SECONDS=-1: must be more than 0"),
    ("GRIDTUNE_MAX_INLINE_WAIT", "-1", "GRIDTUNE_MAX_INLINE_WAIT=-1: must be at least 0"),
    ("GRIDTUNE_BACKOFF_CAP", "x", "GRIDTUNE_BACKOFF_CAP=x: must be a valid number"),
    ("GRIDTUNE_VISIBILITY_TIMEOUT", "1", "GRIDTUNE_VISIBILITY_TIMEOUT=1: must be at least 4"),
    ("GRIDTUNE_WORKER_CONCURRENCY", "0", "GRIDTUNE_WORKER_CONCURRENCY=0: must be at least 1"),
    ("GRIDTUNE_EMBEDDED_CONCURRENCY", "-2", "GRIDTUNE_EMBEDDED_CONCURRENCY=-2: must be at least 1"),
    ("GRIDTUNE_TASK_EVENTS", "maybe", "GRIDTUNE_TASK_EVENTS=maybe: must be a valid boolean"),
    ("GRIDTUNE_ENQUEUE_BATCH", "0", "GRIDTUNE_ENQUEUE_BATCH=0: must be at least 1"),
    ("GRIDTUNE_FINETUNE_POLL_SECONDS", "0", "GRIDTUNE_FINETUNE_POLL_SECONDS=0: must be more than 0"),
    ("GRIDTUNE_STALL_SECONDS", "-1", "GRIDTUNE_STALL_SECONDS=-1: must be more than 0"),
    ("GRIDTUNE_DEAD_ENDPOINT_FAILURES", "0", "GRIDTUNE_DEAD_ENDPOINT_FAILURES=0: must be at least 1"),
    ("GRIDTUNE_DEAD_ENDPOINT_SECONDS", "-1", "GRIDTUNE_DEAD_ENDPOINT_SECONDS=-1: must be at least 0"),
    ("CELERY_BROKER_URL", "notaurl", "CELERY_BROKER_URL: not a URL gridtune can use (expected redis://"),
    ("CELERY_RESULT_BACKEND", "notaurl", "CELERY_RESULT_BACKEND: not a URL"),
    ("GRIDTUNE_REDIS_URL", "localhost:6379", "GRIDTUNE_REDIS_URL: not a URL gridtune can use (expected redis://"),
    ("OPENAI_BASE_URL", "localhost:8000/v1", "OPENAI_BASE_URL: not a URL gridtune can use (expected http://"),
    ("GRIDTUNE_PRICES", "/nonexistent/prices.toml", "GRIDTUNE_PRICES=/nonexistent/prices.toml: no such file"),
    ("GRIDTUNE_DATA_DIR", "/etc/hostname", "GRIDTUNE_DATA_DIR=/etc/hostname: exists and is not a folder"),
    ("GRIDTUNE_MODEL_CACHE", "/etc/hostname", "GRIDTUNE_MODEL_CACHE=/etc/hostname: exists and is not a folder"),
])
def test_every_environment_variable_is_checked_at_start_up(tmp_path, variable, value, expected):
    code, err = cli(["list"], tmp_path, **{variable: value})
    line = error_line(err)
    assert code == 2 and expected in line, line
    assert "CELERY_RESULT_BACKEND" not in line or variable == "CELERY_RESULT_BACKEND"  # names the real one


def test_a_worker_with_a_bad_variable_says_which_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool", "solo"],
                            cwd=ROOT, env=clean_env(GRIDTUNE_RPM="-5", CELERY_BROKER_URL="redis://127.0.0.1:1/0"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert error_line(result.stderr) == "gridtune: error: GRIDTUNE_RPM=-5: must be at least 1"


# --- 9. messages that name the actual problem ------------------------------------------------------
def test_an_empty_config_lists_every_problem(tmp_path):
    code, err = cli(["sweep", "--config", write(tmp_path, "")], tmp_path)
    line = error_line(err)
    assert code == 2 and "dimensions: missing" in line and "templates: missing" in line and "more problem" not in line


def test_template_errors_name_the_file(tmp_path):
    path = write(tmp_path, GOOD.replace('"{age}, {gender}"', '"{age!r:>10}"'))
    code, err = cli(["sweep", "--config", path], tmp_path)
    assert code == 2 and error_line(err).startswith(f"gridtune: error: {path}: templates.input: {{age!r:>10}}")


def test_ctrl_c_during_the_fine_tune_points_at_finetune(tmp_path, monkeypatch, capsys):
    from models import SweepState, get_engine, store
    from producer import cli as cli_module

    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/g.db")
    config = parse_config(GOOD)
    sweep, _ = store.create_or_resume_sweep(get_engine(f"sqlite:///{tmp_path}/g.db"), "cut", config)
    store.set_sweep_state(get_engine(f"sqlite:///{tmp_path}/g.db"), sweep.id, SweepState.FINETUNING)

    def interrupted(args):
        args.sweep_name = "cut"
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "cmd_sweep", interrupted)
    assert cli_module.main(["sweep", "--name", "cut"]) == 130
    assert "`python -m producer finetune cut` runs it again" in capsys.readouterr().err


# --- 10. values of the wrong type are refused, not coerced -----------------------------------------
@pytest.mark.parametrize(("replace", "by", "expected"), [
    ("repeats = 1", 'repeats = "3"', "repeats: must be a valid integer (got '3': write it without quotes)"),
    ("min_examples = 4", 'min_examples = "4"', "dataset.min_examples: must be a valid integer"),
    ("min_examples = 4", "min_examples = 4.0", "dataset.min_examples: must be a valid integer"),
    ('backend = "none"', 'backend = "none"\nseed = true', "finetune.seed: must be a valid integer"),
])
def test_strict_types(replace, by, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        parse_config(GOOD.replace(replace, by))


# --- 11. where things are ---------------------------------------------------------------------------
def test_bundled_files_are_found_from_the_parent_folder_of_a_clone_named_gridtune(tmp_path):
    # `gridtune/` in the current folder (a clone) makes `gridtune` a namespace package there.
    clone = tmp_path / "gridtune"
    clone.symlink_to(ROOT, target_is_directory=True)
    script = ("from gridtune.sweep import load_config; from gridtune import pricing; "
              "print(load_config().total_requests, pricing.price('gpt-4o-mini') is not None)")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=clean_env(PYTHONPATH=str(tmp_path)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["294", "True"]


def test_an_empty_database_says_which_database(tmp_path):
    result = subprocess.run([sys.executable, "-m", "producer", "list"], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert f"no sweeps yet in the SQLite file {tmp_path.resolve() / 'gridtune.db'} (DATABASE_URL)" in result.stderr
    code, err = cli(["status", "nope"], tmp_path)
    assert code == 2 and f"{tmp_path.resolve() / 'gridtune.db'}" in error_line(err)
    jobs = subprocess.run([sys.executable, "-m", "producer", "jobs"], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert jobs.returncode == 0
    assert f"no fine-tune jobs yet in the SQLite file {tmp_path.resolve() / 'gridtune.db'}" in jobs.stderr


# --- 12 and 14: the summary, the training set, what is sent ----------------------------------------
def test_sweep_summary_names_the_database_files_notes_and_next_command(tmp_path):
    # A server that ignores sampling: every repeat of an input gets the same text.
    config = write(tmp_path, GOOD.replace("repeats = 1", "repeats = 3").replace("age = [18, 30]", "age = [18, 30, 40]")
                   .replace("min_examples = 4", "min_examples = 6\nvalidation_fraction = 0")
                   .replace("[finetune]", "[model]\nmax_output_tokens = 200\n[model.extra_body]\ndo_sample = true\n"
                            "[finetune]"))
    with ScriptedServer([Reply(200, completion("The same answer every time."))]) as server:
        swept = subprocess.run([sys.executable, "-m", "producer", "sweep", "--config", config, "--name", "sum"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=180,
                               env=clean_env(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=server.base_url,
                                             DATABASE_URL=f"sqlite:///{tmp_path}/g.db",
                                             GRIDTUNE_DATA_DIR=str(tmp_path / "data")))
    sent = [body for path, body in server.requests if path.endswith("/chat/completions")]
    assert len(sent) == 18 and all(body["do_sample"] is True for body in sent)  # extra_body, merged in
    assert not {"temperature", "top_p", "frequency_penalty", "presence_penalty"} & set(sent[0])
    assert swept.returncode == 0, swept.stdout + swept.stderr
    summary = swept.stdout
    assert f"database  the SQLite file {tmp_path.resolve() / 'g.db'} (DATABASE_URL)" in summary
    assert f"training  {tmp_path.resolve() / 'data' / 'sum' / 'train.jsonl'}" in summary
    assert "got the same answer on every repeat: the server probably ignores temperature" in summary
    assert "next      python -m producer export sum --training-set train.jsonl" in summary
    result = subprocess.run([sys.executable, "-m", "producer", "export", "sum", "--jsonl", "all.jsonl",
                             "--training-set", "train.jsonl"], cwd=tmp_path,
                            env=clean_env(DATABASE_URL=f"sqlite:///{tmp_path}/g.db"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    all_lines = (tmp_path / "all.jsonl").read_text().splitlines()
    training = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(all_lines) == 18 and len(training) <= 6
    assert "duplicates included" in result.stderr and f"{len(training)} examples" in result.stderr


def test_summary_lines(tmp_path):
    from models import get_engine, store
    from producer.summary import after_sweep
    from tests.unit.test_finetune_helpers import make_sweep
    from worker.context import WorkerContext
    from gridtune.settings import Settings

    ctx = WorkerContext(Settings(DATABASE_URL=f"sqlite:///{tmp_path}/s.db", GRIDTUNE_DATA_DIR=str(tmp_path / "d")))
    sweep, _ = make_sweep(ctx, "sum")
    lines = "\n".join(after_sweep(ctx.engine, "sum"))
    assert f"database  the SQLite file {tmp_path.resolve() / 's.db'}" in lines
    assert f"training  {tmp_path.resolve() / 'd' / 'sum' / 'train.jsonl'}" in lines
    assert "next      python -m producer export sum --training-set train.jsonl" in lines


def test_only_the_parameters_the_config_sets_are_sent_plus_extra_body():
    from worker.generation import request_params

    config = parse_config(GOOD + "\n[model]\ntemperature = 0.8\n[model.extra_body]\ndo_sample = true\ntop_k = 40\n")
    params = request_params(config, [{"role": "user", "content": "x"}])
    assert params == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],
                      "max_completion_tokens": 500, "temperature": 0.8,
                      "extra_body": {"do_sample": True, "top_k": 40}}
    bare = request_params(parse_config(GOOD), [])
    assert not {"temperature", "top_p", "frequency_penalty", "presence_penalty", "seed", "extra_body"} & set(bare)
    with pytest.raises(ConfigError, match="model.extra_body: temperature cannot be set here"):
        parse_config(GOOD + "\n[model.extra_body]\ntemperature = 1\n")
