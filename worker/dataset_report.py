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
banded LSH index (bands and rows per band chosen by datasketch's MinHashLSH for the threshold,
weighted for recall); candidates are confirmed by the signatures' estimated Jaccard similarity.
The index is ours rather than MinHashLSH's own storage because that keeps a set and a bytes key
per band per row (~1.5 KB/row): here a row costs a 16-bit-per-permutation signature and 12 bytes
per band (~220 B), and only the first answer of each near-duplicate group is indexed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections import Counter
from pathlib import Path
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
        # Compiled one by one: a pattern with its own inline flags cannot be joined into one regex.
        self._regexes = [re.compile(p, re.IGNORECASE) for p in patterns]

    def match(self, text: str) -> bool:
        return any(regex.search(text) for regex in self._regexes)


def shingles(text: str) -> set[bytes]:
    """The answer's lower-cased word 3-grams (the words themselves when fewer than 3)."""
    words = _WORD.findall(text.lower())
    if len(words) < 3:
        return {" ".join(words).encode()} if words else {text.encode()}
    return {" ".join(words[i:i + 3]).encode() for i in range(len(words) - 2)}


class _BandIndex:
    """band key (63-bit int) -> ordinal of the first answer indexed with it, for one LSH band.

    New keys go to a small dict; every MERGE_EVERY keys they are merged into sorted numpy arrays
    (12 bytes a key, against ~90 for a dict entry), looked up with searchsorted.
    """

    MERGE_EVERY = 4096

    def __init__(self, np):
        self._np = np
        self.keys = np.empty(0, dtype=np.int64)
        self.ordinals = np.empty(0, dtype=np.int32)
        self.recent: dict[int, int] = {}

    def get(self, key: int) -> int | None:
        if key in self.recent:
            return self.recent[key]
        if not len(self.keys):
            return None
        at = int(self.keys.searchsorted(self._np.int64(key)))  # a numpy scalar: no conversion per call
        return int(self.ordinals[at]) if at < len(self.keys) and int(self.keys[at]) == key else None

    def add(self, key: int, ordinal: int) -> None:
        """Index a key that get() did not find (the first answer of a bucket stands for it)."""
        self.recent[key] = ordinal
        if len(self.recent) >= self.MERGE_EVERY:
            np = self._np
            keys = np.concatenate([self.keys, np.fromiter(self.recent.keys(), dtype=np.int64)])
            ordinals = np.concatenate([self.ordinals, np.fromiter(self.recent.values(), dtype=np.int32)])
            order = np.argsort(keys, kind="stable")
            self.keys, self.ordinals, self.recent = keys[order], ordinals[order], {}


