"""What a file is, decided from its bytes (never its name or the browser's
word): text of any kind, a PDF, or an image (PNG, JPEG, WebP, GIF)."""

from __future__ import annotations

from dataclasses import dataclass

ACCEPTED = (
    "text files (plain text, Markdown, code, logs, CSV, JSON, HTML as text), "
    "PDF documents and images (PNG, JPEG, WebP, GIF)"
)

_IMAGES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
# How a text file is labelled, from its name: only ever a text type, and
# only a label (it is served as plain text whatever it says).
_TEXT_TYPES = {
    "csv": "text/csv",
    "md": "text/markdown",
    "markdown": "text/markdown",
    "json": "application/json",
    "html": "text/html",
    "htm": "text/html",
}


class Refused(Exception):
    """A file the product does not take: the message says why, for a person;
    `code` and `status` for the HTTP API."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "unsupported_file",
        status: int = 400,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class Sniffed:
    kind: str  # File.Kind
    content_type: str
    text: str | None = None  # a text file's text, decoded


def sniff(data: bytes, filename: str) -> Sniffed:
    if data.startswith(b"%PDF-"):
        return Sniffed("pdf", "application/pdf")
    for magic, content_type in _IMAGES:
        if data.startswith(magic):
            return Sniffed("image", content_type)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return Sniffed("image", "image/webp")
    text = _as_text(data)
    if text is None:
        raise Refused(f"This kind of file cannot be read here. Accepted: {ACCEPTED}.")
    extension = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    return Sniffed("text", _TEXT_TYPES.get(extension, "text/plain"), text)


def _as_text(data: bytes) -> str | None:
    """The text of `data` if it is text (UTF-8, or UTF-16 with its mark),
    else None: a NUL or many control characters mean it is not."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            return None
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            return None
    if "\x00" in text:
        return None
    sample = text[:65536]
    controls = sum(1 for ch in sample if ord(ch) < 32 and ch not in "\t\n\r\f\v\x1b")
    if sample and controls / len(sample) > 0.01:
        return None
    return text
