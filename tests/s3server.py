"""An S3 API server for the tests: moto's, on 127.0.0.1, on a free port it prints first.

    python tests/s3server.py        # prints "port NNNNN", then serves until terminated

It serves one request at a time. moto checks a conditional write's precondition and then
writes, in two steps; served concurrently, two `If-None-Match: *` PUTs of one key could
both pass the check. AWS S3 decides each condition atomically, and serving requests one
by one gives moto the same guarantee, which the lock tests rely on.
"""

from __future__ import annotations

import signal
import sys

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server


def main() -> None:
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=False, request_handler=MotoRequestHandler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"port {server.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
