"""The engine: every request in one batch, one decoder call per step.

    submit(request) -> RequestHandle            (any thread; never blocks)
         │ admission: a batch slot, or the bounded queue, or UNAVAILABLE at once
         v
    the preparing thread: messages -> ids, image -> features (the vision encoder)
         │ one request at a time, beside the decoding, so a new photo's encode never
         │ freezes the running streams
         v
    the scheduler thread, each step:
         1. retire what was cancelled, passed its deadline or was stopped by shutdown
         2. sample every sequence's next token from its logits; send text; retire finished
         3. one decoder call for every running sequence (batch = the running sequences)
         4. one prefill chunk of the oldest joining sequence

Sequences join and leave at step boundaries; each owns a slot of the one KV cache, so
neither copies another's cache. The scheduler thread is the only one that runs the decoder,
so the model's decoder-side state (the KV cache, the prefix cache) has one writer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import replace

from ..fastvlm.exceptions import InputError
from ..fastvlm.fastvlm_model import FastVLMModelManager, GenerationRequest, PreparedRequest
from ..generation import ConstraintError, Grammar, GrammarCompiler
from ..resources.exceptions import ConfigError
from ..resources.settings import AdmissionSettings, GenerationLimits
from .admission import Admission
from .errors import CANCELLED_AT_SHUTDOWN, ClientGone, DeadlineExceeded, EngineError, Unavailable
from .events import GenerationResult
from .handle import RequestHandle
from .sequence import Sequence

log = logging.getLogger(__name__)

# A waiting request's queue timeout and deadline are checked at least this often.
_WAIT_SLICE_S = 0.05
# The text of a prompt, besides its image, that a default slot leaves room for (tokens).
PROMPT_TEXT_TOKENS = 512
MIN_DEFAULT_CONCURRENCY = 4


def batch_slots(admission: AdmissionSettings, limits: GenerationLimits, image_tokens: int, context: int) -> int:
    """max_concurrency: as configured, else what the KV budget allows for requests of the
    largest size served (a photo, PROMPT_TEXT_TOKENS of text, max_new_tokens), at least 4."""
    if admission.max_concurrency is not None:
        return admission.max_concurrency
    request_tokens = min(context, image_tokens + PROMPT_TEXT_TOKENS + limits.max_new_tokens)
    return max(MIN_DEFAULT_CONCURRENCY, admission.kv_cache_tokens // request_tokens)


class Engine:
    """Admission, scheduling and batched decoding for one model; transport-free."""

    def __init__(
        self,
        model: FastVLMModelManager,
        admission: AdmissionSettings | None = None,
        limits: GenerationLimits | None = None,
    ) -> None:
        admission = admission or AdmissionSettings()
        limits = limits or GenerationLimits()
        self.model = model
        context = model.spec.text.context_length
        self.max_concurrency = batch_slots(admission, limits, model.spec.image.tokens or 0, context)
        # Each slot gets an equal share of the budget (llama.cpp's n_ctx / n_parallel), never
        # more than the model's context.
        self.slot_tokens = min(context, admission.kv_cache_tokens // self.max_concurrency)
        if self.slot_tokens < 2:
            raise ConfigError(
                f"kv_cache_tokens={admission.kv_cache_tokens} leaves {self.slot_tokens} tokens per slot "
                f"for max_concurrency={self.max_concurrency}"
            )
        image_tokens = model.spec.image.tokens or 0
        if self.slot_tokens <= image_tokens:
            log.warning(
                "a KV slot holds %d tokens, no more than one image's %d: every request with a photo will be "
                "refused; raise kv_cache_tokens or lower max_concurrency",
                self.slot_tokens,
                image_tokens,
            )
        self.prefill_chunk_tokens = admission.prefill_chunk_tokens
        # Structured output: each request's response format, compiled (and cached) at submission.
        spec = model.spec
        self.grammars = GrammarCompiler(
            model.tokenizer, spec.decoder.vocab_size, spec.text.eos_token_ids, limits.max_response_format_chars
        )
        self._kv = model.new_kv_cache(self.max_concurrency, self.slot_tokens)
        self._admission = Admission(self.max_concurrency, admission.max_queue, admission.queue_timeout_s)
        self._cond = threading.Condition()
        self._to_prepare: deque[RequestHandle] = deque()  # admitted, not yet prepared
        self._preparing: RequestHandle | None = None  # the one the preparing thread holds
        self._ready: deque[Sequence] = deque()  # prepared, not yet in a slot
        self._free_slots = list(range(self.max_concurrency))
        self._joining: deque[Sequence] = deque()  # prefilling, oldest first (scheduler thread only)
        self._running: list[Sequence] = []  # decoding (scheduler thread only)
        self._stopping = False
        log.info(
            "engine: %d batch slots of %d tokens (KV cache %.0f MiB), prefill in chunks of %d tokens",
            self.max_concurrency,
            self.slot_tokens,
            self.max_concurrency * self.slot_bytes / 2**20,
            self.prefill_chunk_tokens,
        )
        self._threads = [
            threading.Thread(target=self._prepare_loop, name="lumen-engine-prepare", daemon=True),
            threading.Thread(target=self._schedule_loop, name="lumen-engine", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ the API

    def submit(self, request: GenerationRequest, deadline: float | None = None) -> RequestHandle:
        """Queue `request`; `deadline` is a time.monotonic() value. Never waits for a slot: a
        refusal (busy, shutting down, a response format that cannot be compiled) is the
        handle's error. A new response format is compiled here, on the caller's thread, so a bad
        one is refused before it takes a slot and no engine thread ever compiles."""
        try:
            grammar = self._grammar(request)
        except InputError as exc:
            handle = RequestHandle(request, deadline, self._cancelled)
            handle.fail(exc)
            return handle
        handle = RequestHandle(request, deadline, self._cancelled, grammar)
        with self._cond:
            try:
                admitted = self._admission.offer(handle, time.perf_counter())
            except Unavailable as exc:
                handle.fail(exc)
                return handle
            if admitted:
                self._to_prepare.append(handle)
            self._cond.notify_all()
        return handle

    def _grammar(self, request: GenerationRequest) -> Grammar | None:
        response_format = request.params.response_format
        if response_format is None:
            return None
        try:
            return self.grammars.compile(response_format)
        except ConstraintError as exc:
            raise InputError(f"response_format: {exc}") from None

    @property
    def active(self) -> int:
        """Requests holding a batch slot (preparing, prefilling or decoding)."""
        with self._cond:
            return self._admission.active

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._admission.waiting)

    @property
    def running(self) -> int:
        """Sequences in the decode batch now (the running batch size; prefilling ones not counted)."""
        return len(self._running)

    @property
    def kv_tokens_used(self) -> int:
        """Positions held in the KV cache by every slot together (a read for metrics: unlocked,
        so a step in progress may be half counted)."""
        return sum(self._kv.lengths)

    @property
    def kv_tokens(self) -> int:
        """Positions the KV cache holds in all, every slot together."""
        return self.max_concurrency * self.slot_tokens

    @property
    def max_queue(self) -> int:
        return self._admission.max_queue

    @property
    def closed(self) -> bool:
        return self._admission.closed

    @property
    def slot_bytes(self) -> int:
        return self._kv.slot_bytes

    def begin_shutdown(self) -> None:
        """New requests and the waiting ones get UNAVAILABLE; admitted ones go on."""
        with self._cond:
            waiting = self._admission.close()
            self._cond.notify_all()
        for handle in waiting:
            handle.fail(Unavailable("the server is shutting down"))

    def cancel_all(self) -> None:
        """Stop every admitted request at its next step; each is answered UNAVAILABLE."""
        with self._cond:
            handles = [*self._to_prepare, *([self._preparing] if self._preparing else [])]
            handles += [s.handle for s in (*self._ready, *self._joining, *self._running)]
            for handle in handles:
                handle.cancel_reason = handle.cancel_reason or Unavailable(CANCELLED_AT_SHUTDOWN)
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing runs or waits; False if `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._admission.idle, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new requests, stop running ones, and stop the engine's threads."""
        self.begin_shutdown()
        self.cancel_all()
        if not self.wait_idle(timeout):
            log.warning("closing with %d generations still running", self.active)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
        self._answer_the_rest()

    def _answer_the_rest(self) -> None:
        """After close: any request not yet answered (its thread was still busy when closing
        gave up waiting) is answered now, so no caller waits forever."""
        with self._cond:
            handles = [*self._to_prepare, *([self._preparing] if self._preparing else [])]
            handles += [s.handle for s in (*self._ready, *self._joining, *self._running)]
        for handle in handles:
            if not handle.done.is_set():
                handle.fail(handle.cancel_reason or Unavailable(CANCELLED_AT_SHUTDOWN))

    # ------------------------------------------------------------------ admission bookkeeping

    def _cancelled(self, handle: RequestHandle) -> None:
        """A caller cancelled: a waiting request leaves the queue now; others at their next step."""
        with self._cond:
            withdrawn = self._admission.withdraw(handle)
            self._cond.notify_all()
        if withdrawn:
            handle.fail(ClientGone("cancelled while waiting for a slot"))

    def _finish_admitted(self, handle: RequestHandle, last: BaseException | GenerationResult) -> None:
        """An admitted request is done: its slot goes to the head of the queue, then its last
        event (`last`: its result or its error) is sent. In that order, so that a client that
        sends its next request when the result arrives finds its own slot free."""
        with self._cond:
            next_handle = self._admission.release()
            if next_handle is not None:
                self._to_prepare.append(next_handle)
            self._cond.notify_all()
        if isinstance(last, GenerationResult):
            handle.send(last)
        else:
            handle.fail(last)

    def _stop_reason(self, handle: RequestHandle, now: float) -> BaseException | None:
        """Why an admitted request must stop now, if it must."""
        if handle.cancel_reason is not None:
            return handle.cancel_reason
        if handle.cancelled:
            return ClientGone("cancelled")
        if handle.past_deadline(now):
            return DeadlineExceeded("the request's deadline passed")
        return None

    # ------------------------------------------------------------------ the preparing thread

    def _prepare_loop(self) -> None:
        """Prepares admitted requests, one at a time; between them (never during a decoder
        step, however long) answers waiting requests whose queue time or deadline ran out."""
        while True:
            with self._cond:
                while True:
                    self._expire_waiting()
                    if self._stopping:
                        abandoned, self._to_prepare = list(self._to_prepare), deque()
                        break
                    if self._to_prepare:
                        handle, abandoned = self._to_prepare.popleft(), None
                        self._preparing = handle
                        break
                    self._cond.wait(_WAIT_SLICE_S if self._admission.waiting else None)
            if abandoned is not None:  # closing: whatever was not prepared is answered, not left waiting
                for handle in abandoned:
                    self._finish_admitted(handle, handle.cancel_reason or Unavailable(CANCELLED_AT_SHUTDOWN))
                return
            sequence = self._prepared(handle)
            with self._cond:
                self._preparing = None
                if sequence is not None:
                    self._ready.append(sequence)
                self._cond.notify_all()

    def _prepared(self, handle: RequestHandle) -> Sequence | None:
        """The request as a sequence ready to join the batch; None when it was answered instead."""
        reason = self._stop_reason(handle, time.monotonic())
        if reason is not None:
            self._finish_admitted(handle, reason)
            return None
        try:
            prepared = self._fit_slot(self.model.prepare(handle.request))
            reason = self._stop_reason(handle, time.monotonic())  # cancelled while it was prepared
            if reason is not None:
                raise reason
            return Sequence(handle, prepared, self.model.tokenizer, self.model.spec.text.eos_token_ids)
        except ValueError as exc:  # settings the sampler or the stop rules refuse
            self._finish_admitted(handle, InputError(str(exc)))
        except (InputError, ClientGone, DeadlineExceeded, Unavailable) as exc:
            self._finish_admitted(handle, exc)
        except Exception as exc:  # a bug or a runtime failure: this request fails, the engine goes on
            log.exception("preparing a request failed")
            self._finish_admitted(handle, exc)
        return None

    def _fit_slot(self, prepared: PreparedRequest) -> PreparedRequest:
        """Clamp the budget to the room the prompt leaves in a slot; InputError if it has none."""
        room = self.slot_tokens - int(prepared.input_ids.size)
        if room < 1:
            raise InputError(
                f"the prompt has {prepared.input_ids.size} tokens; a KV slot holds {self.slot_tokens} "
                f"(kv_cache_tokens / max_concurrency)"
            )
        return replace(prepared, max_new_tokens=min(prepared.max_new_tokens, room))

    # ------------------------------------------------------------------ the scheduler thread

    def _schedule_loop(self) -> None:
        while True:
            with self._cond:
                # Both threads answer expired waiters, so neither a long encode nor a long step
                # delays a queue timeout by more than the other thread's next turn.
                self._expire_waiting()
                self._take_ready()
                if self._stopping and not (self._joining or self._running):
                    return
                if not (self._joining or self._running):
                    self._cond.wait(_WAIT_SLICE_S if self._admission.waiting else None)
                    continue
            try:
                self._step()
            except Exception as exc:  # the batch's call failed: its requests fail, the engine goes on
                log.exception("a decode step failed")
                self._fail_batch(exc)

    def _fail_batch(self, error: Exception) -> None:
        """Every sequence in the failed call fails (each with an exception of its own, so that no
        caller's traceback holds another's frames); the slots are freed whatever happens."""
        for sequence in list(self._running):
            try:
                self._retire(sequence, EngineError(f"the batched decode step failed: {error}"))
            except Exception:  # pragma: no cover - the engine must outlive any one failure
                log.exception("retiring a sequence failed")

    def _expire_waiting(self) -> None:
        """(lock held) Answer waiting requests whose queue time or deadline ran out."""
        if not self._admission.waiting:
            return
        for handle, error in self._admission.expired(time.perf_counter(), time.monotonic()):
            handle.fail(error)

    def _take_ready(self) -> None:
        """(lock held) Prepared requests take free slots and start prefilling."""
        while self._ready:
            sequence = self._ready.popleft()
            slot = self._free_slots.pop(0)  # the lowest: running rows stay packed at the front
            sequence.join(slot, self.model.prefill(sequence.prepared, self._kv, slot, self.prefill_chunk_tokens))
            self._joining.append(sequence)

    def _step(self) -> None:
        now = time.monotonic()
        for sequence in [*self._running, *self._joining]:
            reason = self._stop_reason(sequence.handle, now)
            if reason is not None:
                self._retire(sequence, reason)
        for sequence in list(self._running):
            if sequence.logits is None:
                continue
            try:
                finished = sequence.sample()
            except ConstraintError as exc:  # its grammar hit one of the grammar engine's limits
                self._retire(sequence, InputError(f"response_format: {exc}"))
                continue
            except Exception as exc:  # this sequence's own rules failed (logits with no finite value)
                log.exception("sampling failed")
                self._retire(sequence, EngineError(f"sampling failed: {exc}"))
                continue
            if finished:
                self._retire(sequence, sequence.result())
        if self._running:
            logits = self.model.decode(self._kv, [s.slot for s in self._running], [s.last_token for s in self._running])
            for sequence, row in zip(self._running, logits, strict=True):
                sequence.logits = row
        if self._joining:
            self._prefill_chunk(self._joining[0])

    def _prefill_chunk(self, sequence: Sequence) -> None:
        try:
            logits = next(sequence.prefill)
        except InputError as exc:
            self._retire(sequence, exc)
            return
        except Exception as exc:  # this request's own call failed: it fails alone, the batch goes on
            log.exception("prefilling a request failed")
            self._retire(sequence, exc)
            return
        if logits is not None:
            self._joining.popleft()
            sequence.logits = logits
            self._running.append(sequence)

    def _retire(self, sequence: Sequence, last: BaseException | GenerationResult) -> None:
        """Take a sequence out of the batch at once, free its slot, and send its last event."""
        if sequence in self._running:
            self._running.remove(sequence)
        elif sequence in self._joining:
            self._joining.remove(sequence)
        else:
            return
        try:
            sequence.prefill.close()  # type: ignore[attr-defined]
        finally:
            self._kv.release(sequence.slot)
            with self._cond:
                self._free_slots.append(sequence.slot)
                self._free_slots.sort()
            self._finish_admitted(sequence.handle, last)
