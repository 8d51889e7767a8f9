"""A repository in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, Cloudflare R2),
through aiobotocore: `s3://bucket/prefix`.

Endpoint, region and credentials come from the usual AWS environment and files
(`AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3` for another store than AWS, `AWS_REGION`,
`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `~/.aws/config`), as for the AWS CLI. With a custom
endpoint, requests use path-style addressing (`http://host/bucket/key`), which every
S3-compatible store serves; `AWS_S3_ADDRESSING_STYLE=virtual` overrides it.

How the Backend contract (base.py) maps onto S3:

- An object store's PUT is atomic and durable when it returns: a reader sees the old
  object or the new one in full, never a part. Large objects go up as multipart uploads,
  which become visible only when completed; an interrupted one is not listed, and
  `remove_leftovers` aborts it.
- `create_new` is a conditional PUT (`If-None-Match: *`); `swap` reads the object and its
  ETag, compares the bytes, then PUTs with `If-Match: <etag>`; `delete_if` deletes with
  `If-Match: <etag>`. The store decides each condition atomically, so a lock refresh
  cannot bring back a lock another process removed, and a stale-lock removal cannot
  delete one refreshed meanwhile (FORMAT.md, locks). The store MUST support conditional
  writes (AWS S3 since 2024, MinIO, Ceph RGW); 412 answers are ObjectChanged, as are 409
  (a concurrent conditional write on the same key is in progress).
- `delete` of a missing object must raise MissingObject, which S3's DELETE never says: it
  reads the ETag first (HEAD) and deletes with `If-Match`, so that a vanished object is
  reported and an object replaced in between is not deleted unseen.
- Throttling, 5xx answers and dropped connections are retried by botocore's "standard"
  mode (exponential backoff with full jitter), up to `AWS_MAX_ATTEMPTS` (default
  `MAX_ATTEMPTS`) attempts; what still fails is
  a BackendError naming the operation and the object.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Iterable, Iterator
from typing import Any

from dedupe.backends.base import Backend, Buffer
from dedupe.errors import (
    BackendError,
    MissingObject,
    ObjectChanged,
    TruncatedObject,
)

__all__ = ["S3Backend", "parse_s3_location"]

MAX_ATTEMPTS = 8  # per request, backoff included (botocore "standard" retry mode)
POOL_CONNECTIONS = 16  # concurrent requests per backend
PART_SIZE = 16 << 20  # multipart upload part size (S3's minimum is 5 MiB)
SINGLE_PUT_LIMIT = 64 << 20  # larger objects go up in parts


def parse_s3_location(location: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix/'); the prefix is '' for a
    whole bucket."""
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    bad_part = any(part in ("", ".", "..") for part in prefix.split("/")) if prefix else False
    if not location.startswith("s3://") or not bucket or bad_part:
        raise ValueError("expected s3://bucket or s3://bucket/prefix")
    return bucket, prefix + "/" if prefix else ""


