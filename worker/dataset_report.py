"""The dataset report the finalizer stores with each dataset (datasets.report and report.json).

Its shape is a contract (the HTML report renders it):

    {"dimensions": [name, ...],
     "cells": [{"cell": {dim: value}, "requests", "ok", "failed", "dropped": {reason: n},
                "kept", "train", "validation", "heldout", "prompt_tokens", "completion_tokens",
                "cost_usd": float | None}, ...],                      # in grid (request) order
     "lengths": {"unit": "words", "edges": [...], "counts": [...], "p50", "p90", "max"},
     "duplicates": {"exact": n, "near": {"threshold", "flagged", "dropped",
                                         "pairs": [{"a", "b", "similarity"}], ...}},
     "refusals": {"patterns": [...], "count": n, "dropped": n, "examples": [request_index, ...]},
     "totals": {"requests", "ok", "failed", "kept", "train", "validation", "heldout",
                "prompt_tokens", "completion_tokens", "cost_usd"}}

"kept" = train + validation. "lengths" counts the kept answers' words (whitespace-separated).
Pairs and examples are request indices, at most 20 each. cost_usd is the stored cost of the
cell's priced rows in USD, None when none was priced.

Near-duplicates: a MinHash signature (datasketch) of each answer's word 3-grams, looked up in a
banded LSH index (bands and rows per band chosen by datasketch's MinHashLSH for the threshold, weighted for recall);
candidates are confirmed by the signatures' estimated Jaccard similarity. The index is ours
rather than MinHashLSH's own storage because that keeps a set and a bytes key per band per row
(~1.5 KB/row): here a row costs its 4-byte-per-permutation signature and one int per band, and
only the first answer of each near-duplicate group is indexed.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gridtune.sweep import SweepConfig
    from worker.dataset import DatasetRow, Fate

# How many request indices the report lists as examples (pairs, refusals).
MAX_EXAMPLES = 20
# MinHash permutations: the estimate's standard error at similarity 0.9 is about 0.04.
NUM_PERM = 64
# The reasons a cell's "dropped" always lists (others appear when they occur; failed rows are
# counted under "failed", not here).
CELL_DROPPED = ("truncated", "duplicates", "near_duplicates", "refusal_like")
_WORD = re.compile(r"\w+")


class RefusalPatterns:
    """[dataset] refusal_patterns: case-insensitive regular expressions searched in an answer."""

    def __init__(self, patterns: list[str]):
        self.patterns = list(patterns)
        self._regex = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None

    def match(self, text: str) -> bool:
        return bool(self._regex and self._regex.search(text))


def shingles(text: str) -> set[bytes]:
    """The answer's lower-cased word 3-grams (the words themselves when fewer than 3)."""
    words = _WORD.findall(text.lower())
    if len(words) < 3:
        return {" ".join(words).encode()} if words else {text.encode()}
    return {" ".join(words[i:i + 3]).encode() for i in range(len(words) - 2)}


