"""The spend cap: the budget's rules on both backends, and requests that stop before passing it.

Requests run without Celery (`run_request`) with the real SDK against the local server; the shared
budget is the Redis backend on an in-process fakeredis (real Lua) or the in-memory backend.
"""

from __future__ import annotations

import threading

import fakeredis
import pytest

import localapi
from gridtune import pricing
from gridtune.settings import Settings, reset_settings
from gridtune.sweep import parse_config
from models import RowState, SweepState, store
from gridtune.errors import UserError
from producer.cli import main
from producer.enqueue import open_spend_budget
from worker.context import WorkerContext
from worker.generation import run_request
from worker.ratelimit.spend import MemorySpendLimiter, RedisSpendLimiter
from worker.spend import budget_key, worst_case_cost

CONFIG = """
[dimensions]
n = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
[templates]
prompt = "Describe hero number {n} in two sentences."
input = "hero {n}"
[model]
name = "gpt-4o-mini"
max_output_tokens = 200
[finetune]
backend = "none"
"""


@pytest.fixture(params=["redis", "memory"])
def limiter(request):
    if request.param == "memory":
        return MemorySpendLimiter()
    return RedisSpendLimiter(fakeredis.FakeRedis(server=fakeredis.FakeServer()))


def test_reservations_stop_at_the_cap_and_settle_at_the_actual_cost(limiter):
    assert limiter.reserve("s", 0.4, 1.0) and limiter.reserve("s", 0.4, 1.0)
    assert not limiter.reserve("s", 0.3, 1.0)  # 0.8 reserved + 0.3 > 1.0: nothing taken
    assert limiter.state("s").reserved_usd == pytest.approx(0.8)
    limiter.settle("s", 0.4, 0.1)  # the reply was short
    assert limiter.state("s").spent_usd == pytest.approx(0.1)
    assert limiter.reserve("s", 0.3, 1.0)  # the refund made room
    assert limiter.reserve("s", 0.2, 1.0) is False or limiter.state("s").reserved_usd <= 0.9 + 1e-9
    state = limiter.state("s")
    assert state.spent_usd + state.reserved_usd <= 1.0 + 1e-9
    assert not limiter.reserve("other", 1.5, 1.0) and limiter.reserve("other", 1.0, 1.0)  # exactly the cap fits


def test_open_raises_spent_to_what_the_database_knows_and_never_lowers_it(limiter):
    assert limiter.open("s", 0.25).spent_usd == pytest.approx(0.25)
    limiter.settle("s", 0, 0.5)
    assert limiter.open("s", 0.1).spent_usd == pytest.approx(0.75)
    assert not limiter.reserve("s", 0.3, 1.0)


def test_many_threads_never_pass_the_cap(limiter):
    granted = []

    def spend() -> None:
        for _ in range(50):
            if limiter.reserve("s", 0.003, 0.1):
                granted.append(1)
                limiter.settle("s", 0.003, 0.001)

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    state = limiter.state("s")
    assert state.reserved_usd == 0 and state.spent_usd == pytest.approx(len(granted) * 0.001)
    assert state.spent_usd <= 0.1 and len(granted) >= 97  # used, not just respected


def make_context(tmp_path, server, **settings) -> WorkerContext:
    values = dict(DATABASE_URL=f"sqlite:///{tmp_path}/spend.db", OPENAI_API_KEY="sk-test-spend",
                  OPENAI_BASE_URL=server.base_url, GRIDTUNE_BACKOFF_CAP=0.1, GRIDTUNE_REQUEST_TIMEOUT=2)
    values.update(settings)
    return WorkerContext(Settings(**values))


def capped_sweep(ctx, cap):
    sweep, _ = store.create_or_resume_sweep(ctx.engine, "capped", parse_config(CONFIG))
    store.set_max_cost(ctx.engine, sweep.id, cap)
    return store.get_sweep_by_id(ctx.engine, sweep.id)


def test_a_capped_sweep_stops_cleanly_before_passing_the_cap(tmp_path):
    with localapi.running() as server:
        ctx = make_context(tmp_path, server)
        worst = worst_case_cost(parse_config(CONFIG), 20)
        sweep = capped_sweep(ctx, 4.5 * worst)
        for index in range(12):
            assert run_request(ctx, sweep.id, index).retry_in is None
        sent = server.stats()["requests"]
    rows = list(store.iter_rows(ctx.engine, sweep.id))
    ok = [r for r in rows if r.state == RowState.OK]
    refused = [r for r in rows if r.state == RowState.FAILED]
    assert len(rows) == 12 and sent == len(ok) and 4 <= len(ok) < 12
    assert all(r.cost_usd == pytest.approx(pricing.inference_cost("gpt-4o-mini", r.prompt_tokens, r.completion_tokens))
               for r in ok)
    assert sum(r.cost_usd for r in ok) <= 4.5 * worst
    assert refused[0].error_kind == "spend_cap" and refused[0].error.startswith("not sent: spend cap reached")
    assert all(r.error_kind == "stopped" and "spend cap reached" in r.error for r in refused[1:])
    sweep = store.get_sweep_by_id(ctx.engine, sweep.id)
    assert sweep.state == SweepState.STOPPED and sweep.stop_reason.startswith("spend cap reached")
    state = ctx.spend.state(budget_key(sweep))
    assert state.reserved_usd == 0 and state.spent_usd == pytest.approx(sum(r.cost_usd for r in ok), abs=1e-8)


