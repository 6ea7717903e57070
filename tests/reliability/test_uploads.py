"""Chunked uploads cannot hold the upload budget: an idle upload is dropped, and each stream has a share.

Issue 9, defect 3: two streams each sending chunk 0 of a 3-chunk upload and then nothing made
every chunked upload from everyone fail `too many uploads in progress` until they left.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from lumen_vlm.proto import ml_service_pb2

from .conftest import MIB, ErrorCode, OpenStream, Server, chunks, request, result_of, running_server

MAX_PAYLOAD = 1 * MIB  # the budget is 4 x this, for all streams together; one stream's share is 1 x and its meta
UPLOAD_IDLE_S = 1.0
REFUSALS = (ErrorCode.ERROR_CODE_UNAVAILABLE, ErrorCode.ERROR_CODE_INVALID_ARGUMENT)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("uploads")
    with running_server(directory, max_payload_bytes=MAX_PAYLOAD, upload_idle_timeout_s=UPLOAD_IDLE_S) as server:
        yield server


@pytest.fixture()
def channel(server: Server) -> Iterator[grpc.Channel]:
    with server.channel() as channel:
        yield channel


def first_chunk(correlation_id: str, size: int) -> ml_service_pb2.InferRequest:
    """Chunk 0 of a 3-chunk upload, `size` bytes: the start of an upload that never finishes."""
    chunk = request(correlation_id=correlation_id, image=b"\x89" * size)
    chunk.seq, chunk.total, chunk.offset = 0, 3, 0
    return chunk


def padded_image(size: int) -> bytes:
    """The test PNG with zeros after its end: a real image of exactly `size` bytes."""
    image = request().payload
    return image + b"\0" * (size - len(image))


def assert_dropped_for_idleness(answer: ml_service_pb2.InferResponse, correlation_id: str) -> None:
    assert answer.correlation_id == correlation_id and answer.is_final, answer
    assert answer.error.code == ErrorCode.ERROR_CODE_DEADLINE_EXCEEDED, answer.error
    assert "upload_idle_timeout_s" in answer.error.message, answer.error.message


def test_an_idle_upload_is_dropped_with_deadline_exceeded_and_the_stream_goes_on(channel: grpc.Channel) -> None:
    stream = OpenStream(channel)
    sent = time.monotonic()
    stream.send(chunks(request(correlation_id="idle"), 3)[0])
    (answer,) = stream.responses(1, timeout=10)
    waited = time.monotonic() - sent
    assert_dropped_for_idleness(answer, "idle")
    assert UPLOAD_IDLE_S - 0.1 <= waited <= UPLOAD_IDLE_S + 3.0, waited
    stream.send(*chunks(request(correlation_id="next"), 3))
    assert result_of(stream.final(timeout=30))["generated_tokens"] == 4
    stream.close()


def test_one_stream_holds_at_most_its_share_of_unfinished_uploads(channel: grpc.Channel) -> None:
    """One stream's share is max_payload_bytes and room for its meta (1 MiB): 2 MiB here."""
    stream = OpenStream(channel)
    size = MAX_PAYLOAD * 8 // 10  # three of these are more than one stream's share, two are not
    stream.send(first_chunk("first", size), first_chunk("second", size), first_chunk("third", size))
    answers = {answer.correlation_id: answer for answer in stream.responses(3, timeout=10)}
    assert answers["third"].error.code in REFUSALS, answers["third"]
    assert answers["third"].is_final
    for kept in ("first", "second"):  # the ones within the share were kept, until they went silent
        assert_dropped_for_idleness(answers[kept], kept)
    stream.close()


def test_squatters_cannot_block_other_streams_uploads(server: Server) -> None:
    """Two streams start uploads worth the whole budget (4 x max_payload_bytes) and go silent."""
    squatter_channels = [server.channel(), server.channel()]
    squatters = [OpenStream(channel) for channel in squatter_channels]
    try:
        started = time.monotonic()
        for index, squatter in enumerate(squatters):
            squatter.send(first_chunk(f"squat-{index}-a", MAX_PAYLOAD), first_chunk(f"squat-{index}-b", MAX_PAYLOAD))
        time.sleep(0.2)  # the squatters' chunks are in
        with server.channel() as channel:
            assert upload_with_retries(channel, deadline=started + 8.0), "the third stream's upload was refused for 8 s"
        for squatter in squatters:
            # Each squat gets one answer: an upload past the stream's share at once, one within it once idle.
            answers = squatter.responses(2, timeout=10)
            held = [answer for answer in answers if answer.error.code == ErrorCode.ERROR_CODE_DEADLINE_EXCEEDED]
            assert held, answers
            for answer in answers:
                assert answer.is_final and answer.error.code in (*REFUSALS, ErrorCode.ERROR_CODE_DEADLINE_EXCEEDED)
            for answer in held:
                assert_dropped_for_idleness(answer, answer.correlation_id)
                assert squatter.finals_at[answer.correlation_id] - started <= UPLOAD_IDLE_S + 3.0
    finally:
        for squatter in squatters:
            squatter.close()
        for channel in squatter_channels:
            channel.close()


def upload_with_retries(channel: grpc.Channel, deadline: float) -> bool:
    """A client's chunked upload, retried on UNAVAILABLE until `deadline`; whether it was served."""
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        stream = OpenStream(channel)
        stream.send(*chunks(request(correlation_id=f"third-{attempt}"), 3))
        final = stream.final(timeout=30)
        stream.close()
        if not final.HasField("error"):
            assert result_of(final)["generated_tokens"] == 4
            return True
        assert final.error.code == ErrorCode.ERROR_CODE_UNAVAILABLE, final.error
        time.sleep(0.2)
    return False


def test_the_whole_budget_is_free_after_idle_uploads_were_dropped(server: Server) -> None:
    """After squats were dropped, four streams can each hold a whole max_payload_bytes upload at once."""
    squatters = [OpenStream(server.channel()) for _ in range(2)]
    try:
        for index, squatter in enumerate(squatters):
            squatter.send(first_chunk(f"leak-{index}", MAX_PAYLOAD))
        for index, squatter in enumerate(squatters):
            assert_dropped_for_idleness(squatter.responses(1, timeout=10)[0], f"leak-{index}")
    finally:
        for squatter in squatters:
            squatter.close()
    image = padded_image(MAX_PAYLOAD)
    uploads = [chunks(request(correlation_id=f"full-{index}", image=image), 2) for index in range(4)]
    streams = [OpenStream(server.channel()) for _ in uploads]
    try:
        for stream, parts in zip(streams, uploads, strict=True):
            stream.send(parts[0])  # all four first halves held at once: the whole budget
        time.sleep(0.3)
        for stream, parts in zip(streams, uploads, strict=True):
            stream.send(parts[1])
        for stream in streams:
            assert result_of(stream.final(timeout=30))["generated_tokens"] == 4
    finally:
        for stream in streams:
            stream.close()
