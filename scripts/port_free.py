"""`make run`'s first step: exit at once, with a clear message, when the
port is taken (daphne would print "Address already in use" and hang)."""

from __future__ import annotations

import socket
import sys


def main(host: str, port: int) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            print(
                f"Port {port} on {host} is not free ({exc.strerror}): is the chat already running?\n"
                f"Stop the other server, or pick another port: make run PORT={port + 1}",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
