"""The grammar constraint on the tiny model's tokenizer: the mask, EOS, compile errors, the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from lumen_vlm.generation import ConstraintError, Grammar, GrammarCompiler, ResponseFormat, TokenConstraint

from ..conftest import TINY_MODEL

# The tiny model's facts, as its files state them (checked in `test_facts_are_the_models`).
LOGITS_WIDTH = 4032  # config.json's text_config.vocab_size
EOS_IDS = (4000, 4002)
# A schema whose only definition is itself: no JSON value satisfies it.
SELF_REFERENCE = '{"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}'
ENUM_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"scene": {"enum": ["indoor", "outdoor"]}, "people": {"type": "integer"}},
        "required": ["scene", "people"],
        "additionalProperties": False,
    }
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TINY_MODEL / "tokenizer.json"))


@pytest.fixture(scope="module")
def compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, LOGITS_WIDTH, EOS_IDS, max_source_chars=4096)


def test_facts_are_the_models(tokenizer: Tokenizer) -> None:
    config = json.loads((TINY_MODEL / "config.json").read_text())["text_config"]
    assert config["vocab_size"] == LOGITS_WIDTH
    assert tokenizer.get_vocab_size() < LOGITS_WIDTH  # there are padding ids to mask
    assert {config["eos_token_id"], config["bos_token_id"]} == set(EOS_IDS)


def walk(constraint: TokenConstraint, choose: np.random.Generator, steps: int) -> list[np.ndarray]:
    """Advance by random allowed tokens (never EOS), returning each step's mask."""
    masks = []
    for _ in range(steps):
        allowed = constraint.allowed()
        masks.append(allowed)
        choices = [token for token in np.flatnonzero(allowed) if token not in EOS_IDS]
        if not choices:
            break
        constraint.advance(int(choose.choice(choices)))
    return masks


@pytest.mark.parametrize(
    "response_format",
    [ResponseFormat("json"), ResponseFormat("json_schema", ENUM_SCHEMA), ResponseFormat("regex", r"(?s:.*)")],
    ids=["json", "schema", "anything"],
)
def test_the_mask_covers_the_logits_and_never_allows_an_id_without_a_token(
    compiler: GrammarCompiler, tokenizer: Tokenizer, response_format: ResponseFormat
) -> None:
    vocabulary = tokenizer.get_vocab_size()
    for mask in walk(compiler.compile(response_format).start(), np.random.default_rng(0), 40):
        assert mask.shape == (LOGITS_WIDTH,)
        assert mask.dtype == bool
        assert not mask[vocabulary:].any(), "a padding id (no token has it) was allowed"
        assert mask.any()


