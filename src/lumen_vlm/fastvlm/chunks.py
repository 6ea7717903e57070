"""Chunk reassembly: a stream's messages into `CompleteRequest`s, each with its whole payload.

The Go SDK sends a payload over 1 MiB in chunks (see `ChunkAssembler` for the rules). Memory
is bounded per upload, per stream and, through an `UploadBudget`, across every stream; time is
bounded by the owner, which expires uploads that went silent. A broken upload is refused with
a `ChunkError` (INVALID_ARGUMENT), one that does not fit the budget with `UploadsBusy`
(UNAVAILABLE), a silent one with `UploadTimedOut` (DEADLINE_EXCEEDED). What the request says
(its meta and payload) is read afterwards, by `request_meta`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..engine.errors import DeadlineExceeded, Unavailable
from ..resources.settings import VLMSettings
from .exceptions import RequestError


class ChunkError(RequestError):
    """A chunked upload is broken: out of order, duplicated, overlapping, incomplete, too large."""


class UploadsBusy(Unavailable):
    """The service holds as many unfinished chunked upload bytes as it may: retry later."""


class UploadTimedOut(DeadlineExceeded):
    """A chunked upload sent nothing for too long and was dropped."""


@dataclass(frozen=True)
class CompleteRequest:
    """One request with its whole payload, after chunk reassembly."""

    correlation_id: str
    task: str
    meta: Mapping[str, str]
    payload: bytes = b""
    payload_mime: str = ""


# Room for a request's meta (messages can be up to max_messages_chars) beside its payload, in
# one gRPC message; an unfinished upload keeps its meta, so the upload budget counts it too.
MAX_META_BYTES = 1024 * 1024

MAX_CHUNKS = 65_536  # 20 MiB in chunks of 320 bytes; the Go SDK needs 80 for 20 MiB

# Unfinished chunked uploads, all streams together, may hold this many whole payloads.
_UPLOAD_BUDGET_PAYLOADS = 4


def _meta_size(meta: Mapping[str, str]) -> int:
    """What a request's meta costs to keep, roughly: its characters."""
    return sum(len(key) + len(value) for key, value in meta.items())


def upload_budget_bytes(settings: VLMSettings) -> int:
    """The bytes all streams' unfinished chunked uploads may hold together: an `UploadBudget`'s size."""
    return _UPLOAD_BUDGET_PAYLOADS * settings.limits.max_payload_bytes


class UploadBudget:
    """The bytes of unfinished chunked uploads held across the whole service, bounded.

    Every stream's `ChunkAssembler` reserves each chunk's bytes here before buffering them and
    releases them when the upload completes, fails or its stream ends. A chunk that would go
    over `max_bytes` fails its upload with `UploadsBusy` (UNAVAILABLE): the client retries later.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def reserve(self, size: int) -> None:
        with self._lock:
            if self._used + size > self.max_bytes:
                raise UploadsBusy(
                    f"too many uploads in progress: the server holds {self._used} bytes of unfinished "
                    f"chunked uploads and accepts at most {self.max_bytes}; retry later"
                )
            self._used += size

    def release(self, size: int) -> None:
        with self._lock:
            self._used -= size


class _Position(NamedTuple):
    """Where a message that could not be read said it belongs in an upload."""

    seq: int
    total: int


@dataclass
class _Upload:
    task: str
    payload_mime: str
    meta: Mapping[str, str]
    total: int
    buffer: bytearray = field(default_factory=bytearray)
    next_seq: int = 0
    last_chunk_at: float = field(default_factory=time.monotonic)
    held: int = 0  # bytes reserved in the budget: the payload so far and the meta kept with it


class _FailedUpload:
    """Which chunks of a failed upload have been seen, so the rest can be dropped quietly."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._seen = bytearray((total + 7) // 8)  # a bitmap: bounded by MAX_CHUNKS / 8 bytes
        self._count = 0

    def see(self, seq: int) -> bool:
        """Mark `seq` seen; False if it is outside the upload or was seen before."""
        if not 0 <= seq < self.total:
            return False
        byte, bit = divmod(seq, 8)
        if self._seen[byte] & (1 << bit):
            return False
        self._seen[byte] |= 1 << bit
        self._count += 1
        return True

    @property
    def complete(self) -> bool:
        return self._count == self.total


