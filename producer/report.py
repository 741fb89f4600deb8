"""The sweep's report: one self-contained HTML file people open in a browser (`report NAME`).

Who does what: matplotlib draws the heatmaps, the loss curves and the length histogram as SVG
(text kept as text, so the file stays small), inlined into the page; the standard library's
`html.escape` escapes every string that comes from data (model answers are untrusted); the page
has no script and no external address, and its Content-Security-Policy forbids loading anything,
so it works offline and cannot phone home.

`build_html(data)` is a plain function, data in -> HTML string out; `collect(engine, name)` reads
the store into that data. The data's shape (every key but "sweep" may be missing or None):

    {"sweep": {"name", "state", "model", "dimensions": {name: [values]}, "total_requests"},
     "counts": {"total", "ok", "failed", "truncated", "prompt_tokens", "completion_tokens",
                "cost_usd"},
     "dataset": {"train_examples", "validation_examples", "train_tokens", "validation_tokens",
                 "dropped": {reason: n}, "report": <the dataset report (worker.dataset)>},
     "job": {"backend", "base_model", "status", "fine_tuned_model", "train_loss",
             "validation_loss_before", "validation_loss_after", "error_message"},
     "losses": {"train": [[step, loss], ...], "validation": [[step, loss], ...]},
     "eval": <eval_summary(engine, name)>,
     "generated_at": "ISO 8601 time"}

Losses are mean token cross-entropy in nats; costs are USD.
"""

from __future__ import annotations

import io
import json
import math
import re
from datetime import datetime, timezone
from html import escape
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Iterable