class NearDuplicates:
    """Streams answers; says for each whether an earlier indexed answer is a near-duplicate.

    check(key, text) -> (earlier key, estimated Jaccard similarity) or None. Memory: per indexed
    answer NUM_PERM * 4 bytes of signature plus one dict entry per LSH band (~100 B).
    """

    def __init__(self, threshold: float, num_perm: int = NUM_PERM):
        import numpy as np
        from datasketch import MinHash, MinHashLSH

        self.threshold = threshold
        self.num_perm = num_perm
        self._np, self._minhash = np, MinHash
        # Only its parameter choice: the (bands, rows per band) for the threshold, weighted for
        # recall since every candidate is checked against its signature (at 0.9 with 64
        # permutations: 6 x 10, a pair at 0.9 is a candidate 92 % of the time, at 0.95 ~100 %).
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))
        self.bands, self.rows = lsh.b, lsh.r
        # affine32: datasketch 2's scheme, 32-bit values; named so the signatures never mix schemes.
        self._permutations = MinHash(num_perm=num_perm, scheme="affine32").permutations
        self._buckets: list[dict[int, int]] = [{} for _ in range(self.bands)]
        self._signatures = bytearray()
        self._keys: list[int] = []

    def signature(self, text: str):
        m = self._minhash(num_perm=self.num_perm, permutations=self._permutations, scheme="affine32")
        m.update_batch(list(shingles(text)))
        return m.hashvalues.astype(self._np.uint32, copy=False)  # affine32 values fit in 4 bytes

    def _band_keys(self, signature) -> list[int]:
        raw = signature.tobytes()
        width = self.rows * 4
        return [int.from_bytes(hashlib.blake2b(raw[i * width:(i + 1) * width], digest_size=8).digest(), "big")
                for i in range(self.bands)]

    def check(self, key: int, text: str) -> tuple[int, float] | None:
        np = self._np
        signature = self.signature(text)
        bands = self._band_keys(signature)
        best: tuple[int, float] | None = None
        for ordinal in {b[k] for b, k in zip(self._buckets, bands) if k in b}:
            start = ordinal * self.num_perm * 4
            # A copy of the slice: a view would pin the bytearray, which must keep growing.
            other = np.frombuffer(self._signatures[start:start + self.num_perm * 4], dtype=np.uint32)
            similarity = float(np.count_nonzero(other == signature)) / self.num_perm
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (self._keys[ordinal], similarity)
        if best is None:  # the first of its group: index it
            ordinal = len(self._keys)
            self._keys.append(key)
            self._signatures += signature.tobytes()
            for bucket, band in zip(self._buckets, bands):
                bucket.setdefault(band, ordinal)
        return best


