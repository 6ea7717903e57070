"""response_format over gRPC: each form, the final meta, streaming, refusals before model work."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
from google.protobuf import empty_pb2

from lumen_vlm.proto import ml_service_pb2

from ..engine.json_prefix import is_json_prefix
from .conftest import CALL_TIMEOUT, Served, finals, image_bytes, infer, make_request, result_of

LABELS = {
    "type": "object",
    "properties": {
        "labels": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                    "topicality": {"type": "number", "minimum": 0, "maximum": 1},
                },
                "required": ["name", "confidence", "topicality"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["labels"],
    "additionalProperties": False,
}
LABELS_FORMAT = json.dumps({"type": "json_schema", "schema": LABELS})
QUESTION = [{"role": "user", "content": "<image>List the labels of this photo as JSON."}]


def constrained(task: str = "vlm_generate", correlation_id: str = "json", **meta: Any) -> ml_service_pb2.InferRequest:
    meta.setdefault("max_new_tokens", "300")  # room for any answer LABELS allows
    return make_request(task, image=image_bytes(), messages=QUESTION, correlation_id=correlation_id, **meta)


def test_labels_as_json_from_a_photo(served: Served) -> None:
    requests = [
        constrained(correlation_id=f"s{seed}", response_format=LABELS_FORMAT, temperature="1.0", seed=str(seed))
        for seed in range(4)
    ]
    for response in finals(infer(served, requests)).values():
        result = result_of(response)
        assert result["finish_reason"] == "eos_token"
        jsonschema.validate(json.loads(result["text"]), LABELS)
        assert response.meta["response_format"] == "json_schema"


def test_json_gives_an_object_or_the_start_of_one(served: Served) -> None:
    """Nothing bounds an object's length; the engine's tests show the forms across seeds."""
    (response,) = infer(served, [constrained(response_format=" JSON ", max_new_tokens="100")])
    result = result_of(response)
    if result["finish_reason"] == "eos_token":
        assert isinstance(json.loads(result["text"]), dict)
    else:
        assert result["finish_reason"] == "length"
        assert result["text"].startswith("{") and is_json_prefix(result["text"])
    assert response.meta["response_format"] == "json"


def test_regex_gives_a_full_match(served: Served) -> None:
    pattern = r"(indoor|outdoor), [0-9]{1,2} (people|animals)"
    (response,) = infer(served, [constrained(response_format=json.dumps({"type": "regex", "pattern": pattern}))])
    assert re.fullmatch(pattern, result_of(response)["text"])
    assert response.meta["response_format"] == "regex"


def test_free_text_says_no_format(served: Served) -> None:
    (response,) = infer(served, [constrained(max_new_tokens="4")])
    assert "response_format" not in response.meta


def test_streamed_partials_join_to_the_final_text(served: Served) -> None:
    responses = infer(served, [constrained("vlm_generate_stream", response_format=LABELS_FORMAT)])
    partials = [response.result.decode() for response in responses if not response.is_final]
    final = result_of(responses[-1])
    assert len(partials) > 1
    assert "".join(partials) == final["text"]
    jsonschema.validate(json.loads(final["text"]), LABELS)


def test_the_same_schema_in_other_spacing_is_compiled_once(served: Served) -> None:
    spaced = json.dumps({"type": "json_schema", "schema": LABELS}, indent=4)
    infer(served, [constrained(response_format=LABELS_FORMAT), constrained(response_format=spaced)])
    grammars = served.service.engine.grammars
    cached = [grammar for grammar in grammars._cache.values() if grammar.format.kind == "json_schema"]
    assert [json.loads(grammar.format.source) for grammar in cached].count(LABELS) == 1


class PrepareCounter:
    """The real model manager, counting the requests it prepares (the first model work)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.prepared = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def prepare(self, request: Any) -> Any:
        self.prepared += 1
        return self._model.prepare(request)


@pytest.mark.parametrize(
    "response_format",
    [
        json.dumps({"type": "json_schema", "schema": {"type": "object", "not": {}}}),
        json.dumps({"type": "regex", "pattern": "[a-"}),
        "yaml",
    ],
    ids=["schema", "regex", "form"],
)
def test_a_bad_format_is_refused_before_any_model_work(
    start_server: Callable[..., Served], manager: Any, response_format: str
) -> None:
    counter = PrepareCounter(manager)
    served = start_server(counter)
    (response,) = infer(served, [constrained(response_format=response_format)])
    assert response.error.code == ml_service_pb2.ERROR_CODE_INVALID_ARGUMENT
    assert "response_format" in response.error.message
    assert counter.prepared == 0
    (good,) = infer(served, [constrained(response_format="json", max_new_tokens="8")])
    assert counter.prepared == 1 and not good.HasField("error")


def test_a_pattern_cannot_forge_a_log_line(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="lumen_vlm")
    forged = "\n12:00:00 ERROR lumen_vlm.server: FORGED"
    (response,) = infer(served, [constrained(response_format=json.dumps({"type": "regex", "pattern": "(" + forged}))])
    assert response.error.code == ml_service_pb2.ERROR_CODE_INVALID_ARGUMENT
    assert "\n" not in response.error.message
    assert not any(line.startswith("12:00:00 ERROR") for line in caplog.text.splitlines())


def test_capabilities_list_the_formats_and_the_bound(served: Served) -> None:
    capability = served.stub.GetCapabilities(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert capability.extra["response_formats"] == "json,json_schema,regex"
    for task in capability.tasks:
        assert task.limits["max_response_format_chars"] == str(served.service.settings.limits.max_response_format_chars)