# How many cells of each end ("best", "worst" by win rate) get side-by-side samples.
SAMPLE_CELLS = 3
SAMPLES_PER_CELL = 2
# Tables list at most this many rows (the per-cell tables of a large grid, duplicate pairs).
MAX_TABLE_ROWS = 200

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:.6em 0}figure svg{max-width:100%;height:auto}figcaption{color:#555}
.note{color:#555;font-style:italic}.pair{display:grid;grid-template-columns:1fr 1fr;gap:.6em}
.pair pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em;margin:0;border:1px solid #e4e4e4}
.sample{margin:1em 0}.muted{color:#777}
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


# --- small helpers ----------------------------------------------------------------------------------
def _text(value: Any) -> str:
    """Any value as escaped HTML text ("-" for None)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return escape(f"{value:.4g}")
    return escape(str(value))


def _usd(value: float | None) -> str:
    return "n/a" if value is None else f"${value:,.4f}"


def _rate(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.0%}"


def _table(headers: Iterable[str], rows: Iterable[Iterable[Any]], *, table_id: str | None = None,
           numeric: Iterable[int] = ()) -> str:
    """An HTML table; every header and cell is escaped (cells pass through _text)."""
    numeric = set(numeric)
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for count, row in enumerate(rows):
        if count == MAX_TABLE_ROWS:
            body.append(f'<tr><td colspan="99" class="note">(only the first {MAX_TABLE_ROWS} rows)</td></tr>')
            break
        body.append("<tr>" + "".join(
            f'<td class="n">{_text(v)}</td>' if i in numeric else f"<td>{_text(v)}</td>"
            for i, v in enumerate(row)) + "</tr>")
    ident = f' id="{escape(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _pair(loss: dict[str, Any] | None) -> str:
    """"base → tuned" of a {"base", "tuned"} pair (losses in nats), "n/a" without one."""
    if not loss or (loss.get("base") is None and loss.get("tuned") is None):
        return "n/a"
    return f"{_text(loss.get('base'))} → {_text(loss.get('tuned'))}"


def _cell_label(cell: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in cell.items())


def _is_grid_cell(record: dict[str, Any], dimensions: list[str]) -> bool:
    """A per-cell record of a cell of the grid: every dimension has a value and it is not a free input
    ([eval] inputs: {"input": text}, or parsed into dimension values that may lie off the grid)."""
    cell = record.get("cell") or {}
    return bool(dimensions) and all(d in cell for d in dimensions) and record.get("source") != "free_input"


def _key(cell: dict[str, Any] | None) -> str:
    return json.dumps(cell or {}, sort_keys=True, default=str)


# --- figures (matplotlib -> inline SVG) --------------------------------------------------------------
def _svg(fig, salt: str) -> str:
    """The figure as an inline <svg> element: text as text (small), no date (reproducible), ids salted
    per figure so that several SVGs in one page never share a clip-path id."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    # Drop the XML prolog and the RDF metadata (the only addresses in it; never fetched, but noise).
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text[text.index("<svg"):], flags=re.S)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    # Constrained layout leaves room for long tick labels ("read in the thoughts") between panels.
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _axis_values(cells: list[dict[str, Any]], dimension: str, known: list[Any] | None) -> list[str]:
    """The values of `dimension` as labels: the config's order, then any other value seen in the cells."""
    values = [str(v) for v in known or []]
    for cell in cells:
        value = str(cell["cell"].get(dimension))
        if value not in values:
            values.append(value)
    return values


def pair_grid(cells: list[dict[str, Any]], x: str, y: str, xs: list[str], ys: list[str],
              aggregate: Callable[[list[dict[str, Any]]], float | None]) -> list[list[float | None]]:
    """rows (one per y value) of aggregate(the cells with that x and y value), over every other dimension.

    `cells` are per-cell records {"cell": {dimension: value}, ...}; values are matched as strings.
    None where no cell has that pair (or `aggregate` says there is nothing to show).
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((str(cell["cell"].get(y)), str(cell["cell"].get(x))), []).append(cell)
    return [[aggregate(groups[(yv, xv)]) if (yv, xv) in groups else None for xv in xs] for yv in ys]


def win_rate(cells: list[dict[str, Any]]) -> float | None:
    """(wins + ties / 2) / judged pairs over `cells`; None when none was judged."""
    wins = sum(c.get("wins") or 0 for c in cells)
    ties = sum(c.get("ties") or 0 for c in cells)
    judged = wins + ties + sum(c.get("losses") or 0 for c in cells)
    return (wins + ties / 2) / judged if judged else None


def check_rate(side: str, check: str) -> Callable[[list[dict[str, Any]]], float | None]:
    """The pass rate of `check` for `side` ("base"/"tuned") over cells, weighted by each cell's n."""

    def aggregate(cells: list[dict[str, Any]]) -> float | None:
        total = weight = 0.0
        for cell in cells:
            rate = ((cell.get("checks") or {}).get(side) or {}).get(check)
            if rate is not None:
                n = cell.get("n") or 1
                total += rate * n
                weight += n
        return total / weight if weight else None

    return aggregate


def summed(key: str) -> Callable[[list[dict[str, Any]]], float | None]:
    return lambda cells: float(sum(c.get(key) or 0 for c in cells))


def heatmap_svg(cells: list[dict[str, Any]], dimensions: list[str], values: dict[str, list[Any]],
                aggregate: Callable[[list[dict[str, Any]]], float | None], *, title: str, salt: str,
                rate: bool = True, cmap: str = "RdYlGn") -> str:
    """One heatmap per pair of dimensions (the others aggregated), side by side, as one inline SVG.

    One dimension: a single row. `rate` scales colours 0..1 and writes percentages; else counts.
    """
    import numpy as np

    pairs = list(combinations(dimensions, 2)) if len(dimensions) > 1 else [(dimensions[0], None)]
    grids = []
    for x, y in pairs:
        xs = _axis_values(cells, x, values.get(x))
        ys = _axis_values(cells, y, values.get(y)) if y else [""]
        grid = pair_grid(cells, x, y, xs, ys, aggregate) if y else [
            [aggregate([c for c in cells if str(c["cell"].get(x)) == xv]) for xv in xs]]
        grids.append((x, y, xs, ys, np.array([[np.nan if v is None else v for v in row] for row in grid], float)))
    finite = [a[np.isfinite(a)] for *_, a in grids]
    top = max((float(a.max()) for a in finite if a.size), default=1.0) or 1.0
    vmin, vmax = (0.0, 1.0) if rate else (0.0, top)
    label_width = 0.07 * max(len(v) for *_, ys, _ in grids for v in ys)  # inches of y tick labels
    width = sum(0.5 * len(xs) + 0.8 + label_width for _, _, xs, _, _ in grids) + 1
    height = max(2.2, 0.4 * max(len(ys) for *_, ys, _ in grids) + 1.6)
    fig = _figure(min(width, 16), height)
    axes = fig.subplots(1, len(grids), squeeze=False,
                        gridspec_kw={"width_ratios": [len(xs) for _, _, xs, _, _ in grids]})[0]
    image = None
    for i, (ax, (x, y, xs, ys, grid)) in enumerate(zip(axes, grids)):
        ax.set_gid(f"{salt}-panel-{i}")  # the SVG group's id: one per pair of dimensions
        image = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        slanted = max(map(len, xs)) > 6
        ax.set_xticks(range(len(xs)), xs, rotation=45 if slanted else 0, ha="right" if slanted else "center",
                      fontsize=8)
        ax.set_yticks(range(len(ys)), ys, fontsize=8)
        ax.set_xlabel(x)
        if y:
            ax.set_ylabel(y)
        for (row, col), value in np.ndenumerate(grid):
            if np.isfinite(value):
                label = f"{value:.0%}" if rate else f"{value:g}"
                shade = (value - vmin) / ((vmax - vmin) or 1)
                ax.text(col, row, label, ha="center", va="center", fontsize=7,
                        color="white" if (cmap == "Blues" and shade > 0.6) else "black")
    fig.colorbar(image, ax=list(axes), fraction=0.03, pad=0.01)
    fig.suptitle(title, fontsize=10)
    return _svg(fig, salt)


def loss_svg(losses: dict[str, list[list[float]]]) -> str:
    """Training and validation loss (nats) against the optimizer step, one inline SVG."""
    fig = _figure(6.5, 3.2)
    ax = fig.subplots()
    for key, label, style in (("train", "training loss", "-"), ("validation", "validation loss", "o--")):
        points = sorted(losses.get(key) or [])
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _svg(fig, "losses")


def lengths_svg(lengths: dict[str, Any]) -> str:
    """The answers' length histogram (edges and counts as the dataset report gives them)."""
    edges, counts = lengths.get("edges") or [], lengths.get("counts") or []
    fig = _figure(6.5, 2.8)
    ax = fig.subplots()
    if len(edges) == len(counts) + 1:
        ax.stairs(counts, edges, fill=True, alpha=0.7)
    for key, style in (("p50", "--"), ("p90", ":")):
        if lengths.get(key) is not None:
            ax.axvline(lengths[key], linestyle=style, color="black", label=f"{key} {lengths[key]:g}")
    ax.set_xlabel(f"answer length ({lengths.get('unit', 'words')})")
    ax.set_ylabel("answers")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _svg(fig, "lengths")


def _figure_html(svg: str, ident: str, caption: str) -> str:
    return f'<figure id="{escape(ident)}" class="chart">{svg}<figcaption>{escape(caption)}</figcaption></figure>'


# --- sections ---------------------------------------------------------------------------------------
def _summary_section(data: dict[str, Any]) -> str:
    sweep, counts = data["sweep"], data.get("counts") or {}
    dataset, job = data.get("dataset") or {}, data.get("job") or {}
    evaluation = data.get("eval") or {}
    cost = evaluation.get("cost_usd") or {}
    rows = [
        ("sweep state", sweep.get("state")),
        ("generation model", sweep.get("model")),
        ("requests", counts.get("total", sweep.get("total_requests"))),
        ("ok / failed / truncated", f"{counts.get('ok', '-')} / {counts.get('failed', '-')} / "
                                    f"{counts.get('truncated', '-')}"),
        ("tokens (prompt / completion)", f"{counts.get('prompt_tokens', '-')} / {counts.get('completion_tokens', '-')}"),
        ("generation cost", _usd(counts.get("cost_usd"))),
        ("training / validation examples", f"{dataset.get('train_examples', '-')} / "
                                           f"{dataset.get('validation_examples', '-')}"),
        ("fine-tune", f"{job.get('backend', '-')} {job.get('base_model', '')}: {job.get('status', 'none')}"
         if job else "none"),
        ("tuned model", job.get("fine_tuned_model")),
    ]
    if evaluation:
        rows += [("evaluation inputs / judged", f"{evaluation.get('inputs', '-')} / {evaluation.get('judged', '-')}"),
                 ("evaluation cost (answers + judge)",
                  _usd(None if not cost else sum(v or 0 for v in cost.values())))]
    return "<h2>Summary</h2>" + _table(["", "value"], rows, table_id="summary")


def _eval_section(data: dict[str, Any]) -> str:
    evaluation = data.get("eval")
    name = data["sweep"]["name"]
    if not evaluation:
        return ('<h2>Did the fine-tune help?</h2><p class="note" id="no-eval">no evaluation yet: run '
                f"python -m producer eval {escape(name)}</p>")
    dims = list(evaluation.get("dimensions") or data["sweep"].get("dimensions") or [])
    values = data["sweep"].get("dimensions") or {}
    values = values if isinstance(values, dict) else {}
    cells = evaluation.get("cells") or []
    grid_cells = [c for c in cells if _is_grid_cell(c, dims)]
    free_cells = [c for c in cells if not _is_grid_cell(c, dims)]
    overall = evaluation.get("overall") or {}
    parts = ["<h2>Did the fine-tune help?</h2>"]
    if evaluation.get("state") not in (None, "done"):
        answers, judged = evaluation.get("answers") or {}, evaluation.get("judgements") or {}
        parts.append(f'<p class="note" id="eval-unfinished">the evaluation is not finished (state '
                     f"{escape(str(evaluation['state']))}: {_text(answers.get('done'))} of {_text(answers.get('total'))} "
                     f"answers, {_text(judged.get('done'))} of {_text(judged.get('total'))} verdicts): re-run python -m "
                     f"producer eval {escape(name)} to finish it; what is below is partial.</p>")
    if evaluation.get("validation_loss_error"):
        parts.append(f'<p class="note">no validation loss: {escape(str(evaluation["validation_loss_error"]))}</p>')
    loss = overall.get("validation_loss") or {}
    parts.append(_table(
        ["base model", "tuned model", "judge", "wins", "ties", "losses", "win rate", "invalid verdicts",
         "validation loss base → tuned"],
        [[evaluation.get("base_model"), evaluation.get("tuned_model"), evaluation.get("judge_model"),
          overall.get("wins"), overall.get("ties"), overall.get("losses"), _rate(overall.get("win_rate")),
          overall.get("invalid_verdicts"), _pair(loss)]],
        table_id="eval-overall"))
    parts.append('<p class="muted">win rate = (wins + ties/2) / judged pairs; each pair is judged twice with '
                 "the positions swapped, a disagreement is a tie.</p>")
    checks = sorted({name for c in cells for side in (c.get("checks") or {}).values() for name in (side or {})})
    if grid_cells:
        parts.append(_figure_html(
            heatmap_svg(grid_cells, dims, values, win_rate, title="win rate of tuned vs base", salt="win"),
            "heatmap-win-rate", "Win rate of the tuned model against its base per cell (green: tuned better); "
            "each panel is a pair of dimensions, the others aggregated."))
        for check in checks:
            parts.append(_figure_html(
                heatmap_svg(grid_cells, dims, values, check_rate("tuned", check),
                            title=f"tuned model: {check} pass rate", salt=f"check-{check}"),
                f"heatmap-check-{re.sub(r'[^a-z0-9_-]', '-', check.lower())}",
                f"Share of the tuned model's answers passing the check {check!r} per cell."))
    losses = any(c.get("validation_loss") for c in cells)  # remote jobs: the provider may give none
    rows = []
    for c in cells:
        cell_checks = c.get("checks") or {}
        rows.append([_cell_label(c.get("cell") or {}), c.get("source"), c.get("n"), c.get("wins"), c.get("ties"),
                     c.get("losses"), _rate(c.get("win_rate"))]
                    + [f"{_rate((cell_checks.get('base') or {}).get(k))} → {_rate((cell_checks.get('tuned') or {}).get(k))}"
                       for k in checks]
                    + ([_pair(c.get("validation_loss"))] if losses else []))
    headers = ["cell", "source", "n", "wins", "ties", "losses", "win rate"] + [f"{k} base → tuned" for k in checks] \
        + (["validation loss base → tuned"] if losses else [])
    parts.append("<h3>Per cell</h3>" + _table(headers, rows, table_id="eval-cells", numeric=(2, 3, 4, 5)))
    if free_cells:
        parts.append(f'<p class="muted">{len(free_cells)} free inputs (not grid cells) are listed in the table '
                     "above, not in the heatmaps.</p>")
    parts.append(_samples_section(evaluation, grid_cells, free_cells))
    return "".join(parts)


def _samples_section(evaluation: dict[str, Any], cells: list[dict[str, Any]], free_cells: list[dict[str, Any]]) -> str:
    """Base | tuned answers side by side for the best and worst grid cells by win rate, and for every
    free input."""
    samples = evaluation.get("samples") or []
    ranked = sorted((c for c in cells if c.get("win_rate") is not None), key=lambda c: (c["win_rate"], c.get("n") or 0))
    worst = ranked[:SAMPLE_CELLS]
    best = [c for c in reversed(ranked) if c not in worst][:SAMPLE_CELLS]
    parts = ['<h2 id="samples">Samples: base | tuned</h2>']
    if not samples:
        return parts[0] + '<p class="note">no samples stored with the evaluation.</p>'
    for heading, chosen in (("Best cells", best), ("Worst cells", worst)):
        parts.append(f"<h3>{heading}</h3>")
        for cell in chosen:
            mine = [s for s in samples if _key(s.get("cell")) == _key(cell.get("cell"))][:SAMPLES_PER_CELL]
            parts.extend(_sample_html(sample, cell) for sample in mine)
            if not mine:
                parts.append(f'<p class="note">{escape(_cell_label(cell.get("cell") or {}))}: no sample stored.</p>')
    free_keys = {_key(c.get("cell")) for c in free_cells}
    free = [s for s in samples if _key(s.get("cell")) in free_keys]
    if free:
        parts.append("<h3>Free inputs</h3>" + "".join(_sample_html(s, None) for s in free))
    return "".join(parts)


def _sample_html(sample: dict[str, Any], cell: dict[str, Any] | None) -> str:
    """One input's two answers side by side, with the judge's verdicts; all of it escaped."""
    verdicts = ", ".join(f"{v.get('order')}: {v.get('winner')}" for v in sample.get("verdicts") or [])
    where = (f"<b>{escape(_cell_label(cell.get('cell') or {}))}</b> (win rate {_rate(cell.get('win_rate'))}) — "
             if cell else "")
    return (f'<div class="sample"><p>{where}input: <code>{escape(str(sample.get("input", "")))}</code>; '
            f"verdicts: {escape(verdicts) or '-'}</p>"
            f'<div class="pair"><div><b>base</b><pre>{escape(str(sample.get("base") or ""))}</pre></div>'
            f'<div><b>tuned</b><pre>{escape(str(sample.get("tuned") or ""))}</pre></div></div></div>')


def _training_section(data: dict[str, Any]) -> str:
    job, losses = data.get("job"), data.get("losses") or {}
    parts = ["<h2>Training</h2>"]
    if not job:
        return parts[0] + ('<p class="note" id="no-finetune">no fine-tune job: no loss curves '
                           f"(python -m producer finetune {escape(data['sweep']['name'])} runs one)</p>")
    parts.append(_table(
        ["backend", "base model", "status", "training loss (last)", "validation loss before", "validation loss after",
         "error"],
        [[job.get("backend"), job.get("base_model"), job.get("status"), job.get("train_loss"),
          job.get("validation_loss_before"), job.get("validation_loss_after"), job.get("error_message")]],
        table_id="finetune-job"))
    if losses.get("train") or losses.get("validation"):
        parts.append(_figure_html(loss_svg(losses), "loss-curves",
                                  "Training and validation loss per optimizer step (mean cross-entropy of the "
                                  "reply tokens, nats)."))
    else:
        parts.append('<p class="note" id="no-loss-curves">the job logged no loss per step (the provider gave '
                     "none, or it has not trained yet): no loss curves.</p>")
    return "".join(parts)


def _dataset_section(data: dict[str, Any]) -> str:
    dataset = data.get("dataset")
    parts = ["<h2>Dataset</h2>"]
    if not dataset:
        return parts[0] + '<p class="note" id="no-dataset">no dataset yet: the sweep has not been finalized.</p>'
    dropped = dataset.get("dropped") or {}
    parts.append(_table(["train examples", "validation examples", "train tokens", "validation tokens", "dropped"],
                        [[dataset.get("train_examples"), dataset.get("validation_examples"),
                          dataset.get("train_tokens"), dataset.get("validation_tokens"),
                          ", ".join(f"{k}: {v}" for k, v in dropped.items() if v) or "none"]],
                        table_id="dataset-totals", numeric=(0, 1, 2, 3)))
    report = dataset.get("report")
    if not report:
        return "".join(parts) + ('<p class="note" id="no-dataset-report">this dataset was built without a '
                                 "dataset report (coverage, lengths, duplicates, refusals).</p>")
    dims = list(report.get("dimensions") or [])
    values = data["sweep"].get("dimensions") or {}
    values = values if isinstance(values, dict) else {}
    cells = report.get("cells") or []
    grid_cells = [c for c in cells if _is_grid_cell(c, dims)]
    if grid_cells:
        parts.append(_figure_html(
            heatmap_svg(grid_cells, dims, values, summed("kept"), title="examples kept per cell", salt="kept",
                        rate=False, cmap="Blues"),
            "heatmap-coverage", "Coverage: examples kept for training and validation per cell (other dimensions "
                                "summed)."))
    drop_keys = sorted({k for c in cells for k in (c.get("dropped") or {})})
    rows = [[_cell_label(c.get("cell") or {}), c.get("requests"), c.get("ok"), c.get("failed")]
            + [(c.get("dropped") or {}).get(k) for k in drop_keys]
            + [c.get("kept"), c.get("train"), c.get("validation"), c.get("heldout"), c.get("prompt_tokens"),
               c.get("completion_tokens"), _usd(c.get("cost_usd"))] for c in cells]
    headers = ["cell", "requests", "ok", "failed"] + [f"dropped: {k}" for k in drop_keys] + [
        "kept", "train", "validation", "held out", "prompt tokens", "completion tokens", "cost"]
    parts.append("<h3>Coverage per cell</h3>" + _table(headers, rows, table_id="coverage",
                                                       numeric=range(1, len(headers) - 1)))
    lengths = report.get("lengths") or {}
    if lengths.get("counts"):
        parts.append(_figure_html(lengths_svg(lengths), "length-histogram",
                                  f"Answer lengths: p50 {_text(lengths.get('p50'))}, p90 {_text(lengths.get('p90'))}, "
                                  f"max {_text(lengths.get('max'))} {lengths.get('unit', 'words')}."))
    duplicates = report.get("duplicates") or {}
    near = duplicates.get("near") or {}
    parts.append("<h3>Duplicates</h3>" + _table(
        ["exact", "near (flagged)", "near (dropped)", "similarity threshold"],
        [[duplicates.get("exact"), near.get("flagged"), near.get("dropped"), near.get("threshold")]],
        table_id="duplicates", numeric=(0, 1, 2, 3)))
    if near.get("pairs"):
        parts.append(_table(["request a", "request b", "similarity"],
                            [[p.get("a"), p.get("b"), p.get("similarity")] for p in near["pairs"]],
                            table_id="near-duplicate-pairs", numeric=(0, 1, 2)))
    refusals = report.get("refusals") or {}
    parts.append("<h3>Refusal-like answers</h3>" + _table(
        ["count", "dropped", "patterns", "requests (first ones)"],
        [[refusals.get("count"), refusals.get("dropped"), "; ".join(map(str, refusals.get("patterns") or [])) or "-",
          ", ".join(map(str, refusals.get("examples") or [])) or "-"]], table_id="refusals"))
    totals = report.get("totals") or {}
    if totals:
        parts.append("<h3>Totals</h3>" + _table(list(totals), [[
            _usd(v) if k == "cost_usd" else v for k, v in totals.items()]], table_id="dataset-report-totals"))
    return "".join(parts)


def build_html(data: dict[str, Any]) -> str:
    """The whole report page for `data` (shape in the module docstring). Needs only data["sweep"]["name"].

    Every string from the data is escaped; the page loads nothing (no script, no external address).
    """
    sweep = data["sweep"]
    name = str(sweep["name"])
    generated = data.get("generated_at") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    body = "".join([
        f"<h1>gridtune report: {escape(name)}</h1>",
        f'<p class="muted">generated {escape(str(generated))} by python -m producer report {escape(name)}</p>',
        _summary_section(data),
        _eval_section(data),
        _training_section(data),
        _dataset_section(data),
    ])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>gridtune report: {escape(name)}</title><style>{CSS}</style></head>"
            f"<body>{body}</body></html>\n")


# --- the data, from the store -------------------------------------------------------------------------
TRAIN_LOSS_KEYS = ("loss", "train_loss")  # local backend / OpenAI's metrics events
VALIDATION_LOSS_KEYS = ("validation_loss", "full_valid_loss", "valid_loss")


def losses_from_events(events: Iterable[dict[str, Any] | None]) -> dict[str, list[list[float]]]:
    """{"train": [[step, loss], ...], "validation": [...]} from fine-tune events' `data`.

    Local steps carry {"step", "loss"} and {"step", "validation_loss"}; OpenAI's metrics events
    {"step", "train_loss", "valid_loss"/"full_valid_loss"}. A step seen twice keeps its last value.
    """
    curves: dict[str, dict[float, float]] = {"train": {}, "validation": {}}
    for data in events:
        if not data or data.get("step") is None:
            continue
        for curve, keys in (("train", TRAIN_LOSS_KEYS), ("validation", VALIDATION_LOSS_KEYS)):
            for key in keys:
                value = data.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    curves[curve][float(data["step"])] = float(value)
                    break
    return {curve: [[step, loss] for step, loss in sorted(points.items())] for curve, points in curves.items()}


def dataset_report(dataset) -> dict[str, Any] | None:
    """The dataset report stored with `dataset` (its `report` column, else report.json beside
    train.jsonl); None for a dataset built before there were reports."""
    stored = getattr(dataset, "report", None)
    if stored:
        return stored
    path = Path(dataset.train_path).with_name("report.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def evaluation_summary(engine, name: str) -> dict[str, Any] | None:
    """The sweep's evaluation summary, or None when there is no evaluation (or no eval module)."""
    from gridtune.errors import UserError

    try:
        from worker.evaluation import eval_summary
    except ImportError:
        return None
    try:
        return eval_summary(engine, name)
    except UserError:  # "no eval yet" (the sweep itself was found by collect)
        return None


def collect(engine, name: str) -> dict[str, Any]:
    """Everything the report shows about sweep `name`, read from the store (shape: module docstring).

    Raises UserError when there is no such sweep.
    """
    from models import store

    sweep = store.get_sweep(engine, name)
    config = store.sweep_config(sweep)
    counts = store.sweep_counts(engine, sweep)
    dataset = store.latest_dataset(engine, sweep.id)
    job = store.latest_job(engine, sweep.id)
    data: dict[str, Any] = {
        "sweep": {"name": sweep.name, "state": sweep.state, "model": config.model.name,
                  "dimensions": {k: list(v) for k, v in config.dimensions.items()},
                  "total_requests": sweep.total_requests},
        "counts": {"total": counts.total, "ok": counts.ok, "failed": counts.failed, "truncated": counts.truncated,
                   "prompt_tokens": counts.prompt_tokens, "completion_tokens": counts.completion_tokens,
                   "cost_usd": None if counts.unpriced_completion_tokens and not counts.cost_usd else counts.cost_usd},
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if dataset is not None:
        data["dataset"] = {
            "train_examples": dataset.train_examples, "validation_examples": dataset.validation_examples,
            "train_tokens": dataset.train_tokens, "validation_tokens": dataset.validation_tokens,
            "dropped": dict(dataset.dropped or {}), "report": dataset_report(dataset)}
    if job is not None:
        data["job"] = {key: getattr(job, key) for key in (
            "backend", "base_model", "status", "fine_tuned_model", "train_loss", "validation_loss_before",
            "validation_loss_after", "error_message")}
        data["losses"] = losses_from_events(event.data for event in store.events_after(engine, job.id))
    data["eval"] = evaluation_summary(engine, name)
    return data


def report_path(name: str) -> Path:
    """Where a sweep's report goes by default: GRIDTUNE_DATA_DIR/<name>/report.html."""
    from gridtune.settings import get_settings

    return get_settings().data_dir / name / "report.html"


def write_report(engine, name: str, path: str | Path | None = None) -> Path:
    """Collect, build and write sweep `name`'s report to `path` (default: report_path(name); folders
    made); the path written. `eval` calls this when it finishes.

    Raises UserError when there is no such sweep or the file cannot be written.
    """
    from gridtune.errors import UserError

    page = build_html(collect(engine, name))
    path = Path(path) if path is not None else report_path(name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
    return path
