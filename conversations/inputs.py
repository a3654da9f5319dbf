"""What every interface (socket, HTTP API, page) checks of what a person
sends before anything else sees it: JSON that parses and is not nested past
MAX_DEPTH, and text that can be stored.

Python's `json` takes `"\\ud800"` (a lone surrogate: valid JSON, no
character) and `"\\u0000"`; neither can be written to PostgreSQL (nor a lone
surrogate encoded as UTF-8 anywhere), and `"[" * 200000` makes the parser
raise RecursionError. Each is refused here with a message for a person, so
that it never reaches a batch that other people's requests share.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64  # nested arrays and objects (OpenAI's tool schemas stay far below)


class BadInput(ValueError):
    """Refused input; `str()` says why, for a person. `parsed`: the value,
    when it parsed and only one of its strings is refused (so that a reply
    can still name the request it refuses)."""

    def __init__(self, message: str, parsed: Any = None) -> None:
        super().__init__(message)
        self.parsed = parsed


def load_json(raw: str | bytes, *, what: str = "The request body") -> Any:
    """`raw` parsed, or BadInput: not JSON, nested past MAX_DEPTH, or with a
    string that cannot be stored (see `text_problem`)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise BadInput(f"{what} is nested too deeply (at most {MAX_DEPTH} levels).") from None
    except ValueError:  # also UnicodeDecodeError: bytes that are not UTF-8
        raise BadInput(f"{what} must be JSON.") from None
    _check_tree(value, what)
    return value


def _check_tree(value: Any, what: str) -> None:
    """Depth and strings of a parsed JSON value, without recursion."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, str):
            problem = text_problem(node)
            if problem:
                raise BadInput(f"{what} holds a string that {problem}.", value)
            continue
        if isinstance(node, dict):
            children: Any = [*node.keys(), *node.values()]
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > MAX_DEPTH:
            raise BadInput(f"{what} is nested too deeply (at most {MAX_DEPTH} levels).")
        pending.extend((child, depth + 1) for child in children)


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored (as a message, a title, a name), or None:
    a NUL (PostgreSQL refuses it), a lone surrogate (no UTF-8 for it)."""
    if "\x00" in text:
        return "contains a NUL character"
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a character that is not text (a lone surrogate)"
    return None