def test_any_text_allows_every_whole_character_token_and_no_special_one(
    compiler: GrammarCompiler, tokenizer: Tokenizer
) -> None:
    allowed = compiler.compile(ResponseFormat("regex", r"(?s:.*)")).start().allowed()
    special = {token_id for token_id, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    assert not allowed[sorted(special - set(EOS_IDS))].any()
    assert allowed[list(EOS_IDS)].all()  # the empty text matches
    for token in range(tokenizer.get_vocab_size()):
        if token not in special and "\ufffd" not in tokenizer.decode([token]):
            assert allowed[token], f"token {token} ({tokenizer.decode([token])!r}) refused"
    # A token that is only part of a UTF-8 character (a byte-level BPE's lone byte) cannot start a text.
    assert not allowed.all()


def test_eos_is_allowed_exactly_when_the_output_is_complete(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    constraint = compiler.compile(ResponseFormat("json_schema", ENUM_SCHEMA)).start()
    text = '{"scene": "outdoor", "people": 12}'
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    completes = []
    for token in ids:
        allowed = constraint.allowed()
        completes.append(bool(allowed[list(EOS_IDS)].all()))
        assert allowed[list(EOS_IDS)].all() == allowed[list(EOS_IDS)].any()  # both ends, or neither
        assert allowed[token], f"the schema refused a token of {text!r}"
        constraint.advance(token)
    assert not any(completes), "EOS was allowed inside an unfinished object"
    final = constraint.allowed()
    assert constraint.accepting
    assert np.flatnonzero(final).tolist() == sorted(EOS_IDS), "after the closing brace only the end may come"


def test_a_number_may_end_or_go_on(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    constraint = compiler.compile(ResponseFormat("json_schema", '{"type": "integer"}')).start()
    for token in tokenizer.encode("12", add_special_tokens=False).ids:
        constraint.advance(token)
    allowed = constraint.allowed()
    assert allowed[list(EOS_IDS)].all()  # "12" is complete
    assert allowed[tokenizer.token_to_id("3")]  # ... and "123" too


def test_mask_keeps_the_allowed_logits_bit_for_bit(compiler: GrammarCompiler) -> None:
    constraint = compiler.compile(ResponseFormat("json")).start()
    logits = np.random.default_rng(1).standard_normal(LOGITS_WIDTH).astype(np.float32)
    allowed = constraint.allowed()
    masked = constraint.mask(logits)
    assert masked.dtype == np.float32
    assert np.array_equal(masked[allowed], logits[allowed])
    assert np.all(masked[~allowed] == -np.inf)
    assert masked is not logits and np.isfinite(logits).all()  # the row given is not changed


def test_mask_refuses_a_row_of_another_width(compiler: GrammarCompiler) -> None:
    with pytest.raises(ValueError, match="4032 logits"):
        compiler.compile(ResponseFormat("json")).start().mask(np.zeros(4000, dtype=np.float32))


def test_a_token_the_grammar_refuses_is_an_error(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    constraint = compiler.compile(ResponseFormat("json")).start()
    with pytest.raises(ConstraintError, match=r"token \d+ is not allowed here"):
        constraint.advance(tokenizer.token_to_id("a"))  # JSON objects start with "{"


def test_each_sequence_has_its_own_state(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    grammar = compiler.compile(ResponseFormat("regex", "(ab|cd)"))
    first, second = grammar.start(), grammar.start()
    first.advance(tokenizer.token_to_id("a"))
    assert not second.allowed()[tokenizer.token_to_id("b")]  # the second has not seen "a"
    assert first.allowed()[tokenizer.token_to_id("b")]


def test_compiling_is_cached_by_the_format(compiler: GrammarCompiler) -> None:
    schema = '{"type": "object", "properties": {"cached": {"type": "boolean"}}}'
    grammar = compiler.compile(ResponseFormat("json_schema", schema))
    assert compiler.compile(ResponseFormat("json_schema", schema)) is grammar
    any_object = compiler.compile(ResponseFormat("json"))
    assert compiler.compile(ResponseFormat("json_schema", '{"type": "object"}')) is not any_object  # keyed by kind too


def test_the_cache_is_bounded(tokenizer: Tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, LOGITS_WIDTH, EOS_IDS, max_source_chars=100, cached=2)
    first = compiler.compile(ResponseFormat("regex", "a"))
    compiler.compile(ResponseFormat("regex", "b"))
    compiler.compile(ResponseFormat("regex", "c"))
    assert compiler.compile(ResponseFormat("regex", "a")) is not first  # evicted, compiled again


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        (ResponseFormat("json_schema", "{"), "not valid JSON"),
        (ResponseFormat("json_schema", "[1, 2]"), "must be a JSON object"),
        (ResponseFormat("json_schema", '{"type": "strin"}'), "Invalid type: strin"),
        (ResponseFormat("json_schema", '{"not": {"type": "string"}}'), "Unimplemented keys"),
        (ResponseFormat("json_schema", '{"$ref": "#/definitions/missing"}'), "does not exist"),
        (ResponseFormat("json_schema", '{"type": "string", "pattern": "(["}'), "regex parse error"),
        (ResponseFormat("json_schema", SELF_REFERENCE), "admits no answer"),
        (ResponseFormat("regex", "(unclosed"), "unclosed group"),
        (ResponseFormat("regex", "x" * 4097), "4097 characters, more than the limit of 4096"),
    ],
    ids=["json", "not-object", "type", "keyword", "ref", "schema-pattern", "ref-loop", "regex", "size"],
)
def test_a_format_that_cannot_compile_says_why(
    compiler: GrammarCompiler, response_format: ResponseFormat, message: str
) -> None:
    with pytest.raises(ConstraintError, match=message) as caught:
        compiler.compile(response_format)
    assert "\n" not in str(caught.value)  # one line, for a log and an error message alike


def test_the_engines_message_is_escaped_and_cut(compiler: GrammarCompiler) -> None:
    with pytest.raises(ConstraintError) as caught:
        compiler.compile(ResponseFormat("regex", "(\x1b[31m"))  # the message quotes the pattern
    assert "\x1b" not in str(caught.value) and "\\x1b" in str(caught.value)
    with pytest.raises(ConstraintError) as caught:
        compiler.compile(ResponseFormat("regex", "(" + "y" * 3000))
    assert len(str(caught.value)) < 600


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="json, json_schema, regex"):
        ResponseFormat("yaml")  # type: ignore[arg-type]


# From a second read of the change: each of these failed on its first version.


@pytest.mark.parametrize(
    "response_format",
    [
        ResponseFormat("regex", r"[^\s\S]"),
        ResponseFormat("regex", r"[a&&b]"),
        ResponseFormat("json_schema", SELF_REFERENCE),
        ResponseFormat(
            "json_schema", json.dumps({"$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"})
        ),
    ],
    ids=["empty-class", "empty-intersection", "ref-loop", "allof-ref-loop"],
)
def test_a_format_that_no_text_satisfies_is_refused_at_compile(
    compiler: GrammarCompiler, response_format: ResponseFormat
) -> None:
    """Refused at submission, not after the request's image encode and prefill."""
    with pytest.raises(ConstraintError, match="admits no answer"):
        compiler.compile(response_format)


def test_a_schema_too_complex_for_the_grammar_engine_is_refused_without_its_internals(
    compiler: GrammarCompiler,
) -> None:
    """Its panic and backtrace (build paths of the server's machine) stay out of the message."""
    schema = {
        "allOf": [
            {
                "anyOf": [
                    {"type": "object", "properties": {f"a{j}": {"type": "integer"}}, "required": [f"a{j}"]}
                    for j in range(3)
                ]
            }
            for _ in range(8)
        ]
    }
    with pytest.raises(ConstraintError) as refused:
        compiler.compile(ResponseFormat("json_schema", json.dumps(schema)))
    assert "panic" not in str(refused.value) and "backtrace" not in str(refused.value), str(refused.value)


def follows(grammar: Grammar, tokenizer: Tokenizer, text: str) -> bool:
    """Does the grammar let the tokens of `text` through, to a complete answer?"""
    constraint = grammar.start()
    try:
        for token in tokenizer.encode(text, add_special_tokens=False).ids:
            constraint.allowed()
            constraint.advance(token)
    except ConstraintError:
        return False
    return constraint.accepting


def test_a_schemas_own_options_cannot_make_the_answer_not_json(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    schema = {
        "x-guidance": {"item_separator": ";", "key_separator": "="},
        "type": "object",
        "properties": {"a": {"type": "array", "items": {"type": "integer"}}},
        "required": ["a"],
    }
    grammar = compiler.compile(ResponseFormat("json_schema", json.dumps(schema)))
    assert not follows(grammar, tokenizer, '{"a"=[1;2]}')
    assert follows(grammar, tokenizer, '{"a": [1, 2]}')


def test_an_unimplemented_keyword_is_refused_even_when_the_schema_asks_for_leniency(
    compiler: GrammarCompiler,
) -> None:
    schema = {"x-guidance": {"lenient": True}, "type": "string", "not": {"const": "a"}}
    with pytest.raises(ConstraintError, match="Unimplemented keys"):
        compiler.compile(ResponseFormat("json_schema", json.dumps(schema)))


def test_a_boolean_schema_is_refused_clearly(compiler: GrammarCompiler) -> None:
    with pytest.raises(ConstraintError, match="must be a JSON object"):
        compiler.compile(ResponseFormat("json_schema", "true"))