class ChunkAssembler:
    """Reassembles chunked payloads on one stream.

    The Go SDK splits a payload over 1 MiB into 256 KiB chunks sent as consecutive requests
    sharing a correlation_id, each with the full meta, seq 0..total-1 and offset = the chunk's
    byte offset. Chunks must arrive in order and exactly adjacent: anything else (out of order,
    duplicate, gap, overlap, a changed total) fails the upload with one error. The failed
    upload's other chunks are then dropped quietly, so the client gets exactly one answer for
    it; a chunk seen twice after the failure starts over (a retry). A request is never answered
    from a partial payload.

    A chunk without a correlation_id cannot be tied to its upload. The first one is answered
    with an error; the id-less chunks with seq > 0 and the same total that follow it are taken
    for the rest of that upload and dropped quietly, up to its last chunk or until an id-less
    chunk with seq 0 (a new upload, answered again) or another total arrives.

    Memory is bounded: each upload by `max_payload_bytes`, at most `max_uploads` uploads open
    on a stream at once, at most `max_failed` failed uploads remembered, and, with a `budget`
    shared by every stream, the bytes of all unfinished uploads together (their meta counted);
    one stream's unfinished uploads may hold at most `max_payload_bytes` and `MAX_META_BYTES`
    of the budget together, so one client cannot take it all. Time is bounded too: the owner
    calls `expire` to drop uploads that received no chunk for a while (it knows when the
    stream is idle), and `abandon` when the stream ends, however it ends, to give the budget
    back.

    Thread-safe, because our front door feeds a chunk in a pool thread while the stream itself
    lives on the event loop: a client that cancels while its chunk waits for the pool has its
    stream abandoned first. An abandoned assembler takes nothing more (`feed` returns None),
    so that chunk cannot hold budget for a stream that is gone.
    """

    def __init__(
        self, max_payload_bytes: int, max_uploads: int = 4, max_failed: int = 16, budget: UploadBudget | None = None
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.max_stream_bytes = max_payload_bytes + MAX_META_BYTES  # this stream's share of the budget
        self.max_uploads = max_uploads
        self._max_failed = max_failed
        self._budget = budget
        self._uploads: dict[str, _Upload] = {}
        self._failed: OrderedDict[str, _FailedUpload] = OrderedDict()
        self._idless_total: int | None = None  # the id-less upload whose chunks are being dropped
        self._lock = threading.Lock()
        self._abandoned = False

    def feed(self, request: Any, correlation_id: str) -> CompleteRequest | None:
        """The complete request once its last chunk is in, None while an upload is incomplete
        (or once the stream was abandoned)."""
        with self._lock:
            return None if self._abandoned else self._feed(request, correlation_id)

    def _feed(self, request: Any, correlation_id: str) -> CompleteRequest | None:
        if request.total <= 1:
            return self._single(request, correlation_id)
        if not request.correlation_id:
            return self._without_id(request)
        if self._absorbed_by_failure(correlation_id, request):
            return None
        upload = self._uploads.get(correlation_id)
        try:
            if upload is None:
                upload = self._start(request, correlation_id)
            else:
                self._check_next(upload, request)
            self._append(upload, request)
        except (ChunkError, UploadsBusy):
            self._fail(correlation_id, request, upload)
            raise
        return self._finish(correlation_id) if upload.next_seq == upload.total else None

    def next_expiry(self, idle_s: float) -> float | None:
        """When (time.monotonic()) the stalest open upload will have been idle for `idle_s`."""
        with self._lock:
            if not self._uploads:
                return None
            return min(upload.last_chunk_at for upload in self._uploads.values()) + idle_s

    def expire(self, idle_s: float, now: float | None = None) -> list[tuple[str, UploadTimedOut]]:
        """Drop the uploads that received no chunk for `idle_s` seconds; an error for each.

        Their bytes go back to the budget, and their late chunks are dropped quietly: the
        error is the upload's one answer.
        """
        now = time.monotonic() if now is None else now
        errors = []
        with self._lock:
            stale = [(cid, up) for cid, up in self._uploads.items() if now - up.last_chunk_at >= idle_s]
            for correlation_id, upload in stale:
                self._fail(correlation_id, None, upload)
                errors.append(
                    (
                        correlation_id,
                        UploadTimedOut(
                            f"the chunked upload received {upload.next_seq} of {upload.total} chunks, then nothing "
                            f"for {idle_s:g} s (upload_idle_timeout_s); it was dropped, send it again"
                        ),
                    )
                )
        return errors

    def touch(self) -> None:
        """The owner was busy answering, not reading: the open uploads' silence starts now."""
        with self._lock:
            now = time.monotonic()
            for upload in self._uploads.values():
                upload.last_chunk_at = now

    def reject(self, correlation_id: str, seq: int, total: int) -> None:
        """A message of this stream that could not be read claimed this place in an upload:
        fail that upload (it can no longer complete) so that its later chunks are dropped quietly."""
        with self._lock:
            upload = self._uploads.get(correlation_id)
            if upload is not None or total > 1:
                self._fail(correlation_id, _Position(seq, total), upload)

    def abandon(self) -> list[tuple[str, ChunkError]]:
        """Errors for the uploads still open when the stream ends: they never completed.

        Their bytes go back to the budget; a second call finds nothing left, and `feed` takes
        nothing more.
        """
        with self._lock:
            self._abandoned = True
            errors = [
                (cid, ChunkError(f"the stream ended after {up.next_seq} of {up.total} chunks of the payload"))
                for cid, up in self._uploads.items()
            ]
            for upload in self._uploads.values():
                self._release(upload)
            self._uploads.clear()
        return errors

    @property
    def open_uploads(self) -> int:
        return len(self._uploads)

    # ------------------------------------------------------------------ steps

    def _single(self, request: Any, correlation_id: str) -> CompleteRequest:
        if request.seq != 0:
            raise ChunkError(
                f"seq is {request.seq} but total is {request.total}: a request that is not chunked has seq 0, "
                "and a chunked one starts at seq 0 of total > 1"
            )
        upload = self._uploads.get(correlation_id)
        if upload is not None:
            self._fail(correlation_id, request, upload)
            raise ChunkError(
                f"a non-chunked request (total={request.total}) reused the correlation_id "
                "of an unfinished chunked upload"
            )
        return CompleteRequest(correlation_id, request.task, dict(request.meta), request.payload, request.payload_mime)

    def _without_id(self, request: Any) -> None:
        """Refuse an id-less upload once; drop what looks like the rest of it (returns None)."""
        total, seq = int(request.total), int(request.seq)
        last = seq >= total - 1
        if self._idless_total == total and seq > 0:
            if last:
                self._idless_total = None
            return None
        self._idless_total = None if last else total
        raise ChunkError(
            "a chunked payload (total > 1) needs a correlation_id to tie its chunks together; "
            "the rest of this upload is ignored"
        )

    def _absorbed_by_failure(self, correlation_id: str, request: Any) -> bool:
        """True for a not yet seen chunk of a failed upload: dropped, it was already answered."""
        failed = self._failed.get(correlation_id)
        if failed is None:
            return False
        if request.total != failed.total or not failed.see(request.seq):
            del self._failed[correlation_id]  # another upload with the same id, or a retry
            return False
        if failed.complete:
            del self._failed[correlation_id]
        return True

    def _start(self, request: Any, correlation_id: str) -> _Upload:
        if request.seq != 0:
            raise ChunkError(f"chunk seq {request.seq} of {request.total} arrived before chunk 0 (out of order)")
        if request.offset != 0:
            raise ChunkError(f"chunk 0 must start at offset 0, got offset {request.offset}")
        if request.total > min(MAX_CHUNKS, self.max_payload_bytes):
            raise ChunkError(f"a payload in {request.total} chunks is more than this service accepts")
        if len(self._uploads) >= self.max_uploads:
            raise ChunkError(f"too many chunked uploads open on this stream (at most {self.max_uploads})")
        upload = _Upload(request.task, request.payload_mime, dict(request.meta), int(request.total))
        self._uploads[correlation_id] = upload
        return upload

    @staticmethod
    def _check_next(upload: _Upload, request: Any) -> None:
        if request.total != upload.total:
            raise ChunkError(
                f"chunk seq {request.seq} says total={request.total}, but the upload began with total={upload.total}"
            )
        if request.task != upload.task or request.payload_mime != upload.payload_mime:
            raise ChunkError(f"chunk seq {request.seq} changes the task or payload_mime of the upload")
        if request.seq < upload.next_seq:
            raise ChunkError(f"duplicate chunk: seq {request.seq} was already received")
        if request.seq > upload.next_seq:
            raise ChunkError(
                f"chunk seq {request.seq} arrived but seq {upload.next_seq} was expected (out of order or missing)"
            )
        received = len(upload.buffer)
        if request.offset < received:
            raise ChunkError(
                f"chunk seq {request.seq} at offset {request.offset} overlaps the {received} bytes received"
            )
        if request.offset > received:
            raise ChunkError(f"chunk seq {request.seq} at offset {request.offset} leaves a gap after {received} bytes")

    def _append(self, upload: _Upload, request: Any) -> None:
        size = len(upload.buffer) + len(request.payload)
        if size > self.max_payload_bytes:
            raise ChunkError(f"the chunked payload exceeds the limit of {self.max_payload_bytes} bytes")
        # The meta is kept from chunk 0 to the end, so it counts too: else a chunk 0 of 1 MiB
        # meta and a 1-byte payload would hold memory the budget does not see.
        adding = len(request.payload) + (_meta_size(upload.meta) if upload.next_seq == 0 else 0)
        held = sum(other.held for other in self._uploads.values())
        if held + adding > self.max_stream_bytes:
            raise UploadsBusy(
                f"this stream's unfinished chunked uploads would hold {held + adding} bytes, more than one "
                f"stream may ({self.max_stream_bytes} bytes: max_payload_bytes and its meta): finish an upload first"
            )
        if self._budget is not None:
            self._budget.reserve(adding)
        upload.held += adding
        upload.buffer += request.payload
        upload.next_seq += 1
        upload.last_chunk_at = time.monotonic()

    def _release(self, upload: _Upload) -> None:
        if self._budget is not None:
            self._budget.release(upload.held)
        upload.held = 0
        upload.buffer = bytearray()

    def _finish(self, correlation_id: str) -> CompleteRequest:
        upload = self._uploads.pop(correlation_id)
        payload = bytes(upload.buffer)
        self._release(upload)
        return CompleteRequest(correlation_id, upload.task, upload.meta, payload, upload.payload_mime)

    def _fail(self, correlation_id: str, request: Any | None, upload: _Upload | None) -> None:
        """Forget the upload's bytes; remember which of its chunks were seen, to drop the rest.

        `request` is the chunk that failed it (anything with seq and total), None if none did.
        """
        self._uploads.pop(correlation_id, None)
        if upload is not None:
            self._release(upload)
        total = upload.total if upload is not None else int(request.total) if request is not None else 0
        if not 1 < total <= MAX_CHUNKS:
            return
        failed = _FailedUpload(total)
        for seq in range(upload.next_seq if upload is not None else 0):
            failed.see(seq)
        if request is not None and request.total == total:
            failed.see(request.seq)
        if failed.complete:
            return
        self._failed[correlation_id] = failed
        while len(self._failed) > self._max_failed:
            self._failed.popitem(last=False)
