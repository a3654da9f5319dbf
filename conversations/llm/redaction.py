"""Upstream words made safe for a page, a frame and a log: never a key.

A model service that refuses a request may quote what it was sent: the
`Authorization` header, the key itself (whole, or its first characters
before a mask). Known key shapes (`sk-`, `gsk_`, `AIza`, `hf_`, ...) are not
enough: any key can be configured. So three nets, in order:

1. what follows `Bearer `, `Authorization:`, `api-key=` and the like;
2. any word that shares eight characters in a row with a secret this
   server holds (OPENAI_API_KEY, the password or query of OPENAI_BASE_URL);
3. words shaped like the keys of the common services.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import parse_qsl, urlsplit

from django.conf import settings

GRAM = 8  # characters in a row of a secret that make a word secret
KEY = "[key]"

_HEADER = re.compile(
    r"(\b(?:bearer|basic)\s+"
    r"|(?:authorization|x-api-key|api[-_]?key|\bkey|\btoken|access[-_]?token|\bsecret|\bpassword)"
    r"[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic)\s+)?)"
    r"[^\s\"',;)}\]]{4,}",
    re.IGNORECASE,
)
_WORD = re.compile(r"[A-Za-z0-9_\-.*~+/=]{" + str(GRAM) + ",}")
_SHAPES = re.compile(
    r"\b(?:sk|gsk|hf|xai|pplx|r8|fw|nvapi|csk|sess)[-_][-_A-Za-z0-9*.]{6,}"
    r"|\bAIza[-_A-Za-z0-9]{10,}"
    r"|\b(?:ghp|gho|github_pat|xox[abpr])_?[-_A-Za-z0-9]{10,}",
)


def redact(text: str, limit: int = 300) -> str:
    """One line of `text`, no secret in it, at most `limit` characters."""
    line = " ".join(str(text).split())
    line = _HEADER.sub(lambda found: found[1] + KEY, line)
    grams = _secret_grams(settings.OPENAI_API_KEY, settings.OPENAI_BASE_URL)
    if grams:
        line = _WORD.sub(lambda found: KEY if _shares(found[0], grams) else found[0], line)
    line = _SHAPES.sub(KEY, line)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _shares(word: str, grams: frozenset[str]) -> bool:
    return any(word[i : i + GRAM] in grams for i in range(len(word) - GRAM + 1))


@lru_cache(maxsize=8)
def _secret_grams(api_key: str, base_url: str) -> frozenset[str]:
    secrets = [api_key]
    try:
        parts = urlsplit(base_url)
        secrets += [parts.password or "", *(value for _name, value in parse_qsl(parts.query))]
    except ValueError:
        pass
    return frozenset(
        secret[i : i + GRAM]
        for secret in secrets
        if len(secret) >= GRAM
        for i in range(len(secret) - GRAM + 1)
    )
