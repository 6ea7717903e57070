"""Chunked uploads in the Go SDK's shape, and every way a chunk sequence can break."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lumen_vlm.fastvlm.fastvlm_service import FastVLMService
from lumen_vlm.proto import ml_service_pb2

from .conftest import MIB, QUESTION, Served, finals, good_request, infer, make_settings, result_of, serve

CHUNK = 256 * 1024  # the Go SDK's chunk size for payloads over 1 MiB
INVALID = ml_service_pb2.ERROR_CODE_INVALID_ARGUMENT
UNAVAILABLE = ml_service_pb2.ERROR_CODE_UNAVAILABLE
Chunks = list[ml_service_pb2.InferRequest]


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A ~1.5 MB PNG of noise: over the SDK's 1 MiB threshold, under the test server's 3 MiB limit."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(720, 720, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert 1 * MIB < len(data) < 3 * MIB
    return data


def meta(max_new_tokens: int = 6) -> dict[str, str]:
    return {
        "messages": json.dumps([{"role": "user", "content": QUESTION}]),
        "max_new_tokens": str(max_new_tokens),
        "temperature": "0.0",
        "do_sample": "false",
    }


def chunked(payload: bytes, correlation_id: str, task: str = "vlm_generate", size: int = CHUNK) -> Chunks:
    """The Go SDK's split: full meta on every chunk, seq 0..total-1, offset = byte offset."""
    pieces = [payload[at : at + size] for at in range(0, len(payload), size)]
    return [
        ml_service_pb2.InferRequest(
            correlation_id=correlation_id,
            task=task,
            payload=piece,
            payload_mime="image/png",
            meta=meta(),
            seq=seq,
            total=len(pieces),
            offset=seq * size,
        )
        for seq, piece in enumerate(pieces)
    ]


def whole(payload: bytes, correlation_id: str) -> ml_service_pb2.InferRequest:
    return ml_service_pb2.InferRequest(
        correlation_id=correlation_id, task="vlm_generate", payload=payload, payload_mime="image/png", meta=meta()
    )


def test_chunked_upload_gives_the_same_result_as_one_message(served: Served, big_png: bytes) -> None:
    chunks = chunked(big_png, "chunked")
    assert len(chunks) == 6
    responses = infer(served, [*chunks, whole(big_png, "whole")])
    by_id = finals(responses)
    assert len(responses) == 2  # one answer per request, none per chunk
    chunked_result, whole_result = result_of(by_id["chunked"]), result_of(by_id["whole"])
    assert chunked_result["generated_tokens"] == 6
    assert chunked_result["text"] == whole_result["text"]
    assert chunked_result["input_tokens"] == whole_result["input_tokens"]


def test_chunked_streaming_upload(served: Served, big_png: bytes) -> None:
    responses = infer(served, chunked(big_png, "s", task="vlm_generate_stream"))
    assert responses[-1].is_final and all(not r.is_final for r in responses[:-1])
    text = "".join(r.result.decode() for r in responses[:-1])
    assert text == result_of(responses[-1])["text"]


def test_interleaved_uploads_on_one_stream(served: Served, big_png: bytes) -> None:
    first, second = chunked(big_png, "one"), chunked(big_png, "two")
    interleaved = [chunk for pair in zip(first, second, strict=True) for chunk in pair]
    by_id = finals(infer(served, interleaved))
    assert result_of(by_id["one"])["text"] == result_of(by_id["two"])["text"]


def _swap(chunks: Chunks) -> Chunks:
    chunks[1], chunks[2] = chunks[2], chunks[1]
    return chunks


def _duplicate(chunks: Chunks) -> Chunks:
    return [*chunks[:2], chunks[1], *chunks[2:]]


def _gap(chunks: Chunks) -> Chunks:
    return [chunk for chunk in chunks if chunk.seq != 2]


def _offset(delta: int) -> Callable[[Chunks], Chunks]:
    def shift(chunks: Chunks) -> Chunks:
        chunks[2].offset += delta
        return chunks

    return shift


def _total_changes(chunks: Chunks) -> Chunks:
    chunks[3].total += 1
    return chunks


def _last_first(chunks: Chunks) -> Chunks:
    return [chunks[-1], *chunks[:-1]]


def _first_chunk_late(chunks: Chunks) -> Chunks:
    return [*chunks[1:], chunks[0]]


def _no_correlation_id(chunks: Chunks) -> Chunks:
    for chunk in chunks:
        chunk.correlation_id = ""
    return chunks


def _task_changes(chunks: Chunks) -> Chunks:
    chunks[2].task = "vlm_generate_stream"
    return chunks


def _single_reuses_the_id(chunks: Chunks) -> Chunks:
    interloper = whole(b"", "broken")
    interloper.meta["prompt"] = "hi"
    return [*chunks[:2], interloper, *chunks[2:]]


