"""Structured output through the engine, on the tiny random-weight model (which writes gibberish).

Every request here would fail its check without the constraint: unconstrained, the tiny model's
answers are not JSON and match none of the patterns (`test_unconstrained_answers_fail_every_check`).
Requests are sent together, so the masks are applied per sequence inside batched steps.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import jsonschema
import pytest

from lumen_vlm.engine import Engine, GenerationResult, TextDelta
from lumen_vlm.fastvlm.fastvlm_model import GenerationParams, GenerationRequest
from lumen_vlm.generation import FinishReason, ResponseFormat, SamplingParams
from lumen_vlm.resources.settings import AdmissionSettings

from ..parity import golden_request
from .conftest import BatchRecorder
from .json_prefix import is_json_prefix

SEEDS = range(8)
QUESTION = [{"role": "user", "content": "Describe the photo as JSON."}]
# Room for any answer the bounded schemas and patterns allow (their longest is some 200 tokens).
ROOM = 600


def bounded(properties: dict[str, Any]) -> dict[str, Any]:
    """An object with exactly these keys, all required."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


SHORT_TEXT = {"type": "string", "maxLength": 12}
SCORE = {"type": "number", "minimum": 0, "maximum": 1}
# Schemas whose every answer is short: each must finish (EOS) within ROOM and validate.
BOUNDED_SCHEMAS = {
    "nested": bounded(
        {
            "photo": bounded(
                {
                    "width": {"type": "integer", "minimum": 1, "maximum": 8192},
                    "camera": bounded({"make": SHORT_TEXT, "flash": {"type": "boolean"}}),
                }
            )
        }
    ),
    "array-bounds": bounded({"tags": {"type": "array", "items": SHORT_TEXT, "minItems": 2, "maxItems": 4}}),
    "enums": bounded(
        {"scene": {"enum": ["indoor", "outdoor", "unknown"]}, "mood": {"type": "string", "enum": ["calm", "busy"]}}
    ),
    "number-bounds": bounded(
        {
            "count": {"type": "integer", "minimum": -5, "maximum": 5},
            "score": SCORE,
            "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
        }
    ),
    "labels-bounded": bounded(
        {
            "labels": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": bounded({"name": SHORT_TEXT, "confidence": SCORE, "topicality": SCORE}),
            }
        }
    ),
}
# PhotoPrism's labels, as its prompt asks for them: nothing bounds a name's length, or the
# number of labels, or other keys, so an answer may be cut by max_new_tokens.
PHOTOPRISM_LABELS = {
    "type": "object",
    "properties": {
        "labels": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "confidence": SCORE, "topicality": SCORE},
                "required": ["name", "confidence", "topicality"],
            },
        }
    },
    "required": ["labels"],
}
BOUNDED_PATTERNS = [
    r"(yes|no)",
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
    r"[a-z]{3,8}( [a-z]{3,8}){0,3}\.",
    r"(cat|dog|bird): [0-9]{1,3}%",
]


def sampling(seed: int | None) -> SamplingParams:
    """Greedy for None; else sampled at temperature 1 with the other filters in play too."""
    if seed is None:
        return SamplingParams()
    return SamplingParams(temperature=1.0, top_k=200, top_p=0.95, repetition_penalty=1.1, seed=seed)


def ask(
    response_format: ResponseFormat | None, seed: int | None, max_new_tokens: int = ROOM, **params: Any
) -> GenerationRequest:
    return GenerationRequest(
        messages=QUESTION,
        params=GenerationParams(
            max_new_tokens=max_new_tokens, sampling=sampling(seed), response_format=response_format, **params
        ),
    )


