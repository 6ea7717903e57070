"""The seed README's Python client example, run verbatim against a real server.

Only the address and the image path differ from the README. The example uses `json` without
importing it; this module's import provides it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from lumen_resources.result_schemas.text_generation_v1 import TextGenerationV1

from ..conftest import GOLDEN
from .conftest import CALL_TIMEOUT, Served

ACCEPTED_FINISH_REASONS = {"stop", "length", "eos_token", "stop_sequence"}


# fmt: off
def readme_example(port: int, image_path: str) -> dict[str, Any]:
    import grpc  # noqa: I001 - the README's import block, as written
    from lumen_vlm.proto import ml_service_pb2, ml_service_pb2_grpc

    # Connect to service
    channel = grpc.insecure_channel(f'127.0.0.1:{port}')
    stub = ml_service_pb2_grpc.InferenceStub(channel)

    # Prepare multimodal request
    with open(image_path, 'rb') as f:
        image_data = f.read()

    messages = [
        {"role": "user", "content": "What do you see in this image?"}
    ]

    request = ml_service_pb2.InferRequest(
        task="vlm_generate",
        payload=image_data,
        payload_mime="image/jpeg",
        meta={
            "messages": json.dumps(messages),
            "max_new_tokens": "256",
            "temperature": "0.7"
        }
    )

    # Get response
    response = stub.Infer(iter([request]))
    for resp in response:
        if resp.is_final:
            result = json.loads(resp.result)
            print(f"Generated: {result['text']}")

    channel.close()  # added: the test does not leak the channel
    return result  # added: the test checks what the example printed
# fmt: on


def run_bounded(function: Any, *args: Any) -> Any:
    """Run the example (which sets no RPC timeout) in a thread with a bounded wait."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as exc:  # re-raised in the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(CALL_TIMEOUT)
    assert not thread.is_alive(), "the README example did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_readme_example_verbatim(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_bounded(readme_example, served.port, str(GOLDEN / "portrait.jpg"))
    printed = capsys.readouterr().out
    document = TextGenerationV1.model_validate(result)
    assert printed == f"Generated: {result['text']}\n"
    assert document.finish_reason.value in ACCEPTED_FINISH_REASONS
    assert 1 <= document.generated_tokens <= 256
    assert document.input_tokens and document.input_tokens > 16  # the 16 image tokens and the question
    assert document.model_id == "tiny-fastvlm"
    assert document.metadata is not None and document.metadata.temperature == pytest.approx(0.7)


@pytest.mark.parametrize("case_name", ["describe", "describe_portrait", "system_prompt"])
def test_greedy_request_matches_the_golden_text(served: Served, golden: dict[str, Any], case_name: str) -> None:
    """The README's request, greedy and with the golden's token budget: transformers' exact text."""
    from lumen_vlm.proto import ml_service_pb2

    case = next(c for c in golden["cases"] if c["name"] == case_name)
    mime = "image/png" if case["image"].endswith(".png") else "image/jpeg"
    request = ml_service_pb2.InferRequest(
        task="vlm_generate",
        payload=Path(GOLDEN / case["image"]).read_bytes(),
        payload_mime=mime,
        meta={
            "messages": json.dumps(case["messages"]),
            "max_new_tokens": str(case["max_new_tokens"]),
            "temperature": "0",
            "resize_mode": case["resize_mode"],  # the tiny model's own rule is crop; these goldens are pad's
        },
    )
    (response,) = list(served.stub.Infer(iter([request]), timeout=CALL_TIMEOUT))
    result = json.loads(response.result)
    assert result["text"] == case["text"]
    assert result["finish_reason"] == case["finish_reason"]
    assert result["generated_tokens"] == len(case["output_ids"])
    assert result["input_tokens"] == len(case["input_ids"])
