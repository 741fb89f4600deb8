"""Mutation check for docs/reliability.md: remove each guarantee's mechanism, run the tests that
claim to prove it, and expect them to FAIL (the mutant is "killed").

Each mutant is one textual replacement in one file. The check runs in a throw-away copy of the
working tree (tracked and untracked, not ignored, files), so the checkout you work in is never
touched and tests running there meanwhile are unaffected. Not part of the normal CI run: the
acceptance mutants start real worker processes (a full run takes about 10 minutes).

    python bench/mutants.py                 # every mutant
    python bench/mutants.py --fast          # unit/integration tests only (about 2 minutes)
    python bench/mutants.py finalizer-claim cool-down   # just these
    python bench/mutants.py --list
    python bench/mutants.py --baseline      # the same tests on the unmutated copy must pass

Exit status 0 when every mutant selected was killed (and, with --baseline, the copy passed).
Use the same environment as the test suite (GRIDTUNE_TEST_REDIS_DB etc.; Redis and PostgreSQL
running). A mutant whose `find` text no longer occurs exactly once is reported as STALE: the code
moved, update the mutant (and docs/reliability.md) with it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    guarantee: str  # the docs/reliability.md section it belongs to
    path: str
    find: str
    replace: str
    tests: tuple[str, ...]  # each must fail on the mutant

    @property
    def slow(self) -> bool:
        return any(t.startswith("tests/acceptance/") for t in self.tests)


REL = "tests/acceptance/test_reliability.py"
MUTANTS = [
    Mutant("insert-or-ignore", "§1 one row per request", "models/store.py",
           '            .on_conflict_do_nothing(index_elements=["sweep_id", "request_index"])\n'
           '            .returning(Generation.__table__.c.id)  # rowcount',
           '            .returning(Generation.__table__.c.id)  # rowcount',
           ("tests/unit/test_guarantees.py::test_a_second_insert_for_a_request_is_ignored",)),
    Mutant("redelivery-check", "§1 one row per request", "worker/generation.py",
           "    if stored:\n        return Outcome(attempts=attempts, rate_limited=rate_limited)  # redelivered",
           "    if False:\n        return Outcome(attempts=attempts, rate_limited=rate_limited)  # redelivered",
           ("tests/unit/test_generation.py::test_a_request_stores_one_ok_row_and_is_never_sent_twice",)),
    Mutant("resume-keeps-failed-rows", "§1 one row per request", "models/store.py",
           "            delete(Generation).where(Generation.sweep_id == sweep_id, Generation.state != RowState.OK)",
           "            delete(Generation).where(Generation.sweep_id == sweep_id, Generation.state == 'nothing')",
           ("tests/acceptance/test_commands.py::test_resume_retries_failed_rows_replace_config_and_the_commands_report_it",)),
    Mutant("internal-failure-row", "§1/§5 unexpected errors become failed rows", "worker/tasks.py",
           "            record_internal_failure(ctx, sweep_id, index, exc)", "            pass",
           ("tests/unit/test_generate_task.py::test_an_unexpected_error_becomes_a_failed_internal_row_and_the_task_succeeds",)),
    Mutant("finalizer-claim", "§2 finalizer once", "models/store.py",
           ".where(Sweep.id == sweep_id, Sweep.state.in_([SweepState.RUNNING, SweepState.STOPPED]))",
           ".where(Sweep.id == sweep_id)",
           ("tests/unit/test_finalizer_once.py::test_a_second_delivery_of_the_chord_body_does_nothing",
            "tests/unit/test_finalizer_once.py::test_concurrent_deliveries_claim_the_sweep_once")),
    Mutant("finalizer-missing-rows", "§2 incomplete chord does nothing", "worker/dataset.py",
           "    if counts.missing:\n", "    if False:\n",
           ("tests/unit/test_finalizer_once.py::test_an_incomplete_chord_does_nothing",)),
    Mutant("acks-late", "§3 worker killed", "worker/app.py",
           "        task_acks_late=True,\n", "        task_acks_late=False,\n",
           (f"{REL}::test_worker_sigkilled_twice",)),
    Mutant("restore-throttle", "§3 restore latency", "worker/app.py",
           '        "unacked_restore_throttle": 1,\n', "",
           (f"{REL}::test_worker_sigkilled_twice",)),
    Mutant("watchdog-sweep-wait", "§3 stall watchdog (sweep --wait)", "producer/cli.py",
           "in_flight=_in_flight_counter(engine, name), on_tick=_stall_watch(engine, name))",
           "in_flight=_in_flight_counter(engine, name))",
           ("tests/acceptance/test_stall_recovery.py::test_sweep_wait_and_status_watch_resume_a_stalled_sweep",)),
    Mutant("watchdog-status-watch", "§3 stall watchdog (status --watch)", "producer/cli.py",
           "                               on_tick=_stall_watch(engine, args.name))",
           "                               )",
           ("tests/acceptance/test_stall_recovery.py::test_sweep_wait_and_status_watch_resume_a_stalled_sweep",)),
    Mutant("watchdog-unacked", "§3 stall watchdog (a held message is not a stall)", "producer/recovery.py",
           '    pipe.hlen("unacked")\n', "",
           ("tests/unit/test_stall_watch.py::test_broker_idle_sees_queued_priority_and_unacked_messages",)),
    Mutant("kombu-guard", "§4 workers survive broker loss", "worker/app.py",
           "\nguard_closed_transport()\n", "\n",
           ("tests/unit/test_broker_guard.py",)),
    Mutant("redis-errors-retried", "§4 Redis errors retried, never failed rows", "worker/tasks.py",
           "    except (*DB_UNAVAILABLE, redis.ConnectionError, redis.TimeoutError) as exc:",
           "    except DB_UNAVAILABLE as exc:",
           # (test_broker_lost_and_restarted_empty asserts no failed rows too, but since Redis errors
           # after the API answered are skipped (_bookkeeping), a task rarely meets the loss in
           # reserve(): that test does not kill this mutant reliably.)
           ("tests/unit/test_generate_task.py::test_redis_unreachable_means_retry_later_never_a_failed_row",)),
    Mutant("redis-after-answer-bookkeeping", "§4 Redis lost after the API answered: answer stored", "worker/generation.py",
           "    _bookkeeping(trip.execute)",
           "    trip.execute()",
           ("tests/unit/test_generate_task.py::test_redis_lost_after_the_api_answered_the_answer_is_stored",)),
    Mutant("noscript-reload", "§4 Redis restarted empty: scripts are loaded again", "worker/ratelimit/roundtrip.py",
           "                answer = script(keys=keys, args=args)  # loads the script, then runs it",
           "                pass",
           ("tests/unit/test_roundtrip.py::test_a_script_the_server_lost_is_loaded_and_run_once",)),
    Mutant("slot-wake-up", "in-flight slots handed over at once", "worker/ratelimit/concurrency_common.lua",
           '    for _ = have + 1, want do redis.call("RPUSH", wakeups, 1) end',
           "    -- no wake-up",
           ("tests/unit/test_inflight_limit.py::test_a_released_slot_goes_to_a_blocked_waiter_at_once_not_at_its_next_poll",
            "tests/unit/test_inflight_limit.py::test_contending_threads_keep_every_slot_busy")),
    Mutant("growth-band", "in-flight limit: latency near unloaded", "worker/ratelimit/concurrency_release.lua",
           "    elseif near and in_flight * 2 >= limit then",
           "    elseif in_flight * 2 >= limit then",
           ("tests/unit/test_inflight_limit.py::test_the_limit_finds_the_servers_capacity_and_latency_stays_near_unloaded",)),
    Mutant("cool-down", "§5 a 429 pauses the cluster", "worker/generation.py",
           "                ctx.limiter.cool_down(key, wait)  # the whole cluster pauses, not just this task",
           "                pass",
           ("tests/unit/test_cool_down.py",)),
    Mutant("no-retry-on-permanent", "§5 permanent errors are not retried", "worker/generation.py",
           "                give_up = not failure.retryable or attempts - rate_limited >= settings.max_attempts",
           "                give_up = attempts - rate_limited >= settings.max_attempts",
           ("tests/unit/test_guarantees.py::test_permanent_errors_are_sent_once",)),
    Mutant("redact", "§8 secrets", "worker/llm.py",
           '    return text.replace(key, "***") if len(key) >= 8 else text', "    return text",
           ("tests/unit/test_guarantees.py::test_stored_errors_never_carry_the_key",)),
    Mutant("shared-budget", "rate budget shared by the cluster", "worker/llm.py",
           '    return f"{model}:{digest}"', '    return f"{model}:{digest}:{__import__(\'os\').getpid()}"',
           ("tests/acceptance/test_rate_budget.py::test_four_workers_share_one_budget_and_stay_under_the_limit",)),
    Mutant("production-burst", "rate budget bursts 0.5 s", "worker/context.py",
           "RateLimiter(self.redis, burst_seconds=self.settings.burst_seconds, fallback=Limits(),",
           "RateLimiter(self.redis, fallback=Limits(),",
           ("tests/unit/test_ratelimit_production_burst.py",)),
    Mutant("finetune-queue", "local training on the finetune queue", "worker/app.py",
           '        task_routes={"gridtune.finetune_local": {"queue": "finetune"},\n', '        task_routes={',
           ("tests/unit/test_guarantees.py::test_local_training_is_published_to_the_finetune_queue",)),
    Mutant("token-framing", "token counts", "worker/tokens.py",
           "TOKENS_PER_MESSAGE = 3\n", "TOKENS_PER_MESSAGE = 4\n",
           ("tests/unit/test_guarantees.py::test_token_counts_match_openais_published_examples",)),
    Mutant("replace-config", "§7 --replace-config", "models/store.py",
           "            sweep.config = config.snapshot()\n", "",
           ("tests/acceptance/test_commands.py::test_resume_retries_failed_rows_replace_config_and_the_commands_report_it",)),
]


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def apply(mutant: Mutant, tree: Path) -> bool:
    path = tree / mutant.path
    text = path.read_text(encoding="utf-8")
    if text.count(mutant.find) != 1:
        return False
    path.write_text(text.replace(mutant.find, mutant.replace), encoding="utf-8")
    return True


def run_test(test: str, tree: Path) -> tuple[int, float]:
    started = time.monotonic()
    # The copy first on PYTHONPATH: processes the tests start elsewhere (the producer runs in the
    # test's tmp folder) would otherwise import the original tree through the editable install.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test],
                            cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    log = tree.parent / f"{tree.name}.{test.replace('/', '_').replace(':', '_')}.log"
    log.write_text(result.stdout + result.stderr)
    return result.returncode, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--fast", action="store_true", help="skip mutants whose tests start worker processes")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--baseline", action="store_true", help="also run every selected test unmutated")
    parser.add_argument("--keep", action="store_true", help="keep the copies and logs (printed)")
    args = parser.parse_args()

    selected = [m for m in MUTANTS if (not args.names or m.name in args.names) and not (args.fast and m.slow)]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    if args.list:
        for m in selected:
            print(f"{m.name:24} {m.guarantee:48} {m.path}  ->  {', '.join(m.tests)}")
        return 0

    work = Path(tempfile.mkdtemp(prefix="gridtune-mutants-"))
    failures = 0
    try:
        if args.baseline:
            tree = work / "baseline"
            copy_tree(tree)
            for test in sorted({t for m in selected for t in m.tests}):
                rc, took = run_test(test, tree)
                ok = rc == 0
                failures += not ok
                print(f"{'PASS' if ok else 'FAIL':7} baseline  {test}  ({took:.0f}s)", flush=True)
        for mutant in selected:
            tree = work / mutant.name
            copy_tree(tree)
            if not apply(mutant, tree):
                failures += 1
                print(f"STALE   {mutant.name}: {mutant.find!r} is not in {mutant.path} exactly once", flush=True)
                continue
            for test in mutant.tests:
                rc, took = run_test(test, tree)
                killed = rc == 1  # tests failed; 2-5 are usage/collection/internal errors
                failures += not killed
                verdict = "KILLED" if killed else ("SURVIVED" if rc == 0 else f"ERROR{rc}")
                print(f"{verdict:8} {mutant.name:24} {test}  ({took:.0f}s)", flush=True)
    finally:
        if args.keep:
            print(f"copies and logs in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
