"""The text of a PDF, in a process of its own (files/extract.py starts it):
the PDF on stdin, its pages' text on stdout as UTF-8. Its memory is capped
before anything is parsed (`--memory-mb`), and its parent kills it when it
runs out of time, so that a hostile or huge PDF never holds up a worker."""

from __future__ import annotations

import argparse
import io
import resource
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--max-chars", type=int, required=True)
    args = parser.parse_args()
    limit = args.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    data = sys.stdin.buffer.read()
    import pypdf  # after the cap: its own imports count too

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                reader.decrypt("")
            except Exception:
                sys.stderr.write("encrypted")
                return 3
        pages: list[str] = []
        total = 0
        for page in reader.pages:
            text = page.extract_text() or ""
            pages.append(text)
            total += len(text)
            if total >= args.max_chars:
                break
    except MemoryError:
        sys.stderr.write("memory")
        return 4
    except Exception as exc:
        sys.stderr.write(f"unreadable: {type(exc).__name__}")
        return 2
    sys.stdout.buffer.write("\n\n".join(pages)[: args.max_chars].encode("utf-8", "replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
