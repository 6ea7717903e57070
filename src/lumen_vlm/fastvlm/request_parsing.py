"""From the wire to a `GenerationRequest`: chunk reassembly, payload checks, meta validation.

Everything here is cheap and runs before a request is admitted, so a malformed request is
refused at once, with a message naming the key and what is wrong with it, and never takes a
generation slot. Every refusal is an `InputError` (INVALID_ARGUMENT on the wire): a
`RequestError` for the wire format and meta values, and the owners' own errors for the checks
they own and this module only calls: `image.check_image_bytes` (size, signature) and
`prompt.normalize_messages` (roles, content). Echoed client values go through `text.shown`.

Meta values are strings on the wire. Numbers must be plain ASCII decimal, as every client
formats them (the Go SDK sends ``"%d"`` integers and ``"%.1f"`` floats, so an integer may also
be written ``"256.0"``): no spaces, underscores, other scripts' digits, hex, inf or nan, which
Python's int() and float() would take. Bools are true/false/1/0/yes/no in any case. Unknown
keys are ignored (clients add their own), and logged at DEBUG.

A correlation_id is at most `MAX_CORRELATION_ID_BYTES`: every response and log line about a
request carries it, so an unbounded one would cost its size again in each.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..generation import SamplingParams
from ..resources.model_spec import ResizeMode
from ..resources.settings import GenerationLimits
from ..text import invalid_text, shown, shown_id, shown_list
from .admission import DeadlineExceeded, Unavailable
from .exceptions import InputError
from .fastvlm_model import GenerationParams, GenerationRequest
from .image import IMAGE_MIMES, ImageLimits, check_image_bytes, image_limits
from .prompt import Message, normalize_messages

log = logging.getLogger(__name__)

# Common spellings of the accepted types; "image/jpg" is not registered but widely sent.
MIME_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}

# Bounds with no setting of their own. OpenAI-style APIs cap temperature at 2: above it the
# distribution is close to uniform and the output is noise, so a larger value is a client bug.
MAX_TEMPERATURE = 2.0
# transformers suggests 1.0-1.5; 10 already makes every seen token practically impossible.
MAX_REPETITION_PENALTY = 10.0
MAX_SEED = 2**63 - 1
# Bits of a seed drawn for an unseeded sampled request: 53 keep it exact in any JSON reader
# (JavaScript numbers are doubles), so the reported seed can always be sent back.
DRAWN_SEED_BITS = 53
# A UUID is 36 bytes, a W3C trace id 32 and a traceparent 55: 256 leaves room for any id
# scheme (a client prefix, a trace id and a span) while keeping every line that names it short.
MAX_CORRELATION_ID_BYTES = 256

KNOWN_META_KEYS = frozenset(
    {
        "messages",
        "prompt",
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "seed",
        "stop_sequences",
        "stop",
        "add_generation_prompt",
        "do_sample",
        "resize_mode",
    }
)
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


class RequestError(InputError):
    """The request is malformed: INVALID_ARGUMENT, the client can fix it."""


class UploadsBusy(Unavailable):
    """The service holds as many unfinished chunked upload bytes as it may: retry later."""


class UploadTimedOut(DeadlineExceeded):
    """A chunked upload sent nothing for too long and was dropped."""


# --------------------------------------------------------------------------- the request's id


def check_correlation_id(correlation_id: str) -> None:
    """Refuse a correlation_id longer than `MAX_CORRELATION_ID_BYTES` in UTF-8 (an empty one is fine)."""
    size = len(correlation_id.encode("utf-8", "surrogatepass"))  # counts whatever the wire decoded to
    if size > MAX_CORRELATION_ID_BYTES:
        raise RequestError(
            f"correlation_id is {size} bytes, more than the limit of {MAX_CORRELATION_ID_BYTES} bytes (UTF-8)"
        )


# --------------------------------------------------------------------------- scalar values

# What a number may look like, in place of int() and float(), which also take spaces, "1_0",
# other scripts' digits ("١٠"), inf and nan. [0-9], never \d, which matches those digits too.
# A decimal is a JSON number; an integer is one without exponent or fraction, but "256.0" (an
# integral "%.1f", the Go SDK's float format) is one too.
_INTEGER = re.compile(r"-?[0-9]+(?:\.0+)?")
_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


def parse_int(key: str, raw: str, low: int, high: int) -> int:
    """An integer in [low, high], in ASCII digits with an optional "-"; "256" and "256.0" both give 256."""
    if not _INTEGER.fullmatch(raw):
        raise RequestError(f"meta '{key}' must be an integer in ASCII digits, such as 256 or 256.0, got {shown(raw)}")
    out_of_range = RequestError(f"meta '{key}' must be between {low} and {high}, got {shown(raw)}")
    try:
        value = int(raw.split(".", 1)[0])
    except ValueError:  # more digits than int() converts (4,300): far outside any bound
        raise out_of_range from None
    if not low <= value <= high:
        raise out_of_range
    return value


def parse_float(key: str, raw: str, low: float, high: float, *, low_open: bool = False) -> float:
    """A finite float in [low, high] (or (low, high] when low_open), in ASCII decimal notation."""
    if not _DECIMAL.fullmatch(raw):
        raise RequestError(
            f"meta '{key}' must be a number in ASCII decimal notation, such as 0.7 or 1e-3, got {shown(raw)}"
        )
    value = float(raw)
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"meta '{key}' must be a number in {interval}, got {shown(raw)}")
    return value


def parse_bool(key: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RequestError(f"meta '{key}' must be true/false (or 1/0, yes/no), got {shown(raw)}")


# --------------------------------------------------------------------------- meta keys


def parse_messages(meta: Mapping[str, str], limits: GenerationLimits) -> list[Message]:
    """`messages` (a JSON list of {role, content}) or, without it, `prompt` as one user turn.

    The JSON is decoded here; the messages are validated and normalized by
    `prompt.normalize_messages`, which owns them (its PromptError names the message at fault).
    """
    raw = meta.get("messages", "")
    if not raw.strip():
        return normalize_messages([{"role": "user", "content": _parse_prompt(meta, limits)}])
    if len(raw) > limits.max_messages_chars:
        raise RequestError(
            f"meta 'messages' is {len(raw)} characters, more than the limit of {limits.max_messages_chars}"
        )
    return normalize_messages(_decode_json("messages", raw, "a JSON list of {role, content} objects"))


def _decode_json(key: str, raw: str, expected: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestError(
            f"meta '{key}' is not valid JSON ({exc.msg} at position {exc.pos}); expected {expected}"
        ) from None
    except RecursionError:  # e.g. "[[[[...": the decoder recurses once per level
        raise RequestError(f"meta '{key}' is nested too deeply to be {expected}") from None


def _parse_prompt(meta: Mapping[str, str], limits: GenerationLimits) -> str:
    prompt = meta.get("prompt")
    if prompt is None:
        raise RequestError("meta needs 'messages' (a JSON list of {role, content} objects) or 'prompt'")
    if not prompt.strip():
        raise RequestError("meta 'prompt' is empty")
    if len(prompt) > limits.max_messages_chars:
        raise RequestError(
            f"meta 'prompt' is {len(prompt)} characters, more than the limit of {limits.max_messages_chars}"
        )
    return prompt


def parse_stop_sequences(meta: Mapping[str, str], limits: GenerationLimits) -> tuple[str, ...]:
    """`stop_sequences` (or its alias `stop`): a JSON list of non-empty strings, bounded."""
    key, raw = _stop_key(meta)
    if raw is None or not raw.strip():
        return ()
    value = _decode_json(key, raw, "a JSON list of strings")
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RequestError(f"meta '{key}' must be a JSON list of strings, got {shown(raw)}")
    if len(value) > limits.max_stop_sequences:
        raise RequestError(
            f"meta '{key}' holds {len(value)} stop sequences, more than the limit of {limits.max_stop_sequences}"
        )
    for index, stop in enumerate(value):
        if not stop:
            raise RequestError(f"meta '{key}'[{index}] is an empty string")
        problem = invalid_text(stop)
        if problem is not None:
            raise RequestError(f"meta '{key}'[{index}] is not valid text: {problem}")
        if len(stop) > limits.max_stop_sequence_chars:
            raise RequestError(
                f"meta '{key}'[{index}] is {len(stop)} characters, "
                f"more than the limit of {limits.max_stop_sequence_chars}"
            )
    return tuple(value)


def _stop_key(meta: Mapping[str, str]) -> tuple[str, str | None]:
    stop_sequences, stop = meta.get("stop_sequences"), meta.get("stop")
    if stop_sequences is not None and stop is not None and stop_sequences != stop:
        raise RequestError("meta 'stop_sequences' and its alias 'stop' are both set and differ; send one")
    return ("stop_sequences", stop_sequences) if stop_sequences is not None else ("stop", stop)


def parse_sampling(meta: Mapping[str, str]) -> SamplingParams:
    """Sampling happens when temperature > 0.

    `do_sample=true` without a temperature means temperature 1.0 (transformers' default).
    `do_sample=false` does not override an explicit temperature: the Go SDK always sends
    do_sample=false next to the temperature the app asked for.

    A sampled request without a seed gets a fresh random one, which the result reports, so any
    sampled answer can be reproduced by sending its seed back. A greedy request keeps the seed
    it was given, if any (greedy decoding does not use it).
    """
    temperature = _optional(meta, "temperature", lambda k, v: parse_float(k, v, 0.0, MAX_TEMPERATURE))
    do_sample = _optional(meta, "do_sample", parse_bool)
    if temperature is None:
        temperature = 1.0 if do_sample else 0.0
    top_p = _optional(meta, "top_p", lambda k, v: parse_float(k, v, 0.0, 1.0, low_open=True))
    top_k = _optional(meta, "top_k", lambda k, v: parse_int(k, v, 0, 2**31 - 1))
    penalty = _optional(
        meta, "repetition_penalty", lambda k, v: parse_float(k, v, 0.0, MAX_REPETITION_PENALTY, low_open=True)
    )
    seed = _optional(meta, "seed", lambda k, v: parse_int(k, v, 0, MAX_SEED))
    if seed is None and temperature > 0:
        seed = secrets.randbits(DRAWN_SEED_BITS)
    try:
        return SamplingParams(
            temperature=temperature,
            top_k=0 if top_k is None else top_k,
            top_p=1.0 if top_p is None else top_p,
            repetition_penalty=1.0 if penalty is None else penalty,
            seed=seed,
        )
    except ValueError as exc:  # the bounds above are stricter; kept as a second line of defence
        raise RequestError(f"invalid sampling parameters: {exc}") from None


def _optional(meta: Mapping[str, str], key: str, parse: Any) -> Any:
    raw = meta.get(key)
    return None if raw is None or not raw.strip() else parse(key, raw)


def parse_generation_params(meta: Mapping[str, str], limits: GenerationLimits) -> GenerationParams:
    default_max = limits.request_default_max_new_tokens
    max_new = _optional(meta, "max_new_tokens", lambda k, v: parse_int(k, v, 1, limits.max_new_tokens))
    add_prompt = _optional(meta, "add_generation_prompt", parse_bool)
    return GenerationParams(
        max_new_tokens=default_max if max_new is None else max_new,
        sampling=parse_sampling(meta),
        stop_sequences=parse_stop_sequences(meta, limits),
        add_generation_prompt=True if add_prompt is None else add_prompt,
    )


def parse_resize_mode(meta: Mapping[str, str]) -> ResizeMode | None:
    raw = meta.get("resize_mode")
    if raw is None or not raw.strip():
        return None
    try:
        return ResizeMode(raw.strip().lower())
    except ValueError:
        choices = ", ".join(mode.value for mode in ResizeMode)
        raise RequestError(f"meta 'resize_mode' must be one of {choices}, got {shown(raw)}") from None


# --------------------------------------------------------------------------- payload


def normalize_mime(mime: str) -> str:
    """Lower-cased, parameters dropped, aliases resolved: " Image/JPG; q=1" -> "image/jpeg"."""
    base = mime.split(";", 1)[0].strip().lower()
    return MIME_ALIASES.get(base, base)


def check_image_payload(payload: bytes, payload_mime: str, limits: ImageLimits) -> bytes | None:
    """The image bytes to decode, or None for a text-only request.

    The declared type must be an accepted one; size and signature (which must agree with the
    declared type) are checked by `image.check_image_bytes`. Decoding (corrupt, truncated, too
    many pixels) is the model manager's job.
    """
    declared = normalize_mime(payload_mime)
    if not payload:
        if declared:
            raise RequestError(f"payload_mime is {shown(payload_mime)} but the payload is empty")
        return None
    if declared and declared not in IMAGE_MIMES:
        raise RequestError(f"payload_mime {shown(payload_mime)} is not supported; accepted: {', '.join(IMAGE_MIMES)}")
    check_image_bytes(payload, limits, declared)
    return payload


# --------------------------------------------------------------------------- the whole request


@dataclass(frozen=True)
class CompleteRequest:
    """One request with its whole payload, after chunk reassembly."""

    correlation_id: str
    task: str
    meta: Mapping[str, str]
    payload: bytes = b""
    payload_mime: str = ""


def build_generation_request(request: CompleteRequest, limits: GenerationLimits) -> GenerationRequest:
    """Validate a request's payload and meta into the model manager's request. Raises InputError."""
    unknown = sorted(set(request.meta) - KNOWN_META_KEYS)
    if unknown:
        log.debug(
            "correlation_id=%s ignores unknown meta keys: %s", shown_id(request.correlation_id), shown_list(unknown)
        )
    image = check_image_payload(request.payload, request.payload_mime, image_limits(limits))
    return GenerationRequest(
        messages=parse_messages(request.meta, limits),
        image=image,
        params=parse_generation_params(request.meta, limits),
        resize_mode=parse_resize_mode(request.meta),
    )


# --------------------------------------------------------------------------- chunk reassembly


class ChunkError(RequestError):
    """A chunked upload is broken: out of order, duplicated, overlapping, incomplete, too large."""


# Room for a request's meta (messages can be up to max_messages_chars) beside its payload, in
# one gRPC message; an unfinished upload keeps its meta, so the upload budget counts it too.
MAX_META_BYTES = 1024 * 1024

MAX_CHUNKS = 65_536  # 20 MiB in chunks of 320 bytes; the Go SDK needs 80 for 20 MiB


def _meta_size(meta: Mapping[str, str]) -> int:
    """What a request's meta costs to keep, roughly: its characters."""
    return sum(len(key) + len(value) for key, value in meta.items())


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
