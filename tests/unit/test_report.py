"""The HTML report builder: data in -> one self-contained, escaped HTML page out (no browser here;
tests/integration/test_report_chromium.py renders it in Chromium)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from producer import report
from tests.report_data import DIMENSIONS, HOSTILE, dataset_report, eval_summary, report_data


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> _Tags:
    parser = _Tags()
    parser.feed(page)
    return parser


def ids(page: str) -> set[str]:
    return {attrs["id"] for _, attrs in parse(page).tags if attrs.get("id")}


def test_full_report_has_heatmaps_tables_curves_and_samples():
    page = report.build_html(report_data())
    found = ids(page)
    assert {"summary", "heatmap-win-rate", "heatmap-check-within_max_words", "heatmap-check-mentions_values",
            "eval-overall", "eval-cells", "samples", "finetune-job", "loss-curves", "dataset-totals",
            "heatmap-coverage", "coverage", "length-histogram", "duplicates", "near-duplicate-pairs",
            "refusals"} <= found
    assert "no-eval" not in found and "no-finetune" not in found
    # 3 dimensions: one panel per pair (age x gender, age x power, gender x power) in each heatmap.
    win = page[page.index('id="heatmap-win-rate"'):page.index("</figure>", page.index('id="heatmap-win-rate"'))]
    assert win.count('id="win-panel-') == 3
    for label in ("age", "gender", "power", "teleport", "90"):
        assert f">{label}<" in win


def test_no_script_no_external_address_and_a_content_security_policy():
    page = report.build_html(report_data())
    tags = parse(page).tags
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed")]
    for _, attrs in tags:
        for name, value in attrs.items():
            assert not (name.startswith("on")), (name, value)
            if name in ("src", "href", "xlink:href"):
                assert value is None or value.startswith(("#", "data:")), (name, value)
    # The only URLs are SVG's XML namespaces, never fetched.
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls == {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_model_text_is_escaped_never_markup():
    data = report_data()
    data["sweep"]["name"] = "<b>heroes</b>"
    page = report.build_html(data)
    assert HOSTILE not in page and "<b>heroes</b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "He eats &lt;b&gt;everything&lt;/b&gt; &amp; more." in page
    tags = [t for t, _ in parse(page).tags]
    assert "script" not in tags and "img" not in tags
    # The text a reader sees is the model's text, verbatim.
    assert HOSTILE in "".join(parse(page).text)


def test_without_eval_says_how_to_run_it_and_still_shows_dataset_and_training():
    page = report.build_html(report_data(evaluation=False))
    found = ids(page)
    assert "no-eval" in found and "heatmap-win-rate" not in found and "samples" not in found
    assert "no evaluation yet: run python -m producer eval superhero" in page
    assert {"loss-curves", "heatmap-coverage", "coverage"} <= found


def test_without_finetune_says_there_are_no_loss_curves():
    page = report.build_html(report_data(evaluation=False, job=False))
    found = ids(page)
    assert "no-finetune" in found and "loss-curves" not in found
    assert "no loss curves" in page


def test_a_bare_sweep_renders():
    page = report.build_html({"sweep": {"name": "fresh"}})
    assert {"no-eval", "no-finetune", "no-dataset"} <= ids(page)


def test_dataset_without_a_report_says_so():
    data = report_data(evaluation=False)
    data["dataset"]["report"] = None
    assert "no-dataset-report" in ids(report.build_html(data))


def test_pair_grid_aggregates_over_the_other_dimensions():
    cells = eval_summary()["cells"][:-1]  # the grid cells, not the free input
    xs = [str(v) for v in DIMENSIONS["gender"]]
    ys = [str(v) for v in DIMENSIONS["age"]]
    grid = report.pair_grid(cells, "gender", "age", xs, ys, report.win_rate)
    mine = [c for c in cells if c["cell"]["age"] == 30 and c["cell"]["gender"] == "woman"]
    assert len(mine) == 7  # one per power
    wins, ties = sum(c["wins"] for c in mine), sum(c["ties"] for c in mine)
    assert grid[ys.index("30")][xs.index("woman")] == pytest.approx((wins + ties / 2) / 14)


def test_win_rate_counts_a_tie_as_half_and_nothing_judged_as_none():
    assert report.win_rate([{"wins": 1, "ties": 1, "losses": 0}]) == 0.75
    assert report.win_rate([{"wins": 0, "ties": 0, "losses": 0}]) is None


def test_check_rate_weights_cells_by_their_inputs():
    cells = [{"n": 3, "checks": {"tuned": {"c": 1.0}}}, {"n": 1, "checks": {"tuned": {"c": 0.0}}},
             {"n": 5, "checks": {}}]
    assert report.check_rate("tuned", "c")(cells) == 0.75


def test_free_inputs_are_in_the_table_and_samples_never_in_the_heatmaps():
    page = report.build_html(report_data())
    heatmaps = page[page.index('id="heatmap-win-rate"'):page.index('id="eval-cells"')]
    assert "can eat a lot" not in heatmaps and "librarian" not in heatmaps
    table = page[page.index('id="eval-cells"'):page.index('id="samples"')]
    assert "age=18, gender=man, power=can eat a lot" in table and "input=a quiet librarian" in table
    free = page[page.index("<h3>Free inputs</h3>"):]
    assert "18, man, can eat a lot" in free and "a quiet librarian" in free
    assert "2 free inputs" in page


def test_one_dimension_is_one_row_and_free_inputs_go_to_the_table():
    data = report_data(job=False, dataset=False)
    summary = data["eval"]
    summary["dimensions"] = ["power"]
    data["sweep"]["dimensions"] = {"power": DIMENSIONS["power"]}
    for cell in summary["cells"]:
        if "power" in cell["cell"]:
            cell["cell"] = {"power": cell["cell"]["power"]}
    page = report.build_html(data)
    assert "heatmap-win-rate" in ids(page)
    table = page[page.index('id="eval-cells"'):]
    assert "input=a quiet librarian" in table
    assert "2 free inputs" in page


def test_losses_from_local_and_openai_events():
    events = [None, {"type": "status"}, {"type": "metrics", "step": 0, "validation_loss": 3.3},
              {"type": "metrics", "step": 1, "epoch": 1, "loss": 3.5}, {"type": "metrics", "step": 2, "loss": 3.1},
              {"type": "metrics", "step": 2, "validation_loss": 3.2},
              {"type": "metrics", "step": 3, "train_loss": 2.9, "valid_loss": 3.0, "total_steps": 3},
              {"type": "metrics", "step": 4, "loss": float("nan")}]
    assert report.losses_from_events(events) == {"train": [[1.0, 3.5], [2.0, 3.1], [3.0, 2.9]],
                                                 "validation": [[0.0, 3.3], [2.0, 3.2], [3.0, 3.0]]}


def test_the_page_stays_small():
    # Text-as-text SVG keeps the tutorial's grid (98 cells, 3 dimensions) well under a megabyte.
    assert len(report.build_html(report_data()).encode()) < 600_000


def test_an_unfinished_evaluation_says_so():
    data = report_data(job=False, dataset=False)
    data["eval"].update(state="judging", answers={"done": 198, "total": 198}, judgements={"done": 40, "total": 198})
    page = report.build_html(data)
    assert "eval-unfinished" in ids(page)
    assert "state judging: 198 of 198 answers, 40 of 198 verdicts" in page


def test_collect_reads_the_store(tmp_path):
    """collect() on a finalized sweep (SQLite) with a local job's step events: the report's data."""
    from models import store
    from tests.unit.test_finetune_helpers import make_context, make_sweep

    ctx = make_context(tmp_path)
    sweep, dataset_id = make_sweep(ctx)
    job = store.create_job(ctx.engine, sweep.id, dataset_id, "local", "smollm2-135m")
    for data in ({"type": "metrics", "step": 0, "validation_loss": 3.3}, {"type": "metrics", "step": 1, "loss": 3.5},
                 {"type": "metrics", "step": 2, "loss": 3.0}, {"type": "metrics", "step": 2, "validation_loss": 3.1}):
        store.add_event(ctx.engine, job.id, "step", data=data)
    data = report.collect(ctx.engine, "heroes")
    assert data["sweep"]["name"] == "heroes" and data["sweep"]["dimensions"] == {
        k: list(v) for k, v in store.sweep_config(sweep).dimensions.items()}
    assert data["counts"]["ok"] == data["counts"]["total"] > 0
    dataset = store.get_dataset(ctx.engine, dataset_id)
    assert data["dataset"]["train_examples"] == dataset.train_examples
    assert data["job"]["status"] == "pending" and data["job"]["backend"] == "local"
    assert data["losses"] == {"train": [[1.0, 3.5], [2.0, 3.0]], "validation": [[0.0, 3.3], [2.0, 3.1]]}
    assert data["eval"] is None  # no evaluation of this sweep
    page = report.build_html(data)
    assert {"summary", "finetune-job", "loss-curves", "dataset-totals", "no-eval"} <= ids(page)

    # The finalizer stores the dataset report with the dataset (and as report.json).
    assert data["dataset"]["report"]["totals"]["requests"] == sweep.total_requests
    # A dataset report left beside train.jsonl (report.json) is read when the row has none (a
    # dataset finalized before the report column existed).
    from sqlalchemy import update

    from models import session_scope
    from models.schema import Dataset

    with session_scope(ctx.engine) as session:
        session.execute(update(Dataset).where(Dataset.id == dataset_id).values(report=None))
    Path(dataset.train_path).with_name("report.json").write_text(json.dumps(dataset_report()))
    assert report.collect(ctx.engine, "heroes")["dataset"]["report"]["totals"]["requests"] == 294


def test_report_command_writes_the_file_and_refuses_an_unknown_sweep(tmp_path, monkeypatch, capsys):
    from producer.cli import main
    from tests.unit.test_finetune_helpers import make_context, make_sweep

    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/gridtune.db")
    monkeypatch.setenv("GRIDTUNE_DATA_DIR", str(tmp_path / "data"))
    make_sweep(make_context(tmp_path))
    from gridtune.settings import reset_settings

    reset_settings()
    assert main(["report", "heroes"]) == 0
    page = tmp_path / "data" / "heroes" / "report.html"
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert f"wrote the report of heroes to {page}" in capsys.readouterr().err
    assert main(["report", "heroes", "--out", str(tmp_path / "elsewhere.html")]) == 0
    assert (tmp_path / "elsewhere.html").exists()
    assert main(["report", "nobody"]) == 2
    assert "no sweep named 'nobody'" in capsys.readouterr().err