class NearDuplicates:
    """Streams answers; says for each whether an earlier indexed answer is a near-duplicate.

    check(key, text) -> (earlier key, estimated Jaccard similarity) or None. Memory per indexed
    answer: NUM_PERM * 2 bytes of signature, 12 bytes per LSH band and its key (~220 B at 64
    permutations and 6 bands).
    """

    def __init__(self, threshold: float, num_perm: int = NUM_PERM):
        import numpy as np
        from datasketch import MinHash, MinHashLSH

        self.threshold = threshold
        self.num_perm = num_perm
        self._np = np
        # Only its parameter choice: the (bands, rows per band) for the threshold, weighted for
        # recall since every candidate is checked against its signature (at 0.9 with 64
        # permutations: 6 x 10, a pair at 0.9 is a candidate 92 % of the time, at 0.95 ~100 %).
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))
        self.bands, self.rows = lsh.b, lsh.r
        # One sketch, cleared per answer (building one costs more than hashing a short answer).
        # affine32: datasketch 2's scheme, 32-bit values. crc32 (C, deterministic across processes,
        # unlike hash()) hashes the shingles: the scheme mixes its input again, and sha1 in Python
        # was most of the time.
        self._sketch = MinHash(num_perm=num_perm, scheme="affine32", hashfunc=zlib.crc32)
        self._buckets = [_BandIndex(np) for _ in range(self.bands)]
        # Stored signatures keep the low 16 bits of each value: two different values agree there
        # 1 time in 65,536, which moves a similarity estimate by less than 0.0001.
        self._signatures = bytearray()
        self._keys = np.empty(0, dtype=np.int64)
        self._count = 0

    def signature(self, text: str):
        sketch = self._sketch
        sketch.clear()
        sketch.update_batch(list(shingles(text)))
        return sketch.hashvalues.astype(self._np.uint32)  # a copy; affine32 values fit in 4 bytes

    def _band_keys(self, signature) -> list[int]:
        raw = signature.tobytes()
        width = self.rows * 4
        return [int.from_bytes(hashlib.blake2b(raw[i * width:(i + 1) * width], digest_size=8).digest(), "big") >> 1
                for i in range(self.bands)]

    def check(self, key: int, text: str) -> tuple[int, float] | None:
        np = self._np
        signature = self.signature(text)
        bands = self._band_keys(signature)
        low = signature.astype(np.uint16)
        size = self.num_perm * 2
        best: tuple[int, int] | None = None
        found = [bucket.get(band) for bucket, band in zip(self._buckets, bands)]
        for ordinal in {o for o in found if o is not None}:
            other = np.frombuffer(self._signatures[ordinal * size:(ordinal + 1) * size], dtype=np.uint16)
            similarity = float(np.count_nonzero(other == low)) / self.num_perm
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (ordinal, similarity)
        if best is not None:
            return int(self._keys[best[0]]), best[1]
        ordinal = self._count  # the first of its group: index it
        if ordinal == len(self._keys):
            self._keys = np.concatenate([self._keys, np.zeros(max(1024, ordinal), dtype=np.int64)])
        self._keys[ordinal] = key
        self._count += 1
        self._signatures += low.tobytes()
        for bucket, band, there in zip(self._buckets, bands, found):
            if there is None:
                bucket.add(band, ordinal)
        return None


# Per-cell counters, one numpy row per grid combination (72 bytes a cell, however many).
COUNTERS = ("requests", "ok", "failed", "train", "validation", "heldout", "prompt_tokens", "completion_tokens")
_C = {name: i for i, name in enumerate(COUNTERS)}


