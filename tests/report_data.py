"""Report data for tests: the shapes of the dataset report and the eval summary (issue 9's contracts),
filled deterministically for the tutorial's grid (7 ages x 2 genders x 7 powers)."""

from __future__ import annotations

import random
from itertools import product
from typing import Any

DIMENSIONS = {
    "age": [18, 20, 30, 40, 50, 60, 90],
    "gender": ["man", "woman"],
    "power": ["invisibility", "read in the thoughts", "turning lead into gold", "immortality", "telepathy",
              "teleport", "flight"],
}
# Model text is untrusted: it must come out escaped, never as markup.
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)> & </pre>'


def cells() -> list[dict[str, Any]]:
    return [dict(zip(DIMENSIONS, values)) for values in product(*DIMENSIONS.values())]


def dataset_report() -> dict[str, Any]:
    rng = random.Random(9)
    rows = []
    for cell in cells():
        truncated = rng.random() < 0.2
        kept = 3 - truncated
        rows.append({"cell": cell, "requests": 3, "ok": 3, "failed": 0,
                     "dropped": {"truncated": int(truncated), "duplicates": 0, "near_duplicates": 0,
                                 "refusal_like": 0},
                     "kept": kept, "train": kept - (rng.random() < 0.1), "validation": rng.random() < 0.1,
                     "heldout": 0, "prompt_tokens": 120, "completion_tokens": 300, "cost_usd": None})
    return {"dimensions": list(DIMENSIONS), "cells": rows,
            "lengths": {"unit": "words", "edges": [0, 20, 40, 60, 80, 100, 120, 140],
                        "counts": [2, 9, 40, 88, 70, 30, 6], "p50": 71, "p90": 101, "max": 139},
            "duplicates": {"exact": 4, "near": {"threshold": 0.9, "flagged": 2, "dropped": 0,
                                                "pairs": [{"a": 12, "b": 40, "similarity": 0.93},
                                                          {"a": 77, "b": 201, "similarity": 0.91}]}},
            "refusals": {"patterns": ["I'm sorry", "as an AI"], "count": 2, "examples": [17, 90]},
            "totals": {"requests": 294, "ok": 294, "failed": 0, "kept": 245, "train": 221, "validation": 24,
                       "heldout": 0, "prompt_tokens": 35280, "completion_tokens": 88200, "cost_usd": None}}


def eval_summary() -> dict[str, Any]:
    rng = random.Random(14)
    rows, samples = [], []
    for cell in cells():
        wins = rng.randint(0, 2)
        ties = rng.randint(0, 2 - wins)
        losses = 2 - wins - ties
        checks = {side: {"within_max_words": rng.choice([0.0, 0.5, 1.0]),
                         "mentions_values": rng.choice([0.0, 0.5, 1.0])} for side in ("base", "tuned")}
        rows.append({"cell": cell, "source": "heldout_repeat", "n": 2, "wins": wins, "ties": ties, "losses": losses,
                     "win_rate": (wins + ties / 2) / 2, "checks": checks,
                     "validation_loss": {"base": round(3.3 + rng.random() / 5, 3),
                                         "tuned": round(3.1 + rng.random() / 5, 3)}})
        text = f"{cell['age']}, {cell['gender']}, {cell['power']}"
        samples.append({"cell": cell, "input": text,
                        "base": f"A {cell['age']}-year-old {cell['gender']} who can {cell['power']}. " * 3,
                        "tuned": f"Meet the {cell['gender']} of {cell['age']}: {cell['power']} is their gift.",
                        "verdicts": [{"order": "base_first", "winner": "tuned"},
                                     {"order": "tuned_first", "winner": "tie"}]})
    # Free inputs (not grid cells): one parsed into dimension values off the grid, one not parsed;
    # hostile model text.
    for cell, base in (({"age": 18, "gender": "man", "power": "can eat a lot"}, "He eats."),
                       ({"input": "a quiet librarian"}, HOSTILE)):
        rows.append({"cell": cell, "source": "free_input", "n": 1, "wins": 1, "ties": 0, "losses": 0, "win_rate": 1.0,
                     "checks": {"base": {"within_max_words": 1.0}, "tuned": {"within_max_words": 1.0}}})
        samples.append({"cell": cell, "input": ", ".join(map(str, cell.values())), "base": base,
                        "tuned": "He eats <b>everything</b> & more.",
                        "verdicts": [{"order": "base_first", "winner": "tuned"},
                                     {"order": "tuned_first", "winner": "tuned"}]})
    overall = {"wins": sum(r["wins"] for r in rows), "ties": sum(r["ties"] for r in rows),
               "losses": sum(r["losses"] for r in rows), "invalid_verdicts": 1,
               "checks": {"base": {"within_max_words": 0.5, "mentions_values": 0.4},
                          "tuned": {"within_max_words": 0.7, "mentions_values": 0.6}},
               "validation_loss": {"base": 3.34, "tuned": 3.19}}
    judged = overall["wins"] + overall["ties"] + overall["losses"]
    overall["win_rate"] = (overall["wins"] + overall["ties"] / 2) / judged
    return {"sweep": "superhero", "state": "done", "base_model": "smollm2-135m",
            "tuned_model": "gridtune-data/superhero/adapter", "judge_model": "smollm2-135m",
            "dimensions": list(DIMENSIONS), "inputs": len(rows), "judged": len(rows), "overall": overall,
            "cells": rows, "samples": samples, "tokens": {"answers": 5000, "judge": 9000},
            "cost_usd": {"answers": 0.0, "judge": 0.0}}


def report_data(*, evaluation: bool = True, job: bool = True, dataset: bool = True) -> dict[str, Any]:
    """What producer.report.collect returns, for a finished tutorial sweep."""
    data: dict[str, Any] = {
        "sweep": {"name": "superhero", "state": "done", "model": "smollm2-135m", "dimensions": DIMENSIONS,
                  "total_requests": 294},
        "counts": {"total": 294, "ok": 294, "failed": 0, "truncated": 49, "prompt_tokens": 35280,
                   "completion_tokens": 88200, "cost_usd": 0.0},
        "generated_at": "2026-11-30T08:00:00+00:00",
        "eval": eval_summary() if evaluation else None,
    }
    if dataset:
        data["dataset"] = {"train_examples": 221, "validation_examples": 24, "train_tokens": 30000,
                           "validation_tokens": 3300, "dropped": {"truncated": 49, "duplicates": 0},
                           "report": dataset_report()}
    if job:
        data["job"] = {"backend": "local", "base_model": "smollm2-135m", "status": "succeeded",
                       "fine_tuned_model": "gridtune-data/superhero/adapter", "train_loss": 2.9,
                       "validation_loss_before": 3.34, "validation_loss_after": 3.19, "error_message": None}
        data["losses"] = {"train": [[s, round(3.6 - s * 0.03, 3)] for s in range(1, 26)],
                          "validation": [[0, 3.34], [10, 3.25], [20, 3.2], [25, 3.19]]}
    return data
