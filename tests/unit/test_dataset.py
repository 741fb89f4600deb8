"""The finalizer's dataset: filtering, dedup, deterministic split, validation, legacy form."""

import hashlib
import json

from gridtune.sweep import parse_config
from worker.dataset import in_validation, legacy_example, validate_example, write_dataset

CONFIG = """
[dimensions]
n = [1]
[templates]
prompt = "p {n}"
input = "{n}"
system = "You write hero descriptions."
[dataset]
validation_fraction = 0.25
legacy_format = true
"""


def rows(n=40):
    for i in range(n):
        yield ("ok", "stop", f"Hero number {i} is brave.", f"{i}, man, flight")


def test_drops_failed_truncated_and_duplicates_and_splits_deterministically(tmp_path):
    config = parse_config(CONFIG)
    data = list(rows()) + [
        ("failed", None, None, "x"),
        ("ok", "length", "cut off", "y"),
        ("ok", "stop", "Hero number 3 is brave.", "3, man, flight"),  # duplicate pair
    ]
    summary = write_dataset(data, config, tmp_path / "a")
    assert summary.dropped == {"failed": 1, "truncated": 1, "duplicates": 1, "too_long": 0, "invalid": 0}
    assert summary.train.examples + summary.validation.examples == 40
    assert 0 < summary.validation.examples < 20
    lines = summary.train.path.read_text().splitlines()
    assert len(lines) == summary.train.examples
    first = json.loads(lines[0])
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert all(not validate_example(json.loads(line)) for line in lines)
    assert summary.train.sha256 == hashlib.sha256(summary.train.path.read_bytes()).hexdigest()
    assert summary.train.tokens > 40 * 10
    again = write_dataset(data, config, tmp_path / "b")
    assert again.train.path.read_bytes() == summary.train.path.read_bytes()
    legacy = [json.loads(line) for line in summary.legacy_path.read_text().splitlines()]
    assert legacy[0]["prompt"].endswith(" ->") and legacy[0]["completion"].startswith(" ")
    assert legacy[0]["completion"].endswith(" END")


def test_examples_over_the_token_limit_are_dropped_with_a_count(tmp_path):
    config = parse_config(CONFIG + "\n[finetune]\nmax_example_tokens = 60\n")
    data = list(rows(12)) + [("ok", "stop", "word " * 200, "long one")]
    summary = write_dataset(data, config, tmp_path)
    assert summary.dropped["too_long"] == 1


def test_validate_example_names_each_problem():
    assert validate_example([]) == ["not a JSON object"]
    assert validate_example({"messages": []}) == ["`messages` must be a non-empty list"]
    problems = validate_example({"messages": [{"role": "robot", "content": ""}, {"role": "user", "content": "x", "extra": 1}]})
    assert "message 0 has unknown role 'robot'" in problems
    assert "message 0 has empty or non-string content" in problems
    assert "message 1 has unknown keys ['extra']" in problems
    assert "no assistant message" in problems


def test_split_is_stable_and_roughly_the_fraction():
    picks = [in_validation(7, 0.2, f"in {i}", f"out {i}") for i in range(5000)]
    assert picks == [in_validation(7, 0.2, f"in {i}", f"out {i}") for i in range(5000)]
    assert 0.17 < sum(picks) / 5000 < 0.23
    assert not any(in_validation(7, 0.0, "a", "b") for _ in range(3))


def test_legacy_example_uses_the_tutorials_separator_and_stop_word():
    assert legacy_example("18, man, flight", "He flies.") == {
        "prompt": "18, man, flight ->",
        "completion": " He flies. END",
    }