def test_a_refused_call_frees_its_reservation_and_an_unanswered_one_keeps_it(tmp_path):
    with localapi.running(fault_rate=1.0, faults=("500",)) as server:
        ctx = make_context(tmp_path, server, GRIDTUNE_MAX_ATTEMPTS=1)
        sweep = capped_sweep(ctx, 1.0)
        run_request(ctx, sweep.id, 0)
        assert ctx.spend.state(budget_key(sweep)).spent_usd == 0
        server.update(faults=("timeout",), hang_seconds=5)
        ctx2 = make_context(tmp_path, server, GRIDTUNE_MAX_ATTEMPTS=1, GRIDTUNE_REQUEST_TIMEOUT=0.3)
        ctx2.__dict__["redis"] = ctx.redis  # one shared budget, as on one Redis
        run_request(ctx2, sweep.id, 1)
    state = ctx.spend.state(budget_key(sweep))
    # The provider may have run (and billed) the request that timed out: its worst case stays spent.
    assert state.reserved_usd == 0 and state.spent_usd > 0
    assert {r.error_kind for r in store.iter_rows(ctx.engine, sweep.id)} == {"server_error", "timeout"}


def test_the_cap_is_not_part_of_the_config_fingerprint():
    assert parse_config(CONFIG).fingerprint == parse_config(
        CONFIG.replace('max_output_tokens = 200', 'max_output_tokens = 200\nmax_cost_usd = 2.5')).fingerprint


def test_a_cap_on_an_unpriced_model_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/x.db")
    path = tmp_path / "s.toml"
    path.write_text(CONFIG.replace('"gpt-4o-mini"', '"house-model"'), encoding="utf-8")
    assert main(["sweep", "--config", str(path), "--max-cost", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs a price for model 'house-model'" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and the reason, exit 2
        main(["sweep", "--config", str(path), "--max-cost", "-1"])
    assert exit_info.value.code == 2 and "must be more than 0 USD" in capsys.readouterr().err


def test_status_and_list_show_spent_against_the_cap(tmp_path, capsys, monkeypatch):
    with localapi.running() as server:
        ctx = make_context(tmp_path, server)
        sweep = capped_sweep(ctx, 0.5)
        for index in range(3):
            run_request(ctx, sweep.id, index)
    spent = sum(r.cost_usd for r in store.iter_rows(ctx.engine, sweep.id))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/spend.db")
    reset_settings()
    capsys.readouterr()
    assert main(["status", "capped"]) == 0
    assert f"spent ${spent:.4f} of a $0.5000 cap" in capsys.readouterr().out
    assert main(["list"]) == 0
    assert f"spent ${spent:.4f} of $0.5000" in capsys.readouterr().out
    assert main(["estimate", "--config", str(_write(tmp_path)), "--max-cost", "0.0001"]) == 0
    assert "the sweep stops after about" in capsys.readouterr().out


def _write(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


def test_resuming_a_sweep_whose_cap_has_no_room_left_is_refused(tmp_path):
    with localapi.running() as server:
        ctx = make_context(tmp_path, server)
        config = parse_config(CONFIG)
        sweep = capped_sweep(ctx, 1.0)
        run_request(ctx, sweep.id, 0)
    spent = next(store.iter_rows(ctx.engine, sweep.id)).cost_usd
    limiter = MemorySpendLimiter()  # as if Redis had lost the budget: the database's spend is restored
    room = spent + worst_case_cost(config, 0)
    open_spend_budget(ctx.engine, sweep, config, room, limiter)  # exactly one more reply fits
    assert limiter.state(budget_key(sweep)).spent_usd == pytest.approx(spent)
    with pytest.raises(UserError, match=r"has spent \$0.0001 .* pass a higher --max-cost"):
        open_spend_budget(ctx.engine, sweep, config, room * 0.99, limiter)
    assert store.get_sweep_by_id(ctx.engine, sweep.id).max_cost_usd == pytest.approx(room * 0.99)
