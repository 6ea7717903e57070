"""The Ollama and OpenAI APIs through the official clients, PhotoPrism's own request shapes,
and the gRPC answer and transformers' golden for the same request."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pytest

from ..engine.json_prefix import is_json_prefix
from ..service.conftest import image_bytes, infer, make_request, result_of
from .conftest import Both

# The golden case in the tiny model's own resize mode (crop): HTTP requests cannot ask for another.
CASE = "crop_mode"
LABELS_SCHEMA = {
    "type": "object",
    "properties": {"labels": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["labels"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def case(golden: dict[str, Any]) -> dict[str, Any]:
    found = next(c for c in golden["cases"] if c["name"] == CASE)
    assert found["resize_mode"] == "crop" and len(found["messages"]) == 1
    return found


def question(case: dict[str, Any]) -> str:
    return case["messages"][0]["content"]


def data_url(case: dict[str, Any]) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(case["image_bytes"]).decode()


def grpc_answer(both: Both, case: dict[str, Any]) -> str:
    request = make_request(
        image=case["image_bytes"],
        mime="image/jpeg",
        messages=case["messages"],
        max_new_tokens=str(case["max_new_tokens"]),
    )
    return result_of(infer(both, [request])[-1])["text"]  # type: ignore[arg-type]


def assert_json_answer(text: str, finish_reason: str | None) -> None:
    """The tiny model's weights are random: under `json` it may write one long string until its
    token budget ends. Then what it wrote must be the start of a JSON object; else a whole one."""
    assert text.startswith("{")
    if finish_reason == "length":
        assert is_json_prefix(text), text
    else:
        assert isinstance(json.loads(text), dict), text


def test_the_golden_through_grpc_is_the_reference(both: Both, case: dict[str, Any]) -> None:
    assert grpc_answer(both, case) == case["text"]


# --------------------------------------------------------------------------- OpenAI


def openai_client(both: Both, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=both.base + "/v1", api_key=key, max_retries=0, timeout=60)


def chat_messages(case: dict[str, Any]) -> list[dict[str, Any]]:
    parts = [{"type": "text", "text": question(case)}, {"type": "image_url", "image_url": {"url": data_url(case)}}]
    return [{"role": "user", "content": parts}]


def test_openai_chat_completion_equals_the_golden(both: Both, case: dict[str, Any]) -> None:
    client = openai_client(both)
    reply = client.chat.completions.create(
        model=both.service.model_id, messages=chat_messages(case), max_tokens=case["max_new_tokens"], temperature=0
    )
    assert reply.choices[0].message.content == case["text"]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == case["max_new_tokens"]
    assert reply.usage.prompt_tokens == len(case["input_ids"])


def test_openai_chat_stream_joins_to_the_golden_with_usage_last(both: Both, case: dict[str, Any]) -> None:
    client = openai_client(both)
    chunks = list(
        client.chat.completions.create(
            model=both.service.model_id,
            messages=chat_messages(case),
            max_completion_tokens=case["max_new_tokens"],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == case["text"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == case["max_new_tokens"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_openai_response_formats(both: Both, case: dict[str, Any]) -> None:
    client = openai_client(both)
    common: dict[str, Any] = {"model": both.service.model_id, "messages": chat_messages(case), "max_tokens": 200}
    reply = client.chat.completions.create(**common, response_format={"type": "json_object"})
    assert_json_answer(reply.choices[0].message.content or "", reply.choices[0].finish_reason)
    schema_format = {"type": "json_schema", "json_schema": {"name": "labels", "schema": LABELS_SCHEMA}}
    reply = client.chat.completions.create(**common, response_format=schema_format)  # type: ignore[arg-type]
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), LABELS_SCHEMA)


def test_openai_responses_equals_the_golden_whole_and_streamed(both: Both, case: dict[str, Any]) -> None:
    client = openai_client(both)
    content = [{"type": "input_text", "text": question(case)}, {"type": "input_image", "image_url": data_url(case)}]
    request: dict[str, Any] = {
        "model": both.service.model_id,
        "input": [{"role": "user", "content": content}],
        "max_output_tokens": case["max_new_tokens"],
        "temperature": 0,
    }
    reply = client.responses.create(**request)
    assert reply.output_text == case["text"]
    assert reply.status == "incomplete" and reply.usage is not None
    events = list(client.responses.create(**request, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == case["text"]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == case["text"]


def test_openai_models_and_unsupported_fields(both: Both) -> None:
    client = openai_client(both)
    assert [model.id for model in client.models.list()] == [both.service.model_id]
    messages = [{"role": "user", "content": "hi"}]
    for extra, field in (({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"tools": [_tool()]}, "tools")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=both.service.model_id, messages=messages, **extra)  # type: ignore[call-overload]
        assert refused.value.body["param"] == field  # type: ignore[index]
        assert "not supported" in refused.value.message or "one choice" in refused.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]


def _tool() -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


# --------------------------------------------------------------------------- Ollama


def test_ollama_generate_and_chat_equal_the_golden(both: Both, case: dict[str, Any]) -> None:
    client = ollama.Client(host=both.base, timeout=60)
    options = {"temperature": 0, "num_predict": case["max_new_tokens"]}
    reply = client.generate(
        model=both.service.model_id, prompt=question(case), images=[case["image_bytes"]], options=options
    )
    assert reply.response == case["text"]
    assert reply.done and reply.done_reason == "length" and reply.eval_count == case["max_new_tokens"]
    streamed = list(
        client.generate(
            model="fastvlm:0.5b", prompt=question(case), images=[case["image_bytes"]], options=options, stream=True
        )
    )
    assert "".join(part.response for part in streamed) == case["text"]
    assert streamed[-1].done and not any(part.done for part in streamed[:-1])
    message = {"role": "user", "content": question(case), "images": [case["image_bytes"]]}
    chat = client.chat(model=both.service.model_id + ":latest", messages=[message], options=options)
    assert chat.message.content == case["text"] and chat.message.role == "assistant"
    parts = list(client.chat(model=both.service.model_id, messages=[message], options=options, stream=True))
    assert "".join(part.message.content or "" for part in parts) == case["text"]


def test_ollama_format_json_and_schema(both: Both, case: dict[str, Any]) -> None:
    client = ollama.Client(host=both.base, timeout=60)
    common: dict[str, Any] = {"model": both.service.model_id, "prompt": "Labels?", "images": [case["image_bytes"]]}
    reply = client.generate(**common, format="json", options={"num_predict": 200})
    assert_json_answer(reply.response, reply.done_reason)
    labels = json.loads(client.generate(**common, format=LABELS_SCHEMA, options={"num_predict": 200}).response)
    jsonschema.validate(labels, LABELS_SCHEMA)


def test_ollama_model_listing_and_unknown_model(both: Both) -> None:
    client = ollama.Client(host=both.base, timeout=60)
    assert [model.model for model in client.list().models] == [both.service.model_id]
    shown = client.show(both.service.model_id)
    assert {"vision", "completion"} <= set(shown.capabilities or [])
    with pytest.raises(ollama.ResponseError) as missing:
        client.generate(model="gemma3:latest", prompt="hi")
    assert missing.value.status_code == 404 and missing.value.error == 'model "gemma3:latest" not found'
    assert httpx.get(both.base + "/").text == "Ollama is running"
    assert httpx.head(both.base + "/").status_code == 200


# --------------------------------------------------------------------------- PhotoPrism's requests


def test_photoprism_ollama_labels_request(both: Both, case: dict[str, Any]) -> None:
    """Exactly what PhotoPrism's ollama engine posts, read as it reads it: the last JSON object
    of the body, its `response`."""
    body = {
        "id": "0b7d7e5e-7b8e-4a43-9a3c-6f2b8f7d1c11",
        "model": "fastvlm:0.5b",
        "prompt": "Analyze the image and return label objects with name, confidence (0-1), and topicality (0-1).",
        "suffix": "",
        "stream": False,
        "format": "json",
        "think": False,
        "images": [base64.b64encode(case["image_bytes"]).decode()],
        "options": {"temperature": 0.1, "top_p": 0.9, "stop": ["\n\n"]},
    }
    reply = httpx.post(both.base + "/api/generate", json=body, timeout=60)
    assert reply.status_code == 200
    objects = [json.loads(line) for line in reply.text.splitlines() if line.strip()]
    assert_json_answer(objects[-1]["response"], objects[-1]["done_reason"])
    assert objects[-1]["done"] is True and objects[-1]["model"] == both.service.model_id
    # Streamed (PhotoPrism reads that the same way): the last object holds no text, the ones before do.
    streamed = httpx.post(
        both.base + "/api/generate", json=body | {"stream": True, "options": {"temperature": 0}}, timeout=60
    )
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert lines[-1]["done"] is True
    assert_json_answer("".join(x["response"] for x in lines), lines[-1]["done_reason"])


def test_photoprism_openai_responses_request(both: Both, case: dict[str, Any]) -> None:
    body = {
        "model": both.service.model_id,
        "input": [
            {"role": "system", "type": "message", "content": [{"type": "input_text", "text": "You label photos."}]},
            {
                "role": "user",
                "type": "message",
                "content": [
                    {"type": "input_text", "text": "Return labels."},
                    {"type": "input_image", "image_url": data_url(case), "detail": "low"},
                ],
            },
        ],
        "max_output_tokens": 1024,
        "text": {"format": {"type": "json_schema", "name": "photoprism_vision_labels_v1", "schema": LABELS_SCHEMA}},
    }
    reply = httpx.post(both.base + "/v1/responses", json=body, headers={"Authorization": "Bearer x"}, timeout=60)
    assert reply.status_code == 200
    text = next(part["text"] for item in reply.json()["output"] for part in item["content"] if part.get("text"))
    jsonschema.validate(json.loads(text), LABELS_SCHEMA)


def test_greedy_http_equals_grpc_for_a_text_only_request(both: Both) -> None:
    request = make_request(messages=[{"role": "user", "content": "Name three colours."}], max_new_tokens="12")
    expected = result_of(infer(both, [request])[-1])["text"]  # type: ignore[arg-type]
    reply = httpx.post(
        both.base + "/api/chat",
        json={
            "model": both.service.model_id,
            "stream": False,
            "messages": [{"role": "user", "content": "Name three colours."}],
            "options": {"num_predict": 12},
        },
        timeout=60,
    )
    assert reply.json()["message"]["content"] == expected
    assert image_bytes()  # the fixtures are there
