"""Markdown to safe HTML. Model output and user text are untrusted: render
with raw HTML disabled, then sanitise the result with an allow-list."""

from __future__ import annotations

import hashlib
import html
from functools import lru_cache

import nh3
from django.core.cache import cache
from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

_FORMATTER = HtmlFormatter(nowrap=True, classprefix="hl-")

ALLOWED_TAGS = {
    "p", "br", "hr", "strong", "em", "del", "s", "code", "pre", "span", "blockquote",
    "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6", "a",
    "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "code": {"class"},
    "span": {"class"},
    "pre": {"class"},
    "ol": {"start"},
}


def _highlight(code: str, lang: str, _attrs: str) -> str:
    try:
        lexer = get_lexer_by_name(lang.strip()) if lang.strip() else None
    except ClassNotFound:
        lexer = None
    if lexer is None:
        return html.escape(code)
    return highlight(code, lexer, _FORMATTER)  # without an outfile, the text


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "highlight": _highlight})
    md.enable(["table", "strikethrough"])
    return md


def render_markdown(text: str) -> str:
    """Sanitised HTML for `text`; links open in a new tab without an opener."""
    raw = _markdown().render(text)
    return nh3.clean(
        raw,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
        set_tag_attribute_values={"a": {"target": "_blank"}},
    )


# Rendering (markdown + highlighting + sanitising) costs about a millisecond
# per answer with code: a long conversation would pay it on every page load.
# Rendered HTML is kept in the cache (Redis, shared by the workers, when
# configured), keyed by the text, so an answer is rendered about once.
CACHE_PREFIX = "md:v1:"
CACHE_SECONDS = 30 * 24 * 3600


def _cache_key(text: str) -> str:
    return CACHE_PREFIX + hashlib.sha256(text.encode()).hexdigest()


def render_markdown_cached(text: str) -> str:
    return render_many([text])[0]


def render_many(texts: list[str]) -> list[str]:
    """Sanitised HTML of each text, from the cache where it was rendered before."""
    keys = [_cache_key(text) for text in texts]
    found = cache.get_many(keys)
    missing = {key: render_markdown(text) for key, text in zip(keys, texts, strict=True) if key not in found}
    if missing:
        cache.set_many(missing, CACHE_SECONDS)
    return [found[key] if key in found else missing[key] for key in keys]
