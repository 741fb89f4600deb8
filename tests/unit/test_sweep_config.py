"""Sweep configs are validated at load time: every problem is one clear ConfigError."""

import pytest

from gridtune.errors import ConfigError
from gridtune.sweep import load_config, parse_config, request_at

VALID = """
repeats = 2
[dimensions]
age = [18, 40]
power = ["flight", "healing", "telepathy"]
[templates]
prompt = "Describe a {age}-year-old with {power}."
input = "{age}, {power}"
"""


def with_templates(prompt: str, input_: str = "{age}") -> str:
    return VALID.replace('prompt = "Describe a {age}-year-old with {power}."', f"prompt = {prompt!r}").replace(
        'input = "{age}, {power}"', f"input = {input_!r}"
    )


def test_default_config_is_the_tutorials_294_requests():
    config = load_config()
    assert (config.combinations, config.repeats, config.total_requests) == (98, 3, 294)
    first, last = request_at(config, 0), request_at(config, 293)
    assert first.params == {"age": 18, "gender": "man", "power": "invisibility"}
    assert first.input_text == "18, man, invisibility"
    assert "18-year-old man" in first.prompt and first.repeat == 0
    assert last.params == {"age": 90, "gender": "woman", "power": "flight"} and last.repeat == 2


def test_grid_indexing_follows_itertools_product_order():
    import itertools

    config = parse_config(VALID)
    expected = [
        (dict(zip(["age", "power"], combo)), repeat)
        for combo in itertools.product([18, 40], ["flight", "healing", "telepathy"])
        for repeat in range(2)
    ]
    assert [config.params(i) for i in range(config.total_requests)] == expected
    with pytest.raises(IndexError):
        config.params(config.total_requests)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{age.__class__}", "no attribute access or indexing"),
        ("{age[0]}", "no attribute access or indexing"),
        ("{0}", "positional field"),
        ("{}", "positional field"),
        ("{height}", "not a declared dimension"),
        ("{age", "templates.prompt"),
        ("{age:{power}}", "is not allowed"),
        ("{power:d}", "{power:d} is not allowed: write {power}"),
        # issue 13, #10: conversions and format specs change the text silently
        ("{age!r:>10}", "{age!r:>10} is not allowed: write {age}"),
        ("{age!s}", "is not allowed"),
        ("{age:>10}", "is not allowed"),
    ],
)
def test_bad_templates_are_refused_at_load_time(template, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_config(with_templates(template))


def test_input_template_is_checked_too():
    with pytest.raises(ConfigError, match="templates.input"):
        parse_config(with_templates("{age}", "{gender}"))


@pytest.mark.parametrize(
    "text, message",
    [
        (VALID.replace("repeats = 2", "repeats = 0"), "repeats must be at least 1"),
        (VALID.replace("repeats = 2", "repeats = -3"), "repeats must be at least 1"),
        (VALID.replace('age = [18, 40]', "age = []"), "dimension 'age' has no values"),
        (VALID.replace('age = [18, 40]', "age = [18, 18]"), "lists a value twice"),
        (VALID + "\n[model]\ntemperature = 'hot'\n", "model.temperature"),
        (VALID + "\n[model]\ncolour = 1\n", "model.colour"),
        ("repeats = ", "not valid TOML"),
    ],
)
def test_bad_values_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(text, "x.toml")


def test_absurd_grids_are_refused_with_the_count_before_anything_else():
    huge = "[dimensions]\n" + "\n".join(f"d{i} = [{', '.join(str(v) for v in range(10))}]" for i in range(9))
    text = "repeats = 1\n" + huge + '\n[templates]\nprompt = "{d0}"\ninput = "{d1}"\n'
    with pytest.raises(ConfigError, match="1,000,000,000 requests"):
        parse_config(text, "huge.toml", max_requests=5_000_000)


def test_non_utf8_and_binary_files_are_refused(tmp_path):
    latin = tmp_path / "latin.toml"
    latin.write_bytes(VALID.replace("flight", "fl\xefght").encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin)
    binary = tmp_path / "blob.toml"
    binary.write_bytes(b"\x00\x01\x02garbage")
    with pytest.raises(ConfigError, match="binary file"):
        load_config(binary)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")


def test_fingerprint_ignores_the_name_but_not_the_content():
    a = parse_config(VALID)
    assert parse_config('name = "other"\n' + VALID).fingerprint == a.fingerprint
    assert parse_config(VALID.replace("repeats = 2", "repeats = 3")).fingerprint != a.fingerprint
