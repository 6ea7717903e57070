"""Structured output: a grammar that masks each next token, so an answer is valid by construction.

The grammar engine is llguidance (MIT, no dependencies): it compiles a JSON Schema, a regex or
any JSON object into a matcher that, before each token, gives the set of tokens that keep the
output a prefix of something the grammar accepts. The end-of-sequence tokens are in that set
exactly when the output so far is complete.

    ResponseFormat --GrammarCompiler.compile--> Grammar   (checked and cached by its text)
    Grammar.start() -> TokenConstraint                     (one per sequence)
    each step: constraint.mask(logits) -> sample -> constraint.advance(token)

The mask covers the logits' full width, which is larger than the tokenizer's vocabulary (Qwen2:
151936 logits, 151665 tokens): the ids no token has are never allowed. It is applied before any
other logits processor (repetition penalty, temperature, top-k, top-p), so sampling draws from
the allowed tokens only and greedy decoding picks the best allowed one.

JSON is written compactly, as ``json.dumps`` writes it (``", "`` and ``": "``, no other
whitespace): a small model let free to choose whitespace inside JSON tends to emit newlines
until it runs out of tokens.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import llguidance
import numpy as np
from tokenizers import Tokenizer

from lumen_vlm.text import SHOWN_TEXT_CHARS

__all__ = [
    "RESPONSE_FORMAT_KINDS",
    "ConstraintError",
    "Grammar",
    "GrammarCompiler",
    "ResponseFormat",
    "TokenConstraint",
]

ResponseFormatKind = Literal["json", "json_schema", "regex"]
RESPONSE_FORMAT_KINDS: tuple[ResponseFormatKind, ...] = ("json", "json_schema", "regex")

# Any JSON value whose top level is an object: what "json" asks for (OpenAI's json_object).
ANY_JSON_OBJECT = '{"type": "object"}'
# llguidance's JSON options: compact separators and no free whitespace (see the module's doc),
# and no leniency (an unimplemented keyword is an error). Applied over a schema's own
# "x-guidance" options, so a client can neither make the answer something other than JSON nor
# have a keyword silently ignored.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}
# Bounds on a client's grammar, below llguidance's defaults (1M, 200k, 250k): its work units for
# building the lexer (~50 a microsecond) and for each step's mask (~14 a microsecond), and the
# lexer states it may build (1-2 kB each; the states stay with the cached grammar). A labels
# schema needs a few hundred states; a pattern such as ((a{100}){100}){100} otherwise takes
# seconds and hundreds of MB on the scheduler thread, and now fails its request instead.
INITIAL_LEXER_FUEL = 200_000
STEP_LEXER_FUEL = 50_000
MAX_LEXER_STATES = 10_000
# Compiled grammars kept (each a matcher in its start state); a request with a cached schema
# text skips compiling.
CACHED_GRAMMARS = 16


class ConstraintError(ValueError):
    """A response format that cannot be compiled (its text says why), or a grammar that could not
    go on (a resource limit of the grammar engine reached while generating)."""


@dataclass(frozen=True)
class ResponseFormat:
    """What the answer must be: ``json`` (any JSON object), ``json_schema`` (valid against
    `source`, a JSON Schema as JSON text) or ``regex`` (fully matching `source`)."""

    kind: ResponseFormatKind
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in RESPONSE_FORMAT_KINDS:
            raise ValueError(f"response format kind must be one of {', '.join(RESPONSE_FORMAT_KINDS)}, not {self.kind}")


class TokenConstraint:
    """One sequence's place in its grammar: the mask for its next token, and its progress."""

    def __init__(self, matcher: llguidance.LLMatcher, width: int) -> None:
        self._matcher = matcher
        self._width = width
        self._bits = np.zeros((width + 31) // 32, dtype=np.int32)  # llguidance's layout: 32 ids a word

    @property
    def accepting(self) -> bool:
        """The output so far is complete (it may still go on, if the grammar allows)."""
        return self._matcher.is_accepting()

    def allowed(self) -> np.ndarray:
        """A bool per logit: may that token come next? The end-of-sequence tokens are allowed
        exactly when the output so far is complete."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._raise_on_error()
        return np.unpackbits(self._bits.view(np.uint8), count=self._width, bitorder="little").view(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` (one row) with every token the grammar does not allow next set to -inf."""
        if logits.shape != (self._width,):
            raise ValueError(f"the grammar masks {self._width} logits, got a row of shape {logits.shape}")
        return np.where(self.allowed(), logits, logits.dtype.type(-np.inf))

    def advance(self, token_id: int) -> None:
        """Record the token chosen (one `mask` allowed)."""
        if not self._matcher.consume_token(int(token_id)):
            reason = _one_line(self._matcher.get_error())
            raise ConstraintError(f"token {token_id} is not allowed here by the response format: {reason}")

    def _raise_on_error(self) -> None:
        if self._matcher.is_error():
            raise ConstraintError(f"the response format could not be followed: {_one_line(self._matcher.get_error())}")


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled response format; `start` gives each sequence its own constraint."""

    format: ResponseFormat
    _initial: llguidance.LLMatcher
    _width: int
    _lock: threading.Lock

    def start(self) -> TokenConstraint:
        with self._lock:  # one copy at a time of the shared start state
            matcher = self._initial.deep_copy()
        return TokenConstraint(matcher, self._width)


class GrammarCompiler:
    """Compiles response formats for one model's tokenizer, caching them by their text.

    Thread-safe: transports compile on their own threads (a bad format is refused before any
    model work), and the engine starts a constraint from each request's grammar.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        logits_width: int,
        eos_token_ids: Iterable[int],
        max_source_chars: int,
        cached: int = CACHED_GRAMMARS,
    ) -> None:
        """`tokenizer`: the model's own (its tokenizer.json); `logits_width`: the decoder's logits
        per position (the mask's length); `max_source_chars`: the longest schema or pattern."""
        self._text_tokenizer = tokenizer
        self._width = logits_width
        self._eos_token_ids = sorted(eos_token_ids)
        self.max_source_chars = max_source_chars
        self._grammar_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[ResponseFormat, Grammar] = OrderedDict()
        self._cached = cached
        self._lock = threading.Lock()
        # Errors say what is wrong with the format, not the grammar engine's internal state.
        self._limits = llguidance.LLParserLimits(
            verbose_errors=False,
            initial_lexer_fuel=INITIAL_LEXER_FUEL,
            step_lexer_fuel=STEP_LEXER_FUEL,
            max_lexer_states=MAX_LEXER_STATES,
        )

    def grammar_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the tokenizer, built on first use (a 150k-token vocabulary takes
        a while: a server that never constrains never pays it)."""
        with self._lock:
            if self._grammar_tokenizer is None:
                self._grammar_tokenizer = llguidance.LLTokenizer(
                    self._text_tokenizer.to_str(), n_vocab=self._width, eos_token=self._eos_token_ids
                )
            return self._grammar_tokenizer

    def compile(self, response_format: ResponseFormat) -> Grammar:
        """The format's grammar; ConstraintError says what is wrong with a format that has none."""
        with self._lock:
            grammar = self._cache.get(response_format)
            if grammar is not None:
                self._cache.move_to_end(response_format)
                return grammar
        grammar = self._compile(response_format)
        with self._lock:
            self._cache[response_format] = grammar
            while len(self._cache) > self._cached:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, response_format: ResponseFormat) -> Grammar:
        if len(response_format.source) > self.max_source_chars:
            raise ConstraintError(
                f"the {response_format.kind} is {len(response_format.source)} characters, "
                f"more than the limit of {self.max_source_chars}"
            )
        definition = _grammar_definition(response_format)
        # The matcher checks the grammar as it builds it (llguidance's validate_grammar would
        # build it a second time): an invalid one leaves it in its error state.
        matcher = llguidance.LLMatcher(self.grammar_tokenizer(), definition, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise ConstraintError(f"the {response_format.kind} cannot be used: {_one_line(matcher.get_error())}")
        # The first mask here, on the submitting thread: its lexer work is shared by every
        # sequence that starts from this grammar, and a grammar that cannot produce anything
        # (a $ref that only refers to itself) is refused now, not after the request took a slot.
        matcher.compute_bitmask()
        if matcher.is_error():
            reason = _one_line(matcher.get_error())
            raise ConstraintError(f"the {response_format.kind} cannot be used: it admits no answer ({reason})")
        return Grammar(response_format, matcher, self._width, threading.Lock())


def _grammar_definition(response_format: ResponseFormat) -> str:
    if response_format.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(response_format.source)
    source = ANY_JSON_OBJECT if response_format.kind == "json" else response_format.source
    try:
        schema = json.loads(source)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ConstraintError(f"the json_schema is not valid JSON: {_one_line(str(exc))}") from None
    if not isinstance(schema, dict):
        raise ConstraintError("the json_schema must be a JSON object")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConstraintError(f"the json_schema cannot be used: {_one_line(str(exc))}") from None


def _one_line(message: str) -> str:
    """The grammar engine's message, which may quote the client's schema or pattern, made safe to
    show and log: on one line (a regex error draws its caret on a second), every other
    unprintable character escaped, and cut at SHOWN_TEXT_CHARS."""
    message = message.replace("<non-verbose/>", "")  # llguidance's marker of a shortened message
    line = "".join(char if char.isprintable() else ascii(char)[1:-1] for char in " ".join(message.split()))
    return line if len(line) <= SHOWN_TEXT_CHARS else line[:SHOWN_TEXT_CHARS] + "..."
