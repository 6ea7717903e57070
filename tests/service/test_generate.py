"""vlm_generate and vlm_generate_stream end to end: results, streaming, several requests per stream."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from lumen_resources.result_schemas.text_generation_v1 import TextGenerationV1

from lumen_vlm.proto import ml_service_pb2

from ..engine.conftest import BatchRecorder
from .conftest import (
    CALL_TIMEOUT,
    JSON_MIME,
    TEXT_MIME,
    Served,
    ThrottledManager,
    finals,
    image_bytes,
    infer,
    make_request,
    result_of,
)


def golden_case(golden: dict[str, Any], name: str = "describe") -> dict[str, Any]:
    return next(c for c in golden["cases"] if c["name"] == name)


def golden_request(golden: dict[str, Any], task: str = "vlm_generate", **meta: Any) -> ml_service_pb2.InferRequest:
    case = golden_case(golden)
    return make_request(
        task,
        image=image_bytes(case["image"]),
        messages=case["messages"],
        max_new_tokens=str(case["max_new_tokens"]),
        correlation_id="golden",
        resize_mode=case["resize_mode"],  # the tiny model's own rule is crop; this golden is pad's
        **meta,
    )


def test_vlm_generate_response_shape(served: Served, golden: dict[str, Any]) -> None:
    (response,) = infer(served, [golden_request(golden, temperature="0.0", seed="7")])
    assert response.correlation_id == "golden"
    assert response.is_final
    assert response.result_mime == JSON_MIME
    assert response.result_schema == "text_generation_v1"
    result = TextGenerationV1.model_validate_json(response.result)
    case = golden_case(golden)
    assert result.text == case["text"]
    assert result.finish_reason.value == "length"
    assert result.generated_tokens == 24
    assert result.input_tokens == len(case["input_ids"])
    assert result.model_id == "tiny-fastvlm"
    assert result.metadata is not None
    assert result.metadata.temperature == 0.0
    assert result.metadata.top_p == 1.0
    assert result.metadata.max_tokens == 24
    assert result.metadata.seed == 7
    assert result.metadata.generation_time_ms is not None and result.metadata.generation_time_ms > 0
    assert result.metadata.streaming_chunks is None
    meta = response.meta
    assert {"lat_ms", "ttft_ms", "input_tokens", "generated_tokens", "finish_reason"} <= set(meta)
    assert meta["input_tokens"] == str(result.input_tokens)
    assert meta["generated_tokens"] == "24"
    assert meta["finish_reason"] == "length"
    assert float(meta["lat_ms"]) >= float(meta["ttft_ms"]) > 0


def test_stream_deltas_join_to_the_final_text(served: Served, golden: dict[str, Any]) -> None:
    responses = infer(served, [golden_request(golden, "vlm_generate_stream")])
    *partials, final = responses
    assert partials, "a streamed generation sends partial responses"
    assert all(not r.is_final for r in partials)
    assert [r.seq for r in partials] == list(range(len(partials)))
    assert all(r.result_mime == TEXT_MIME and r.correlation_id == "golden" for r in partials)
    counts = [int(r.meta["generated_tokens"]) for r in partials]
    assert counts == sorted(counts) and counts[-1] <= 24
    result = result_of(final)
    assert final.result_mime == JSON_MIME and final.result_schema == "text_generation_v1"
    assert "".join(r.result.decode("utf-8") for r in partials) == result["text"] == golden_case(golden)["text"]
    assert result["metadata"]["streaming_chunks"] == len(partials)
    assert final.meta["generated_tokens"] == "24"


def test_partials_arrive_while_the_model_is_still_generating(
    start_server: Any, manager: Any, golden: dict[str, Any]
) -> None:
    """Real streaming: the first delta reaches the client while the generation is held mid-way."""
    held = ThrottledManager(manager, step_s=CALL_TIMEOUT)  # holds after every event until released
    server = start_server(held)
    call = server.stub.Infer(iter([golden_request(golden, "vlm_generate_stream")]), timeout=CALL_TIMEOUT)
    try:
        first = next(call)
        assert not first.is_final and first.seq == 0
        assert held.running == 1 and held.events == 1  # the model has not run past the first delta
    finally:
        held.release()
    rest = list(call)
    assert rest[-1].is_final and all(not r.is_final for r in rest[:-1])
    text = first.result.decode() + "".join(r.result.decode() for r in rest[:-1])
    assert text == result_of(rest[-1])["text"]


def test_several_requests_on_one_stream_are_all_answered(served: Served) -> None:
    requests = [
        make_request(image=image_bytes(), correlation_id="a", max_new_tokens="3"),
        make_request("vlm_generate_stream", image=image_bytes("portrait.jpg"), mime="image/jpeg", correlation_id="b"),
        make_request(prompt="Say something.", max_new_tokens="2"),  # text only, no correlation id
        make_request(image=image_bytes(), correlation_id="d", max_new_tokens="5", temperature="0.7", seed="1"),
    ]
    responses = infer(served, requests)
    by_id = finals(responses)
    assert len(by_id) == 4
    assert {"a", "b", "d"} <= set(by_id)
    (generated,) = set(by_id) - {"a", "b", "d"}
    assert len(generated) >= 16  # a fresh id for the request that had none
    assert result_of(by_id["a"])["generated_tokens"] == 3
    assert result_of(by_id[generated])["generated_tokens"] == 2
    assert result_of(by_id["d"])["generated_tokens"] == 5
    # In order: everything for "a" comes before anything for "b", and so on.
    order = [r.correlation_id for r in responses]
    assert order.index("b") > order.index("a") and order.index(generated) > len(order) - 3


def test_sampling_is_reproducible_with_a_seed(served: Served) -> None:
    def sampled(correlation_id: str) -> str:
        request = make_request(
            image=image_bytes(),
            correlation_id=correlation_id,
            max_new_tokens="16",
            temperature=f"{0.9:.1f}",  # the Go SDK formats floats with %.1f
            top_p="0.95",
            top_k="50",
            seed="1234",
            do_sample="false",  # the Go SDK always sends it; it does not cancel the temperature
        )
        (response,) = infer(served, [request])
        return result_of(response)["text"]

    assert sampled("s1") == sampled("s2")


def test_an_unseeded_sample_reports_the_seed_that_reproduces_it(served: Served) -> None:
    def sampled(**seed: str) -> dict[str, Any]:
        request = make_request(image=image_bytes(), max_new_tokens="16", temperature="1.0", top_k="50", **seed)
        (response,) = infer(served, [request])
        return result_of(response)

    first = sampled()
    seed = first["metadata"]["seed"]
    assert isinstance(seed, int)
    assert sampled(seed=str(seed))["text"] == first["text"]
    assert sampled()["metadata"]["seed"] != seed  # each unseeded request draws its own


def test_a_greedy_request_reports_no_seed_unless_given(served: Served) -> None:
    (response,) = infer(served, [make_request(prompt="hi", max_new_tokens="2", temperature="0")])
    assert "seed" not in result_of(response)["metadata"]


def test_concurrent_generations_give_the_sequential_results(start_server: Any) -> None:
    """4 threads x 3 greedy requests on 4 slots: every text is what the same request gives alone."""
    server = start_server(max_concurrency=4, max_queue=8)
    prompts = ["Describe the image.", "What colours are there?", "Is it day or night?"]

    def request(index: int, correlation_id: str) -> ml_service_pb2.InferRequest:
        task = "vlm_generate_stream" if index % 2 else "vlm_generate"
        return make_request(
            task,
            image=image_bytes("portrait.jpg" if index % 2 else "landscape.png"),
            mime="image/jpeg" if index % 2 else "image/png",
            messages=[{"role": "user", "content": prompts[index]}],
            max_new_tokens="24",
            temperature="0",
            correlation_id=correlation_id,
        )

    expected = [result_of(infer(server, [request(i, "alone")])[-1])["text"] for i in range(len(prompts))]
    assert len(set(expected)) == len(prompts)  # different requests, so a mix-up would show
    start = threading.Barrier(4)

    def worker(thread: int) -> list[tuple[int, str]]:
        start.wait(CALL_TIMEOUT)
        texts = []
        for i in range(len(prompts)):
            index = (i + thread) % len(prompts)  # each thread its own order, so different requests overlap
            (final,) = finals(infer(server, [request(index, f"t{thread}-{index}")])).values()
            texts.append((index, result_of(final)["text"]))
        return texts

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(worker, range(4)))
    assert len(results) == 4
    for texts in results:
        assert len(texts) == 3
        for index, text in texts:
            assert text == expected[index], (index, text)
    assert server.service.in_flight == 0


def test_concurrent_golden_requests_share_decode_steps_and_give_transformers_tokens(
    start_server: Any, fused_manager: Any, golden: dict[str, Any]
) -> None:
    """Every golden case at once through gRPC on the batched path: the texts are transformers'
    greedy ones, and the engine decoded them together."""
    recorder = BatchRecorder(fused_manager, step_s=0.02)  # 24 steps: long enough for all to join
    server = start_server(recorder, max_concurrency=4, max_queue=8)

    def ask(case: dict[str, Any]) -> str:
        request = make_request(
            "vlm_generate_stream",
            image=case["image_bytes"],
            mime="image/jpeg" if case["image"].endswith(".jpg") else "image/png",
            messages=case["messages"],
            max_new_tokens=str(case["max_new_tokens"]),
            resize_mode=case["resize_mode"],
            correlation_id=case["name"],
        )
        return result_of(infer(server, [request])[-1])["text"]

    with ThreadPoolExecutor(max_workers=len(golden["cases"])) as pool:
        texts = list(pool.map(ask, golden["cases"]))
    assert texts == [case["text"] for case in golden["cases"]]
    assert max(recorder.batch_sizes) > 1


def test_stop_sequence_ends_generation(served: Served, golden: dict[str, Any]) -> None:
    text = golden_case(golden)["text"]
    stop = text[10:14]
    (response,) = infer(served, [golden_request(golden, stop_sequences=json.dumps([stop]))])
    result = result_of(response)
    assert result["finish_reason"] == "stop_sequence"
    assert result["text"] == text[: text.index(stop)]


def test_text_only_prompt(served: Served) -> None:
    (response,) = infer(served, [make_request(prompt="Hello there", max_new_tokens="3", correlation_id="t")])
    result = result_of(response)
    assert result["generated_tokens"] <= 3
    assert result["input_tokens"] > 0


def test_unknown_meta_keys_are_ignored(served: Served) -> None:
    request = make_request(image=image_bytes(), max_new_tokens="2", client_version="go-sdk/1.2", extra="x")
    (response,) = infer(served, [request])
    assert result_of(response)["generated_tokens"] == 2


@pytest.mark.parametrize("mime", ["image/png", "IMAGE/PNG", "image/png; charset=binary", ""])
def test_accepted_spellings_of_the_mime(served: Served, mime: str) -> None:
    (response,) = infer(served, [make_request(image=image_bytes(), mime=mime, max_new_tokens="1")])
    assert result_of(response)["generated_tokens"] == 1


def test_image_jpg_is_accepted_as_jpeg(served: Served) -> None:
    request = make_request(image=image_bytes("portrait.jpg"), mime="image/jpg", max_new_tokens="1")
    (response,) = infer(served, [request])
    assert result_of(response)["generated_tokens"] == 1
