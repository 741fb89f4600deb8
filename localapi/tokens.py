"""Token counts the way OpenAI bills them, with the offline o200k_base vocabulary (gpt-4o family)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import bpe_openai

# OpenAI's chat framing: a few tokens around every message, and three that prime the reply.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3


@functools.cache
def encoding() -> bpe_openai.Encoding:
    # Imported on first use: bpe_openai loads every vocabulary it ships at import (~2 s), which
    # `import localapi` should not pay. The server calls this before it starts listening.
    import bpe_openai

    return bpe_openai.get_encoding("o200k_base")


def encode(text: str) -> list[int]:
    # Ordinary encoding: user text that spells a special token is just text here.
    return encoding().encode_ordinary(text)


def count(text: str) -> int:
    return len(encode(text))


def decode(tokens: list[int]) -> str:
    """Text for `tokens`; a character cut in half by a token boundary is dropped."""
    return encoding().decode_bytes(tokens).decode("utf-8", "ignore")


@functools.lru_cache(maxsize=64)
def _count_role(role: str) -> int:
    return count(role)


def content_text(content: object) -> str:
    """A message's text, whether `content` is a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return ""


def count_messages(messages: Iterable[Mapping]) -> int:
    """A chat's prompt tokens; also a fine-tuning example's, which OpenAI counts the same way."""
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += TOKENS_PER_MESSAGE + _count_role(str(message.get("role", "")))
        total += count(content_text(message.get("content")))
        if message.get("name"):
            total += TOKENS_PER_NAME + count(str(message["name"]))
    return total