def run_all(engine: Engine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Submit every request at once (they share steps), then wait for each result."""
    handles = [engine.submit(item) for item in requests]
    return [handle.result() for handle in handles]


@pytest.fixture(scope="module")
def engine(fused_manager: Any) -> Any:
    engine = Engine(fused_manager, AdmissionSettings(max_concurrency=6, max_queue=64))
    yield engine
    engine.close()


def schema_format(schema: dict[str, Any]) -> ResponseFormat:
    return ResponseFormat("json_schema", json.dumps(schema))


def test_unconstrained_answers_fail_every_check(engine: Engine) -> None:
    """The checks below are not met by chance: without the constraint no answer passes one."""
    results = run_all(engine, [ask(None, seed, max_new_tokens=60) for seed in (None, *SEEDS)])
    for result in results:
        assert result.response_format is None
        with pytest.raises(ValueError):
            json.loads(result.text)
        assert not any(re.fullmatch(pattern, result.text) for pattern in BOUNDED_PATTERNS)


@pytest.mark.parametrize("name", list(BOUNDED_SCHEMAS))
def test_every_answer_under_a_bounded_schema_is_valid(engine: Engine, name: str) -> None:
    schema = BOUNDED_SCHEMAS[name]
    results = run_all(engine, [ask(schema_format(schema), seed) for seed in (None, *SEEDS)])
    for seed, result in zip((None, *SEEDS), results, strict=True):
        assert result.finish_reason is FinishReason.EOS, f"seed {seed}: {result.text!r}"
        jsonschema.validate(json.loads(result.text), schema)
        assert result.response_format == "json_schema"
    assert len({result.text for result in results}) > 1, "sampling gave every seed the same answer"


@pytest.mark.parametrize("pattern", BOUNDED_PATTERNS)
def test_every_answer_under_a_pattern_matches_it_fully(engine: Engine, pattern: str) -> None:
    results = run_all(engine, [ask(ResponseFormat("regex", pattern), seed) for seed in (None, *SEEDS)])
    for seed, result in zip((None, *SEEDS), results, strict=True):
        assert result.finish_reason is FinishReason.EOS, f"seed {seed}: {result.text!r}"
        assert re.fullmatch(pattern, result.text), f"seed {seed}: {result.text!r}"
        assert result.response_format == "regex"


@pytest.mark.parametrize(
    ("response_format", "schema"),
    [(ResponseFormat("json"), {"type": "object"}), (schema_format(PHOTOPRISM_LABELS), PHOTOPRISM_LABELS)],
    ids=["json", "photoprism-labels"],
)
def test_every_answer_under_an_open_format_is_valid_or_a_valid_start(
    engine: Engine, response_format: ResponseFormat, schema: dict[str, Any]
) -> None:
    """Nothing bounds these answers' length: each either ends as valid JSON or is cut by
    max_new_tokens, and then its text is the start of a JSON document (documented). With most of
    the context to write in, most end (on this model: every `json` answer, and 6 of 9 labels)."""
    seeds = (None, *SEEDS)
    budget = 900  # of the tiny model's 1024 positions
    results = run_all(engine, [ask(response_format, seed, max_new_tokens=budget) for seed in seeds])
    finished = 0
    for seed, result in zip(seeds, results, strict=True):
        if result.finish_reason is FinishReason.EOS:
            jsonschema.validate(json.loads(result.text), schema)
            finished += 1
        else:
            assert result.finish_reason is FinishReason.LENGTH, f"seed {seed}"
            assert result.generated_tokens == budget
            assert is_json_prefix(result.text), f"seed {seed}: {result.text!r}"
    assert finished * 3 >= len(seeds), f"only {finished} of {len(seeds)} answers ended"


def test_an_answer_cut_by_max_new_tokens_is_a_valid_start(engine: Engine) -> None:
    (result,) = run_all(engine, [ask(schema_format(BOUNDED_SCHEMAS["labels-bounded"]), None, max_new_tokens=6)])
    assert result.finish_reason is FinishReason.LENGTH
    assert result.text.startswith('{"labels": [')
    assert is_json_prefix(result.text)
    with pytest.raises(ValueError):
        json.loads(result.text)


def test_a_stop_sequence_and_the_grammar_both_apply(engine: Engine) -> None:
    schema = BOUNDED_SCHEMAS["enums"]
    (free,) = run_all(engine, [ask(schema_format(schema), None)])
    (stopped,) = run_all(engine, [ask(schema_format(schema), None, stop_sequences=(", ",))])
    assert stopped.finish_reason is FinishReason.STOP_SEQUENCE
    assert stopped.text == free.text.split(", ")[0]  # the same answer, cut before the stop string
    assert stopped.text.startswith('{"scene": "')


def test_streamed_deltas_join_to_the_final_text(engine: Engine) -> None:
    handles = [engine.submit(ask(schema_format(BOUNDED_SCHEMAS["labels-bounded"]), seed)) for seed in SEEDS]
    for handle in handles:
        deltas, results = [], []
        for event in handle:
            (deltas if isinstance(event, TextDelta) else results).append(event)
        assert len(deltas) > 1
        assert "".join(delta.text for delta in deltas) == results[0].text
        json.loads(results[0].text)


def test_a_bad_format_is_refused_at_submission_without_a_slot(engine: Engine) -> None:
    bad = ask(ResponseFormat("json_schema", '{"type": "object", "not": {}}'), None)
    handle = engine.submit(bad)
    assert handle.done.is_set(), "refused at once, on the caller's thread"
    with pytest.raises(Exception, match="response_format: the json_schema cannot be used: Unimplemented keys"):
        handle.result()
    assert engine.active == 0


def characters_of(text: str) -> str:
    """A regex of any text made of `text`'s characters (each written as \\x{...}).

    Not `text` itself: where a grammar leaves only one way on, the grammar engine allows only
    the tokens the tokenizer would cut that text into, which need not be the tokens the model
    picked. Here every step leaves many characters open, so nothing is forced.
    """
    return "[" + "".join(f"\\x{{{ord(char):x}}}" for char in sorted(set(text))) + "]*"


@pytest.mark.parametrize("model", ["manager", "fused_manager"])
def test_a_constraint_that_admits_the_greedy_tokens_changes_nothing(
    request: pytest.FixtureRequest, golden: dict[str, Any], model: str
) -> None:
    """The golden answers (transformers' greedy tokens) under a pattern that admits each of their
    tokens but refuses most others: the same tokens, so the mask leaves the logits it allows as
    they were."""
    manager = request.getfixturevalue(model)
    vocabulary = manager.tokenizer.get_vocab_size(with_added_tokens=False)  # the ids above are special
    cases = [case for case in golden["cases"] if "\ufffd" not in case["text"] and max(case["output_ids"]) < vocabulary]
    assert len(cases) >= 3, "too few golden answers are whole characters to test this"
    engine = Engine(BatchRecorder(manager), AdmissionSettings(max_concurrency=4))
    try:
        constrained = []
        for case in cases:
            pattern = characters_of(case["text"])
            assert engine.grammars.compile(ResponseFormat("regex", pattern)).start().allowed().mean() < 0.7
            params = replace(golden_request(case).params, response_format=ResponseFormat("regex", pattern))
            constrained.append(replace(golden_request(case), params=params))
        results = run_all(engine, constrained)
    finally:
        engine.close()
    for case, result in zip(cases, results, strict=True):
        assert list(result.token_ids) == case["output_ids"], case["name"]
        assert result.text == case["text"]


def test_a_constrained_request_leaves_its_neighbours_golden(fused_manager: Any, golden: dict[str, Any]) -> None:
    """Constrained and free requests in one batch: the free ones keep transformers' tokens."""
    recorder = BatchRecorder(fused_manager)
    engine = Engine(recorder, AdmissionSettings(max_concurrency=4))
    try:
        cases = golden["cases"][:2]
        free = [engine.submit(golden_request(case)) for case in cases]
        constrained = [engine.submit(ask(ResponseFormat("json"), seed, max_new_tokens=40)) for seed in (1, 2)]
        free_results = [handle.result() for handle in free]
        for handle in constrained:
            assert is_json_prefix(handle.result().text)
    finally:
        engine.close()
    for case, result in zip(cases, free_results, strict=True):
        assert list(result.token_ids) == case["output_ids"], case["name"]
    assert max(recorder.batch_sizes) > 1, "the requests never shared a step"
