"""The simulated server as a pairwise judge: a deterministic verdict instead of filler text.

A chat request whose user turn holds "[Answer A]" ... "[End of answer A]" and "[Answer B]" ...
"[End of answer B]" (the layout of gridtune's judge prompt, worker/evaluation.py) is answered
with "A" or "B": the answer that uses more of the task's content words wins, then the one
within the task's word limit ("within N words"). Scores do not depend on the order, except that
an exact tie answers "A": a first-position bias, so that swapping the positions shows it.
"""

from __future__ import annotations

import re

from .text import _WORD, _is_content

_ANSWER = re.compile(r"\[Answer ([AB])\]\n(.*?)\n\[End of answer \1\]", re.DOTALL)
_LIMIT = re.compile(r"within (\d+) words")


def verdict(prompt: str) -> str | None:
    """"A" or "B" for a judge prompt; None when `prompt` is not one."""
    answers = dict(_ANSWER.findall(prompt))
    if set(answers) != {"A", "B"}:
        return None
    task = prompt.split("[Answer A]", 1)[0]
    words = {w.lower() for w in _WORD.findall(task) if _is_content(w)}
    limit = int(match.group(1)) if (match := _LIMIT.search(prompt)) else None

    def score(answer: str) -> tuple[int, int]:
        used = {w.lower() for w in _WORD.findall(answer)} & words
        within = 1 if limit is None or len(answer.split()) <= limit else 0
        return len(used), within

    a, b = score(answers["A"]), score(answers["B"])
    return "B" if b > a else "A"