def _cell_json(params: dict[str, Any], counts, cost: float, priced: bool, dropped: dict[str, int] | None) -> dict[str, Any]:
    row = {name: int(counts[i]) for i, name in enumerate(COUNTERS)}
    all_dropped = dict.fromkeys(CELL_DROPPED, 0)
    all_dropped.update(dropped or {})
    return {"cell": params, "requests": row["requests"], "ok": row["ok"], "failed": row["failed"],
            "dropped": all_dropped, "kept": row["train"] + row["validation"], "train": row["train"],
            "validation": row["validation"], "heldout": row["heldout"], "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"], "cost_usd": round(float(cost), 8) if priced else None}


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
    """Collects the report from (row, fate) pairs as the finalizer streams them.

    write(path) streams it to a JSON file (one cell per line) and returns the report without its
    cells (for digests); load it whole with json.load. Memory: a numpy row per grid cell, a dict
    per cell that dropped something, a {length: count} histogram.
    """

    def __init__(self, config: SweepConfig):
        import numpy as np

        settings = config.dataset
        self._np = np
        self.config = config
        self.dimensions = list(config.dimensions)
        self.patterns = list(settings.refusal_patterns)
        self.threshold = settings.near_duplicate_threshold
        # Cell = request_index // repeats (its combination), so a cell's counters are one row of
        # an array indexed by it. Rows without params (old-style tuples) share one cell, {}.
        self.counts = np.zeros((config.combinations, len(COUNTERS)), dtype=np.int64)
        self.costs = np.zeros(config.combinations, dtype=np.float64)
        self.priced = np.zeros(config.combinations, dtype=bool)
        self.dropped: dict[int, dict[str, int]] = {}
        self.other: dict[int, dict[str, Any]] = {}  # cells outside the grid: their params
        self.lengths: Counter[int] = Counter()
        self.exact = 0
        self.near_flagged = self.near_dropped = 0
        self.pairs: list[dict[str, Any]] = []
        self.refusal_count = self.refusal_dropped = 0
        self.refusal_examples: list[int] = []

    def _cell(self, row: DatasetRow) -> int:
        if row.params is None:
            cell = -1
        else:
            cell = row.request_index // self.config.repeats
            if cell < self.config.combinations:
                return cell
            cell = -2 - cell
        if cell not in self.other:  # grow the arrays by one row for it
            self.other[cell] = dict(row.params or {})
            self.counts = self._np.vstack([self.counts, self._np.zeros((1, len(COUNTERS)), dtype=self._np.int64)])
            self.costs = self._np.append(self.costs, 0.0)
            self.priced = self._np.append(self.priced, False)
        return self.config.combinations + list(self.other).index(cell)

    def add(self, row: DatasetRow, fate: Fate) -> None:
        from worker.dataset import FAILED, HELDOUT, TRAIN, VALIDATION

        cell = self._cell(row)
        counts = self.counts[cell]
        counts[_C["requests"]] += 1
        counts[_C["prompt_tokens"]] += row.prompt_tokens or 0
        counts[_C["completion_tokens"]] += row.completion_tokens or 0
        if row.cost_usd is not None:
            self.costs[cell] += row.cost_usd
            self.priced[cell] = True
        split = fate.split
        counts[_C["failed" if split == FAILED else "ok"]] += 1
        if split in (TRAIN, VALIDATION, HELDOUT):
            counts[_C[split]] += 1
        elif split != FAILED:
            dropped = self.dropped.setdefault(cell, {})
            dropped[split] = dropped.get(split, 0) + 1
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

    def cells(self):
        """The cells' JSON, in grid order (those outside the grid last), one at a time."""
        extra = list(self.other.values())
        for cell in map(int, self._np.flatnonzero(self.counts[:, _C["requests"]])):
            if cell < self.config.combinations:
                params = self.config.params(cell * self.config.repeats)[0]
            else:
                params = extra[cell - self.config.combinations]
            yield _cell_json(params, self.counts[cell], self.costs[cell], bool(self.priced[cell]),
                             self.dropped.get(cell))

    def head(self) -> dict[str, Any]:
        """The report without its cells (totals, lengths, duplicates, refusals)."""
        sums = self.counts.sum(axis=0)
        totals: dict[str, Any] = {name: int(sums[_C[name]]) for name in COUNTERS}
        totals["kept"] = totals["train"] + totals["validation"]
        totals = {k: totals[k] for k in ("requests", "ok", "failed", "kept", "train", "validation", "heldout",
                                         "prompt_tokens", "completion_tokens")}
        totals["cost_usd"] = round(float(self.costs.sum()), 8) if self.priced.any() else None
        return {
            "dimensions": self.dimensions,
            "lengths": self._lengths(),
            "duplicates": {"exact": self.exact,
                           "near": {"threshold": self.threshold, "flagged": self.near_flagged,
                                    "dropped": self.near_dropped, "pairs": self.pairs,
                                    "method": f"MinHash of word 3-grams, {NUM_PERM} permutations (datasketch)"}},
            "refusals": {"patterns": self.patterns, "count": self.refusal_count, "dropped": self.refusal_dropped,
                         "examples": self.refusal_examples},
            "totals": totals,
        }

    def write(self, path: Path) -> dict[str, Any]:
        """Stream the report as JSON to `path` (atomically; a cell per line); returns head()."""
        head = self.head()
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as out:
                out.write('{"dimensions": ' + json.dumps(head["dimensions"], ensure_ascii=False) + ',\n"cells": [')
                for i, cell in enumerate(self.cells()):
                    out.write((",\n" if i else "\n") + json.dumps(cell, ensure_ascii=False))
                out.write("\n]")
                for key in ("lengths", "duplicates", "refusals", "totals"):
                    out.write(f',\n"{key}": ' + json.dumps(head[key], ensure_ascii=False))
                out.write("}\n")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return head


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

