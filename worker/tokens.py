"""Offline token counts (bpe-openai ships the vocabularies; tiktoken would download them)."""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Mapping

import bpe_openai

# OpenAI's chat accounting: a few tokens of framing per message and per example.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_EXAMPLE = 3


def encoding_name(model: str) -> str:
    """o200k_base for gpt-4o-era models, cl100k_base for older ones; fine-tuned ids use their base."""
    base = model.split(":")[1] if model.startswith("ft:") and model.count(":") >= 1 else model
    try:
        return bpe_openai.encoding_name_for_model(base)
    except KeyError:
        # Unknown (non-OpenAI) model behind a compatible server: o200k_base is a fair estimate.
        return "o200k_base"


@lru_cache(maxsize=4)
def _encoding(name: str):
    return bpe_openai.get_encoding(name)


def count_messages(messages: Iterable[Mapping[str, str]], encoding: str = "o200k_base") -> int:
    enc = _encoding(encoding)
    total = TOKENS_PER_EXAMPLE
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for value in message.values():
            if isinstance(value, str):
                total += len(enc.encode_ordinary(value))
    return total
