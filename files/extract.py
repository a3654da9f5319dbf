"""A PDF's text, read by a child process (files/pdftext.py) with a time and
a memory limit: a hostile or huge PDF gets a clear refusal and never holds
up the event loop or a database thread. A few at a time per process; the
rest wait their turn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from django.conf import settings

from .sniff import Refused

log = logging.getLogger(__name__)

_CHILD = Path(__file__).with_name("pdftext.py")
_turns: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


def _semaphore() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    found = _turns.get(loop)
    if found is None:
        found = _turns[loop] = asyncio.Semaphore(max(1, int(settings.CHAT_FILE_EXTRACT_CONCURRENCY)))
    return found


async def pdf_text(data: bytes, *, max_chars: int) -> str:
    """The PDF's text (its pages in order, up to `max_chars`), or Refused."""
    seconds = float(settings.CHAT_FILE_EXTRACT_SECONDS)
    async with _semaphore():
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(_CHILD),
            "--memory-mb",
            str(int(settings.CHAT_FILE_EXTRACT_MEMORY_MB)),
            "--max-chars",
            str(max_chars),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(child.communicate(data), seconds)
        except TimeoutError:
            log.warning("pdf extraction stopped after %.0f s (pid %s)", seconds, child.pid)
            raise Refused(
                f"This PDF could not be read within {seconds:.0f} seconds. Try a smaller or simpler one.",
                code="unreadable_file",
            ) from None
        finally:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()
    if child.returncode == 3:
        raise Refused("This PDF is protected by a password: its text cannot be read.", code="unreadable_file")
    if child.returncode != 0:
        reason = err.decode(errors="replace")[:200]
        log.warning("pdf extraction failed (exit %s): %s", child.returncode, reason)
        if child.returncode == 4 or "MemoryError" in reason:
            raise Refused(
                "This PDF needs more memory to read than is allowed. Try a smaller one.",
                code="unreadable_file",
            )
        raise Refused("This PDF could not be read: it seems damaged.", code="unreadable_file")
    return out.decode("utf-8", errors="replace")
