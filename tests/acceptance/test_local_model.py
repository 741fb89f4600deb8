"""The tutorial with no vendor, in miniature: the packaged SmolLM2 writes the rows, LoRA training
on them lowers validation loss, and the tuned adapter answers through the same API (`ask`).

The README's first command does the same with the full 294-request grid (minutes; measured in
docs/benchmarks.md); here a 15-request grid, short replies and a few training steps keep it to
about two minutes on a quiet 2-core CPU.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import create_engine, text

from tests.acceptance.helpers import run_producer
from tests.support import clean_env

# A minute on a quiet 2-core CPU; much longer when the machine is shared.
pytestmark = pytest.mark.timeout(1200)

CONFIG = """
name = "tiny-local"
repeats = 1
[dimensions]
age = [18, 30, 40, 60, 90]
power = ["flight", "telepathy", "invisibility"]
[templates]
prompt = "Invent a name for a {age}-year-old hero whose superpower is {power}. Answer with the name only."
input = "{age}, {power}"
[model]
name = "smollm2-135m"
temperature = 0            # greedy: short, complete answers and a deterministic split
max_output_tokens = 32
token_param = "max_tokens"
[dataset]
validation_fraction = 0.25
min_examples = 4
[finetune]
backend = "local"
base_model = "smollm2-135m"
batch_size = 4
max_steps = 6
learning_rate = 0.001
max_seq_length = 128
seed = 0
[ask]
max_output_tokens = 24
example = "18, can eat a lot"
"""


def test_local_model_sweep_finetune_and_ask(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(CONFIG)
    env = clean_env()
    done = run_producer(["sweep", "--config", str(config)], env, tmp_path, timeout=1100)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "with the local model smollm2-135m" in done.stderr
    assert "SIMULATED" not in done.stderr

    engine = create_engine(f"sqlite:///{tmp_path / 'gridtune.db'}")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT state, response_text, completion_tokens FROM generations")).all()
        job = conn.execute(text("SELECT * FROM finetune_jobs")).mappings().one()
    engine.dispose()
    assert len(rows) == 15 and {r.state for r in rows} == {"ok"}
    assert all(r.response_text.strip() and 0 < r.completion_tokens <= 32 for r in rows)
    assert len({r.response_text for r in rows}) > 10  # real answers differ (the filler repeats a template)
    assert job["status"] == "succeeded", dict(job)
    assert job["validation_loss_after"] < job["validation_loss_before"]
    adapter = tmp_path / "gridtune-data" / "tiny-local" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]

    # The summary asked the tuned model the config's example, through the API.
    assert "the tuned model, asked '18, can eat a lot':" in done.stdout
    assert "python -m producer ask tiny-local '18, can eat a lot'" in done.stdout
    assert "python -m producer eval tiny-local" in done.stdout  # the way to learn whether it helped

    asked = run_producer(["ask", "tiny-local", "40, flight"], env, tmp_path, timeout=300)
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.strip()