def _code(e: BaseException) -> str:
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _status(e: BaseException) -> int:
    response = getattr(e, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _is_missing(e: BaseException) -> bool:
    # Not NoSuchBucket, also a 404: a missing bucket is a set-up error, not a lost object.
    return _code(e) in ("NoSuchKey", "NotFound", "404")


def _is_condition_failed(e: BaseException) -> bool:
    return _code(e) in ("PreconditionFailed", "ConditionalRequestConflict") or _status(e) in (
        409,
        412,
    )


class S3Backend(Backend):
    """One bucket and key prefix. The client is made on first use, in the running event
    loop; `close()` releases its connections."""

    remote = True

    def __init__(self, location: str) -> None:
        self.bucket, self.prefix = parse_s3_location(location)
        self.location = location
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._opening: asyncio.Lock | None = None

    # ------------------------------------------------------------------ plumbing

    async def _s3(self) -> Any:
        if self._client is not None:
            return self._client
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._client is None:
                try:
                    from aiobotocore.session import get_session
                    from botocore.config import Config
                except ImportError as e:  # an optional dependency
                    raise BackendError(
                        f"{self.location}: S3 support is not installed ({e})",
                        hint="pip install 'dedupe[s3]'",
                    ) from None
                custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                style = os.environ.get("AWS_S3_ADDRESSING_STYLE") or ("path" if custom else "auto")
                config = Config(
                    retries={"mode": "standard", "max_attempts": self._attempts()},
                    max_pool_connections=POOL_CONNECTIONS,
                    s3={"addressing_style": style},
                    connect_timeout=10,
                    read_timeout=60,
                )
                stack = contextlib.AsyncExitStack()
                self._client = await stack.enter_async_context(
                    get_session().create_client("s3", config=config)
                )
                self._stack = stack
        return self._client

    @staticmethod
    def _attempts() -> int:
        """Attempts per request: AWS_MAX_ATTEMPTS, as for the AWS CLI, else MAX_ATTEMPTS."""
        try:
            return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS", "")))
        except ValueError:
            return MAX_ATTEMPTS

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _error(self, e: Exception, action: str, name: str) -> Exception:
        """A dedupe error for a failed request (after botocore's retries)."""
        if _is_missing(e):
            return MissingObject(f"object {name} is missing from the repository")
        if _is_condition_failed(e):
            return ObjectChanged(f"object {name} changed")
        code = _code(e) or type(e).__name__
        if code == "NoCredentialsError":
            return BackendError(
                f"no credentials for {self.location}",
                hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
            )
        if code == "InvalidRange":  # a range that starts at or past the end (416)
            return TruncatedObject(f"object {name} ends before the range asked for")
        where = f"s3://{self.bucket}/{self._key(name)}".rstrip("/")
        if code == "NoSuchBucket":
            return BackendError(
                f"bucket {self.bucket!r} does not exist", hint="create it first, then run init"
            )
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return BackendError(f"access denied while {action} {where} ({code})")
        return BackendError(f"{action} {where} failed: {code}: {e}")

    async def _call(self, action: str, name: str, op: str, **kw: Any) -> Any:
        s3 = await self._s3()
        try:
            return await getattr(s3, op)(Bucket=self.bucket, **kw)
        except Exception as e:  # botocore's ClientError and connection errors
            if isinstance(e, asyncio.CancelledError):
                raise
            raise self._error(e, action, name) from e

    async def _get_object(self, name: str, **kw: Any) -> tuple[Any, bytes]:
        """GetObject and its body. botocore retries a request until the response starts;
        a connection that drops while the body streams is retried here, with the same
        jittered backoff."""
        attempts = self._attempts()
        for attempt in range(attempts):
            response = await self._call("reading", name, "get_object", Key=self._key(name), **kw)
            try:
                async with response["Body"] as stream:
                    return response, bytes(await stream.read())
            except Exception as e:  # aiohttp's payload errors, botocore's streaming errors
                if attempt == attempts - 1:
                    raise self._error(e, "reading", name) from e
                await asyncio.sleep(random.uniform(0, min(20.0, 0.1 * 2**attempt)))
        raise AssertionError("unreachable")

    def _truncated(self, name: str, offset: int, length: int, ends: int) -> TruncatedObject:
        return TruncatedObject(
            f"object {name} is truncated: wanted bytes {offset}..{offset + length}, "
            f"it ends at {ends}",
            hint="run 'dedupe verify' to see which generations are affected",
        )

    # ------------------------------------------------------------------ reads

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if length == 0 or length is None and offset > 0:
            # No byte range names zero bytes, and a range from the very end is refused
            # (416): the size decides.
            size = await self.stat(name)
            if offset > size:
                raise self._truncated(name, offset, length or 0, size)
            if length == 0:
                return b""
        kw: dict[str, Any] = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            kw["Range"] = f"bytes={offset}-{end}"
        try:
            _response, data = await self._get_object(name, **kw)
        except TruncatedObject:  # the range starts at or past the end
            size = await self.stat(name)
            if length is None and offset == size:
                return b""
            raise self._truncated(name, offset, length or 0, size) from None
        if length is not None and len(data) < length:
            raise self._truncated(name, offset, length, offset + len(data))
        return data

    async def _head(self, name: str) -> Any:
        return await self._call("reading", name, "head_object", Key=self._key(name))

    async def stat(self, name: str) -> int:
        return int((await self._head(name))["ContentLength"])

    async def list(self, prefix: str) -> list[str]:
        return list(await self.list_sized(prefix))

    async def list_sized(self, prefix: str) -> dict[str, int]:
        s3 = await self._s3()
        names: dict[str, int] = {}
        try:
            paginator = s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                for obj in page.get("Contents", ()):
                    names[obj["Key"][len(self.prefix) :]] = int(obj["Size"])
        except Exception as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            raise self._error(e, "listing", prefix) from e
        return names

    async def is_empty(self) -> bool:
        response = await self._call("listing", "", "list_objects_v2", Prefix=self.prefix, MaxKeys=1)
        return not response.get("Contents")

    # ------------------------------------------------------------------ writes

    async def put(self, name: str, data: Buffer) -> None:
        if len(data) > SINGLE_PUT_LIMIT:
            await self._multipart(name, _Pushback([data]))
            return
        await self._call("writing", name, "put_object", Key=self._key(name), Body=bytes(data))

    async def put_stream(self, name: str, parts: Iterable[Buffer]) -> None:
        """Parts of PART_SIZE go up as they fill (bounded memory: one part at a time); an
        object smaller than one part is one PUT."""
        pieces = _Pushback(parts)
        first = await asyncio.to_thread(_fill, pieces, PART_SIZE)
        if len(first) < PART_SIZE:
            await self._call("writing", name, "put_object", Key=self._key(name), Body=first)
            return
        await self._multipart(name, pieces, first)

    async def _multipart(self, name: str, pieces: _Pushback, first: bytes | None = None) -> None:
        """Upload `first` and then the rest of `pieces`, in parts of PART_SIZE, as one
        object; abort the upload on any failure, so that nothing but an invisible,
        abortable upload is ever left."""
        key = self._key(name)
        upload = await self._call("writing", name, "create_multipart_upload", Key=key)
        upload_id = upload["UploadId"]
        done: list[dict[str, Any]] = []
        try:
            part = first if first is not None else await asyncio.to_thread(_fill, pieces, PART_SIZE)
            while part or not done:
                response = await self._call(
                    "writing",
                    name,
                    "upload_part",
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=len(done) + 1,
                    Body=part,
                )
                done.append({"PartNumber": len(done) + 1, "ETag": response["ETag"]})
                if len(part) < PART_SIZE:
                    break
                part = await asyncio.to_thread(_fill, pieces, PART_SIZE)
            await self._call(
                "writing",
                name,
                "complete_multipart_upload",
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": done},
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await self._call(
                    "aborting", name, "abort_multipart_upload", Key=key, UploadId=upload_id
                )
            raise

    async def delete(self, name: str) -> None:
        etag = str((await self._head(name))["ETag"])  # MissingObject: nothing to delete
        try:
            await self._call("deleting", name, "delete_object", Key=self._key(name), IfMatch=etag)
        except ObjectChanged:
            # Replaced since the HEAD: content-addressed objects are replaced only by the
            # same bytes, so delete what is there now.
            await self.delete(name)
        except MissingObject:
            # It was there at the HEAD and is gone now: botocore retried a DELETE whose
            # first attempt had landed (its answer was lost), or someone else deleted it.
            # Either way the object is gone, as asked.
            pass

    async def create_new(self, name: str, data: Buffer) -> None:
        try:
            await self._call(
                "creating",
                name,
                "put_object",
                Key=self._key(name),
                Body=bytes(data),
                IfNoneMatch="*",
            )
        except ObjectChanged:
            # botocore retries a PUT whose answer was lost; if the first attempt landed,
            # the retry finds the object there. Our own bytes (a lock holds a random id
            # and a time, so no one else writes the same) mean we created it.
            if await self._holds(name, data):
                return
            raise ObjectChanged(f"object {name} already exists") from None

    async def _holds(self, name: str, data: Buffer) -> bool:
        try:
            return (await self._get_object(name))[1] == data
        except MissingObject:
            return False

    async def _current_etag(self, name: str, expected: bytes) -> str:
        """The ETag of `name` when it holds exactly `expected`; MissingObject or
        ObjectChanged otherwise."""
        response, data = await self._get_object(name)
        if data != expected:
            raise ObjectChanged(f"object {name} changed")
        return str(response["ETag"])

    async def swap(self, name: str, data: Buffer, expected: bytes) -> None:
        etag = await self._current_etag(name, expected)
        try:
            await self._call(
                "replacing", name, "put_object", Key=self._key(name), Body=bytes(data), IfMatch=etag
            )
        except ObjectChanged:
            if await self._holds(name, data):  # a retried PUT whose first attempt landed
                return
            raise

    async def delete_if(self, name: str, expected: bytes) -> None:
        etag = await self._current_etag(name, expected)
        try:
            await self._call("deleting", name, "delete_object", Key=self._key(name), IfMatch=etag)
        except MissingObject:
            # Held `expected` a moment ago and gone now: a retried DELETE whose first
            # attempt landed, or another deleter of the same bytes. Gone, as asked.
            pass

    async def remove_leftovers(self) -> int:
        """Abort the incomplete multipart uploads under the prefix."""
        s3 = await self._s3()
        aborted = 0
        try:
            paginator = s3.get_paginator("list_multipart_uploads")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for upload in page.get("Uploads", ()):
                    await s3.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
        except Exception as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            raise self._error(e, "aborting uploads under", "") from e
        return aborted

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()


class _Pushback(Iterator[Buffer]):
    """An iterator of pieces that can take back the rest of one."""

    def __init__(self, pieces: Iterable[Buffer]) -> None:
        self.pieces = iter(pieces)
        self.back: list[Buffer] = []

    def push(self, piece: Buffer) -> None:
        self.back.append(piece)

    def __next__(self) -> Buffer:
        return self.back.pop() if self.back else next(self.pieces)


def _fill(pieces: _Pushback, size: int) -> bytes:
    """`size` bytes from the front of `pieces` (fewer only at their end); a piece that
    crosses the boundary is split and its rest pushed back. Runs on a worker thread: the
    pieces may block (a spilled manifest read from a temporary file)."""
    out = bytearray()
    while len(out) < size:
        piece = next(pieces, None)
        if piece is None:
            break
        view = memoryview(piece).cast("B")
        room = size - len(out)
        out += view[:room]
        if len(view) > room:
            pieces.push(bytes(view[room:]))
    return bytes(out)
