import pytest

from worker.ratelimit import parse_go_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("2m59.56s", 179.56),
        ("1.5s", 1.5),
        ("20ms", 0.02),
        ("1h2m3s", 3723.0),
        ("0s", 0.0),
        ("0", 0.0),
        ("1\u00b5s", 1e-6),  # micro sign
        ("1\u03bcs", 1e-6),  # Greek mu
        ("250us", 250e-6),
        ("15ns", 15e-9),
        (".5s", 0.5),
        ("5.s", 5.0),
        ("1m1ms", 60.001),
        ("-1.5h", -5400.0),
        ("+2s", 2.0),
    ],
)
def test_parses_go_durations(text, seconds):
    assert parse_go_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "text",
    ["", "s", "1", "12", "-", "abc", "1x", "1.2.3s", "--1s", "1s2", " 1s", "1s ", "1e3s", "ms", ".s", "1 s", "1S", "1sec"],
)
def test_rejects_garbage(text):
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_rejects_an_infinite_duration():
    with pytest.raises(ValueError):
        parse_go_duration("9" * 400 + "s")


def test_rejects_non_strings():
    with pytest.raises(ValueError):
        parse_go_duration(1.5)  # type: ignore[arg-type]
