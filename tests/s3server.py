"""An S3 API server for the tests: moto's, on 127.0.0.1, on a free port it prints first.

    python tests/s3server.py        # prints "port NNNNN", then serves until terminated

Connections are served on threads (a client stopped half way through a request, as the
lock tests stop backups with SIGSTOP, holds up no one else), but the requests themselves
are handled one at a time, each after its body has arrived in full: moto checks a
conditional write's precondition and then writes, in two steps, so two `If-None-Match: *`
PUTs of one key handled concurrently could both pass the check. AWS S3 decides each
condition atomically; one request at a time gives moto the same guarantee.
"""

from __future__ import annotations

import io
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server


class OneAtATime:
    """WSGI middleware: read the whole request body, then run the app under a lock."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH")
        if length:
            body = stream.read(int(length))
        elif environ.get("wsgi.input_terminated"):  # chunked: the stream ends with the body
            body = stream.read()
        else:
            body = b""
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        with self.lock:
            return list(self.app(environ, start_response))


def main() -> None:
    app = OneAtATime(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"port {server.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