class _Cell:
    __slots__ = ("params", "requests", "ok", "failed", "dropped", "train", "validation", "heldout",
                 "prompt_tokens", "completion_tokens", "cost_usd")

    def __init__(self, params: dict[str, Any]):
        self.params = params
        self.requests = self.ok = self.failed = self.train = self.validation = self.heldout = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.dropped: dict[str, int] | None = None
        self.cost_usd: float | None = None

    def as_json(self) -> dict[str, Any]:
        dropped = dict.fromkeys(CELL_DROPPED, 0)
        dropped.update(self.dropped or {})
        return {"cell": self.params, "requests": self.requests, "ok": self.ok, "failed": self.failed,
                "dropped": dropped, "kept": self.train + self.validation, "train": self.train,
                "validation": self.validation, "heldout": self.heldout, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cost_usd": None if self.cost_usd is None else round(self.cost_usd, 8)}


def _percentile(lengths: Counter, total: int, fraction: float) -> int:
    """Nearest-rank percentile of a {value: count} histogram."""
    rank, seen = max(1, -(-int(total * fraction * 1000) // 1000)), 0
    for value in sorted(lengths):
        seen += lengths[value]
        if seen >= rank:
            return value
    return max(lengths)


def _bin_width(longest: int, bins: int = 20) -> int:
    """A round bin width (1, 2, 5, 10, 20, 25, 50, ...) giving at most `bins` bins up to `longest`."""
    scale = 1
    while True:
        for step in (1, 2, 2.5, 5):
            width = int(step * scale)
            if width * bins > longest and width == step * scale:
                return width
        scale *= 10


class ReportBuilder:
    """Collects the report from (row, fate) pairs as the finalizer streams them; result() is the JSON."""

    def __init__(self, config: SweepConfig):
        settings = config.dataset
        self.dimensions = list(config.dimensions)
        self.patterns = list(settings.refusal_patterns)
        self.threshold = settings.near_duplicate_threshold
        self.cells: dict[tuple, _Cell] = {}
        self.lengths: Counter[int] = Counter()
        self.exact = 0
        self.near_flagged = self.near_dropped = 0
        self.pairs: list[dict[str, Any]] = []
        self.refusal_count = self.refusal_dropped = 0
        self.refusal_examples: list[int] = []

    def add(self, row: DatasetRow, fate: Fate) -> None:
        from worker.dataset import FAILED, HELDOUT, TRAIN, VALIDATION

        params = row.params or {}
        # Values may be of mixed types (1 and "1"): the key keeps them apart, as JSON does.
        key = tuple((type(params.get(d)).__name__, params.get(d)) for d in self.dimensions)
        cell = self.cells.get(key)
        if cell is None:
            cell = self.cells[key] = _Cell({d: params.get(d) for d in self.dimensions})
        cell.requests += 1
        cell.prompt_tokens += row.prompt_tokens or 0
        cell.completion_tokens += row.completion_tokens or 0
        if row.cost_usd is not None:
            cell.cost_usd = (cell.cost_usd or 0.0) + row.cost_usd
        split = fate.split
        if split == FAILED:
            cell.failed += 1
        else:
            cell.ok += 1
        if split == TRAIN:
            cell.train += 1
        elif split == VALIDATION:
            cell.validation += 1
        elif split == HELDOUT:
            cell.heldout += 1
        elif split != FAILED:
            if cell.dropped is None:
                cell.dropped = {}
            cell.dropped[split] = cell.dropped.get(split, 0) + 1
        if split in (TRAIN, VALIDATION):
            self.lengths[len(row.response.split())] += 1
        if split == "duplicates":
            self.exact += 1
        if fate.near is not None:
            self.near_flagged += 1
            self.near_dropped += split == "near_duplicates"
            if len(self.pairs) < MAX_EXAMPLES:
                self.pairs.append({"a": fate.near[0], "b": row.request_index, "similarity": round(fate.near[1], 3)})
        if fate.refusal_like:
            self.refusal_count += 1
            self.refusal_dropped += split == "refusal_like"
            if len(self.refusal_examples) < MAX_EXAMPLES:
                self.refusal_examples.append(row.request_index)

    def _lengths(self) -> dict[str, Any]:
        total = sum(self.lengths.values())
        if not total:
            return {"unit": "words", "edges": [], "counts": [], "p50": None, "p90": None, "max": None}
        longest = max(self.lengths)
        width = _bin_width(longest)
        edges = list(range(0, longest + width + 1, width))
        counts = [0] * (len(edges) - 1)
        for value, n in self.lengths.items():
            counts[value // width] += n
        while len(edges) > 2 and counts[-1] == 0:  # trailing empty bins
            counts.pop()
            edges.pop()
        return {"unit": "words", "edges": edges, "counts": counts, "p50": _percentile(self.lengths, total, 0.5),
                "p90": _percentile(self.lengths, total, 0.9), "max": longest}

    def result(self) -> dict[str, Any]:
        cells = [cell.as_json() for cell in self.cells.values()]
        totals: dict[str, Any] = {k: 0 for k in ("requests", "ok", "failed", "kept", "train", "validation",
                                                 "heldout", "prompt_tokens", "completion_tokens")}
        cost = None
        for cell in cells:
            for k in totals:
                totals[k] += cell[k]
            if cell["cost_usd"] is not None:
                cost = (cost or 0.0) + cell["cost_usd"]
        totals["cost_usd"] = None if cost is None else round(cost, 8)
        return {
            "dimensions": self.dimensions,
            "cells": cells,
            "lengths": self._lengths(),
            "duplicates": {"exact": self.exact,
                           "near": {"threshold": self.threshold, "flagged": self.near_flagged,
                                    "dropped": self.near_dropped, "pairs": self.pairs,
                                    "method": f"MinHash of word 3-grams, {NUM_PERM} permutations (datasketch)"}},
            "refusals": {"patterns": self.patterns, "count": self.refusal_count, "dropped": self.refusal_dropped,
                         "examples": self.refusal_examples},
            "totals": totals,
        }


def digest(report: dict[str, Any] | None) -> str | None:
    """One line for summaries: near-duplicates and refusal-like answers; None when there are none."""
    if not report:
        return None
    near, refusals = report["duplicates"]["near"], report["refusals"]
    parts = []
    if near["flagged"]:
        kept = near["flagged"] - near["dropped"]
        parts.append(f"{near['flagged']:,} near-duplicate answers (similarity >= {near['threshold']}; "
                     + (f"{near['dropped']:,} dropped" if near["dropped"] else f"{kept:,} kept") + ")")
    if refusals["count"]:
        parts.append(f"{refusals['count']:,} refusal-like answers ("
                     + (f"{refusals['dropped']:,} dropped" if refusals["dropped"] else "kept") + ")")
    return "; ".join(parts) + " (see report.json)" if parts else None

