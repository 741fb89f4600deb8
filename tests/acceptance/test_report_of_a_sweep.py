"""`python -m producer report NAME` on a real sweep, opened in headless Chromium.

A two-dimension sweep runs end to end in embedded mode (SQLite, in-process worker) against the
simulated local server, fine-tune included (the server's simulated job logs a training loss per
step); then `report` writes the page from what the store holds, and Chromium shows the fine-tune
job, its loss curve, the dataset's tables and what is not there yet (no evaluation).
"""

from __future__ import annotations

import pytest

import localapi
from tests.acceptance.helpers import run_producer
from tests.chromium import dump_dom
from tests.support import clean_env

pytestmark = pytest.mark.timeout(300)

CONFIG = """
repeats = 1
[dimensions]
age = [18, 20, 30, 40, 50, 60, 90]
power = ["flight", "telepathy"]
[templates]
prompt = "Describe a {age}-year-old hero who has the power of {power} in two sentences."
input = "{age}, {power}"
[model]
max_output_tokens = 120
[dataset]
min_examples = 1
[finetune]
backend = "openai"
"""


def test_report_of_a_real_sweep_in_chromium(tmp_path):
    config = tmp_path / "heroes.toml"
    config.write_text(CONFIG, encoding="utf-8")
    with localapi.running() as api:
        env = clean_env(DATABASE_URL=f"sqlite:///{tmp_path / 'report.db'}", OPENAI_API_KEY="sk-test-report",
                        OPENAI_BASE_URL=api.base_url, GRIDTUNE_DATA_DIR=str(tmp_path / "data"),
                        GRIDTUNE_FINETUNE_POLL_SECONDS="0.5")
        done = run_producer(["sweep", "--config", str(config), "--name", "heroes"], env, tmp_path, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]

    written = run_producer(["report", "heroes"], env, tmp_path, timeout=120)
    assert written.returncode == 0, written.stderr
    page = tmp_path / "data" / "heroes" / "report.html"
    assert f"wrote the report of heroes to {page}" in written.stderr
    dom = dump_dom(page, tmp_path / "profile")

    assert 'id="finetune-job"' in dom and "succeeded" in dom
    loss = dom[dom.index('id="loss-curves"'):]
    assert loss.index("<svg") < loss.index("</figure>")  # the curve is there, as SVG
    assert 'id="dataset-totals"' in dom
    assert "no evaluation yet: run python -m producer eval heroes" in dom
    assert "<script" not in dom

    missing = run_producer(["report", "nobody"], env, tmp_path, timeout=60)
    assert missing.returncode == 2 and "no sweep named 'nobody'" in missing.stderr
