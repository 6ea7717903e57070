"""One running request inside the engine: its slot, its sampler, its text, its clock."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
from tokenizers import Tokenizer

from ..fastvlm.fastvlm_model import PreparedRequest
from ..generation import SequenceText, TokenSampler
from .events import GenerationResult, TextDelta
from .handle import RequestHandle


class Sequence:
    """A request from its first prefill chunk to its retirement.

    Sampling, detokenizing and the stop rules are per sequence and pure (`generation/`): the
    scheduler hands each sequence its own row of logits, and the sequence says what to send
    and whether it is finished. Each keeps its own seeded generator, so a seeded request
    samples the same text alone or in a batch.
    """

    def __init__(
        self, handle: RequestHandle, prepared: PreparedRequest, tokenizer: Tokenizer, eos_token_ids: frozenset[int]
    ) -> None:
        """ValueError when the request's sampling or stop settings cannot be used."""
        self.handle = handle
        self.prepared = prepared
        self.slot = -1  # given when the sequence joins the batch
        self.prefill: Iterator[np.ndarray | None] = iter(())  # one chunk per next(); then the logits
        params = handle.request.params
        self._sampler = TokenSampler(params.sampling)
        self._text = SequenceText(tokenizer, eos_token_ids, prepared.max_new_tokens, params.stop_sequences)
        self._constraint = None if handle.grammar is None else handle.grammar.start()
        self._history = list(prepared.input_ids.tolist())  # for the repetition penalty
        self.logits: np.ndarray | None = None  # the next token's, once prefill is done
        self.last_token = -1
        self._first_token_at: float | None = None

    def join(self, slot: int, prefill: Iterator[np.ndarray | None]) -> None:
        self.slot, self.prefill = slot, prefill

    def sample(self) -> bool:
        """Pick the next token from `logits` and send the text it makes final; True when the
        sequence is finished (its result is then `result()`, sent once its slot is free)."""
        assert self.logits is not None
        logits = self.logits if self._constraint is None else self._constraint.mask(self.logits)
        # The mask comes first: the sampler's penalty, temperature, top-k and top-p see only
        # the tokens the response format allows.
        token = self._sampler.next_token(logits, self._history)
        if self._constraint is not None:
            self._constraint.advance(token)
        self.logits = None
        if self._first_token_at is None:
            self._first_token_at = time.perf_counter()
        self._history.append(token)
        self.last_token = token
        text = self._text.push(token)
        if text:
            self.handle.send(TextDelta(text, self._text.generated_tokens))
        return self._text.finish_reason is not None

    def result(self) -> GenerationResult:
        now = time.perf_counter()
        submitted = self.handle.submitted
        assert self._text.finish_reason is not None and self._first_token_at is not None
        features = self.prepared.image_features
        return GenerationResult(
            text=self._text.text,
            finish_reason=self._text.finish_reason,
            generated_tokens=self._text.generated_tokens,
            input_tokens=int(self.prepared.input_ids.size),
            image_tokens=0 if features is None else int(features.shape[0]),
            max_new_tokens=self.prepared.max_new_tokens,
            response_format=None if self.handle.grammar is None else self.handle.grammar.format.kind,
            ttft_ms=(self._first_token_at - submitted) * 1000.0,
            generation_time_ms=(now - submitted) * 1000.0,
            token_ids=self._text.token_ids,
        )