BROKEN: dict[str, Callable[[Chunks], Chunks]] = {
    "out_of_order": _swap,
    "duplicate": _duplicate,
    "gap_missing_chunk": _gap,
    "overlapping_offset": _offset(-100),
    "offset_gap": _offset(+100),
    "total_changes": _total_changes,
    "last_chunk_first": _last_first,
    "first_chunk_late": _first_chunk_late,
    "task_changes": _task_changes,
    "single_request_reuses_the_id": _single_reuses_the_id,
    "no_correlation_id": _no_correlation_id,
}


def broken_answers(responses: list[ml_service_pb2.InferResponse]) -> list[ml_service_pb2.InferResponse]:
    """The answers to the broken upload: everything but "after" (an id-less upload's error
    carries an id the server made up)."""
    return [r for r in responses if r.correlation_id != "after"]


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_chunk_sequence_is_refused(served: Served, big_png: bytes, name: str) -> None:
    requests = [*BROKEN[name](chunked(big_png, "broken")), good_request("after")]
    responses = infer(served, requests)
    broken = broken_answers(responses)
    assert broken, "the broken upload is answered"
    assert all(r.is_final and r.error.code == INVALID and not r.result for r in broken), broken
    assert "chunk" in broken[0].error.message
    assert result_of(finals(responses)["after"])["generated_tokens"] == 4


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_upload_is_answered_once(served: Served, big_png: bytes, name: str) -> None:
    responses = infer(served, BROKEN[name](chunked(big_png, "broken")))
    (response,) = responses
    assert response.is_final and response.correlation_id
    if name != "no_correlation_id":  # an id-less upload's answer carries an id of the server's
        assert response.correlation_id == "broken"


def test_chunked_without_correlation_id_is_refused(served: Served, big_png: bytes) -> None:
    responses = infer(served, [*_no_correlation_id(chunked(big_png, ""))[:1], good_request("after")])
    first, after = responses
    assert first.error.code == INVALID and "correlation_id" in first.error.message
    assert result_of(after)["generated_tokens"] == 4


def test_stream_ending_mid_upload(served: Served, big_png: bytes) -> None:
    responses = infer(served, [good_request("before"), *chunked(big_png, "cut")[:3]])
    by_id = finals(responses)
    assert result_of(by_id["before"])["generated_tokens"] == 4
    error = by_id["cut"].error
    assert error.code == INVALID and "3 of 6" in error.message
    assert len(responses) == 2


def test_chunked_payload_over_the_limit(served: Served) -> None:
    too_big = b"\x89PNG\r\n\x1a\n" + bytes(3 * MIB)  # over the test server's 3 MiB limit
    responses = infer(served, [*chunked(too_big, "big"), good_request("after")])
    big = [r for r in responses if r.correlation_id == "big"]
    assert len(big) == 1 and big[0].error.code == INVALID and "limit" in big[0].error.message
    assert result_of(finals(responses)["after"])["generated_tokens"] == 4


def test_retry_after_a_broken_upload(served: Served, big_png: bytes) -> None:
    """A client may restart a failed upload with the same id from chunk 0."""
    responses = infer(served, [*_swap(chunked(big_png, "retry")), *chunked(big_png, "retry")])
    assert [r.error.code for r in responses] == [INVALID, 0]
    assert result_of(responses[1])["generated_tokens"] == 6


def test_uploads_in_progress_are_bounded_across_the_service(manager: Any, tiny_model_dir: Path, big_png: bytes) -> None:
    """Two interleaved uploads need more than the service's upload budget: the one whose chunk
    goes over it is answered UNAVAILABLE once, the other completes, and a retry then fits."""
    service = FastVLMService(manager, make_settings(tiny_model_dir), upload_budget=2 * MIB)
    server = serve(service)
    try:
        one, two = chunked(big_png, "one"), chunked(big_png, "two")
        interleaved = [chunk for pair in zip(one, two, strict=True) for chunk in pair]
        responses = infer(server, interleaved)
        assert sorted(r.correlation_id for r in responses) == ["one", "two"]
        # Which one goes over depends on what the budget counts (payload and meta); one does.
        refused, done = sorted(responses, key=lambda r: not r.HasField("error"))
        assert refused.error.code == UNAVAILABLE and "too many uploads in progress" in refused.error.message
        assert result_of(done)["generated_tokens"] == 6
        assert service.uploads.used == 0  # every byte was given back
        (retried,) = infer(server, chunked(big_png, refused.correlation_id))
        assert result_of(retried)["text"] == result_of(done)["text"]
        infer(server, chunked(big_png, "cut")[:3])  # a stream ending mid-upload frees its bytes too
        assert service.uploads.used == 0
    finally:
        server.stop()


def test_the_default_upload_budget_is_four_payloads(served: Served) -> None:
    assert served.service.uploads.max_bytes == 4 * served.service.settings.limits.max_payload_bytes
