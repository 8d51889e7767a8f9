"""An HTTP proxy on 127.0.0.1 that makes a share of requests to an S3 API server fail, the
ways object stores fail: 503 SlowDown (throttling), 500 InternalError, a connection reset
part way through a request's upload, and a connection reset part way through a response
(or before any of it: the request was carried out, its answer lost).

    python tests/faultproxy.py --upstream http://127.0.0.1:PORT --rate 0.1 --seed 1

prints "port NNNNN" and serves until terminated. `GET /__faults__` answers, as JSON, how
many requests it forwarded and how many it failed, by kind; `GET /__rate__/R` sets the
share of requests to fail from then on (and answers the same). One request per connection:
the client reconnects for the next (what a client sees after a server's close anyway).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
from collections import Counter
from urllib.parse import urlsplit

KINDS = ("slowdown", "internal", "reset-upload", "reset-download")
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError", "We encountered an error."),
}


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str]] | None:
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.strip():
        return None
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    return head, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            body += size_line + chunk
            if size == 0:
                return bytes(body)
    return await reader.readexactly(int(headers.get("content-length", "0")))


def _error_response(kind: str) -> bytes:
    status, reason, code, message = _ERRORS[kind]
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>{message}</Message></Error>"
    ).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _close_header(head: bytes) -> bytes:
    lines = [
        line
        for line in head.split(b"\r\n")
        if line and not line.lower().startswith((b"connection:", b"keep-alive:"))
    ]
    return b"\r\n".join([*lines, b"Connection: close", b"", b""])


class FaultProxy:
    def __init__(self, upstream: str, rate: float, seed: int, kinds: tuple[str, ...]) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.rate = rate
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.kinds = kinds

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _read_request(reader)
        if request is None:
            return
        head, headers = request
        if head.startswith(b"GET /__rate__/"):  # GET /__rate__/0.5: fail that share from now
            self.rate = float(head.split(b" ")[1].rsplit(b"/", 1)[1])
        if head.startswith((b"GET /__faults__ ", b"GET /__rate__/")):
            body = json.dumps(dict(self.counts)).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            return
        fault = self.rng.choice(self.kinds) if self.rng.random() < self.rate else None
        self.counts[fault or "forwarded"] += 1
        if headers.get("expect", "").lower() == "100-continue":
            # The client sends the body only when told to go on (botocore asks for large
            # uploads); the upstream gets the request without the expectation.
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            head = b"\r\n".join(
                line for line in head.split(b"\r\n") if not line.lower().startswith(b"expect:")
            )
        if fault == "reset-upload":
            size = int(headers.get("content-length", "0"))
            await reader.read(size // 2)  # take half the upload, then drop the connection
            writer.transport.abort()
            return
        body = await _read_body(reader, headers)
        if fault in _ERRORS:
            writer.write(_error_response(fault))
            await writer.drain()
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        try:
            up_writer.write(_close_header(head) + body)
            await up_writer.drain()
            response = await up_reader.read()  # the server closes after one response
        finally:
            up_writer.close()
        if fault == "reset-download":
            # The request was carried out; its answer is cut in half (a body), or lost
            # whole (no body: a PUT's or a DELETE's), so the client cannot tell whether it
            # landed, and retries.
            header_end = response.find(b"\r\n\r\n") + 4
            cut = header_end + (len(response) - header_end) // 2
            if cut > header_end:
                writer.write(response[:cut])
                await writer.drain()
            writer.transport.abort()
            return
        writer.write(response)
        await writer.drain()


async def serve(upstream: str, rate: float, seed: int, kinds: tuple[str, ...]) -> None:
    proxy = FaultProxy(upstream, rate, seed, kinds)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"port {port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kinds", default=",".join(KINDS), help="the faults to choose from")
    args = ap.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or set(kinds) - set(KINDS):
        ap.error(f"--kinds: choose from {', '.join(KINDS)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(serve(args.upstream, args.rate, args.seed, kinds))


if __name__ == "__main__":
    main()
