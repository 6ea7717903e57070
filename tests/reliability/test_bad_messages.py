"""Messages a careless client or an attacker sends: answered one by one, never killing the stream.

Issue 9, defect 4: a stream whose first message has seq != 0 was answered UNAVAILABLE "the model
is still loading" by a ready server. Defect 6: non-UTF-8 bytes in a string field ended the whole
stream with INTERNAL "Exception deserializing request!" and a traceback in the log.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from lumen_vlm.proto import ml_service_pb2

from .conftest import ErrorCode, OpenStream, Server, request, result_of, running_server, with_raw_bytes

PLACEHOLDER = "XXXX"
NOT_UTF8 = b"\xff\xfe\xc3\x28"  # never valid UTF-8: 0xff, 0xfe, and a lead byte with a bad follower


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("bad-messages")) as server:
        yield server


@pytest.fixture()
def stream(server: Server) -> Iterator[OpenStream]:
    with server.channel() as channel:
        stream = OpenStream(channel)
        yield stream
        stream.close()


def test_the_server_is_ready(server: Server, stream: OpenStream) -> None:
    """What the tests below assume: health says SERVING and a plain request is answered."""
    stream.send(request(correlation_id="ready"))
    assert result_of(stream.final(timeout=30))["generated_tokens"] == 4


@pytest.mark.parametrize("seq, total", [(1, 1), (1, 9)], ids=["plain-request-seq-1", "chunk-1-of-9"])
def test_a_stream_starting_past_seq_0_gets_invalid_argument(stream: OpenStream, seq: int, total: int) -> None:
    first = request(correlation_id="late-start")
    first.seq, first.total = seq, total
    stream.send(first, request(correlation_id="after"))
    answer = stream.final(timeout=30)
    assert answer.correlation_id == "late-start", answer
    assert answer.error.code == ErrorCode.ERROR_CODE_INVALID_ARGUMENT, answer.error
    assert "loading" not in answer.error.message
    assert result_of(stream.final(timeout=30))["generated_tokens"] == 4


# The field that holds the bad bytes -> the request, with PLACEHOLDER where they go, and the
# correlation_id its answer must echo (None: the id itself is the bad field).
BAD_FIELDS: dict[str, tuple[ml_service_pb2.InferRequest, str | None]] = {
    "correlation_id": (request(correlation_id=f"id-{PLACEHOLDER}"), None),
    "task": (request(f"vlm_generate{PLACEHOLDER}", correlation_id="bad-task"), "bad-task"),
    "meta value": (request(correlation_id="bad-meta", prompt=f"What {PLACEHOLDER} is this?"), "bad-meta"),
    "meta key": (request(correlation_id="bad-meta-key", **{f"key{PLACEHOLDER}": "1"}), "bad-meta-key"),
}


def non_utf8_in(field: str) -> bytes:
    """A valid request with non-UTF-8 bytes in one string field, on the wire."""
    return with_raw_bytes(BAD_FIELDS[field][0], PLACEHOLDER, NOT_UTF8)


@pytest.mark.parametrize("field", list(BAD_FIELDS))
def test_non_utf8_bytes_get_invalid_argument_and_the_stream_serves_on(
    server: Server, stream: OpenStream, field: str
) -> None:
    stream.send(non_utf8_in(field), request(correlation_id="after"))
    answer = stream.final(timeout=30)
    assert answer.error.code == ErrorCode.ERROR_CODE_INVALID_ARGUMENT, answer
    echoed = BAD_FIELDS[field][1]
    if echoed is not None:
        assert answer.correlation_id == echoed
    following = stream.final(timeout=30)
    assert following.correlation_id == "after"
    assert result_of(following)["generated_tokens"] == 4
    assert "Traceback" not in server.log
    assert "Exception deserializing" not in server.log


def test_a_stream_of_only_bad_messages_ends_ok_when_the_client_closes(server: Server) -> None:
    """Bad bytes are answered, not fatal: the call itself ends with OK once the client is done."""
    with server.channel() as channel:
        stream = OpenStream(channel)
        stream.send(non_utf8_in("task"), non_utf8_in("meta value"))
        answers = stream.responses(2, timeout=30)
        assert [answer.error.code for answer in answers] == [ErrorCode.ERROR_CODE_INVALID_ARGUMENT] * 2
        stream.send_end()
        assert stream.ended(timeout=10)
        assert stream.code() == grpc.StatusCode.OK, (stream.code(), stream.details())
