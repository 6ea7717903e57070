"""A short soak: a few hundred mixed requests from 8 clients on a small admission (1 running, 2 waiting).

Every request gets exactly one final answer, for its own id: a result, or a documented refusal
(UNAVAILABLE busy, INVALID_ARGUMENT for bad input, DEADLINE_EXCEEDED). Greedy answers are the
same all run long, memory stays put, and the server is alive and healthy at the end.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest

from lumen_vlm.proto import ml_service_pb2, ml_service_pb2_grpc

from ..conftest import GOLDEN
from .conftest import MIB, ErrorCode, Server, chunks, health_answers, request, running_server

CLIENTS = 8
ROUNDS = 5  # each client sends every kind of request this many times
RSS_GROWTH_BOUND = 60 * MIB
PORTRAIT = (GOLDEN / "portrait.jpg").read_bytes()


def portrait_request(correlation_id: str) -> ml_service_pb2.InferRequest:
    message = request(correlation_id=correlation_id, image=PORTRAIT, prompt="Describe it.", max_new_tokens=6)
    message.payload_mime = "image/jpeg"
    return message


# kind -> the requests of one call (ids filled in), in the order they are sent on its stream.
KINDS: dict[str, list[ml_service_pb2.InferRequest]] = {
    "greedy": [request(max_new_tokens=8)],
    "greedy-portrait": [portrait_request("")],
    "stream": [request("vlm_generate_stream", max_new_tokens=8)],
    "text-only": [request(image=None, prompt="Say something.", max_new_tokens=6)],
    "chunked": chunks(request(max_new_tokens=8), 3),  # same image and prompt as greedy: same text
    "two-on-one-stream": [request(max_new_tokens=8), request("vlm_generate_stream", max_new_tokens=8)],
    "bad-task": [request("vlm_nope")],
    "bad-number": [request(max_new_tokens="lots")],  # type: ignore[arg-type]
    "bad-image": [request(image=b"\x89PNG not really")],
    "bad-messages": [request(messages="{not json")],  # meta wins over the default messages
    "bad-chunks": [chunks(request(), 3)[0], chunks(request(), 3)[2]],  # a gap
}
BAD = {"bad-task", "bad-number", "bad-image", "bad-messages", "bad-chunks"}
# The same text for the same image and prompt: these kinds' results must agree with each other.
SAME_TEXT = {"greedy": "landscape", "chunked": "landscape", "two-on-one-stream": "landscape"}


@dataclass
class Tally:
    results: dict[str, set[str]] = field(default_factory=dict)  # text group -> texts seen
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("soak")
    with running_server(directory, max_concurrency=1, max_queue=2, max_payload_bytes=4 * MIB) as server:
        yield server


def with_ids(kind: str, call_id: str) -> list[ml_service_pb2.InferRequest]:
    """The kind's requests, each chunk of one request sharing one id, each request its own."""
    messages, number = [], 0
    for template in KINDS[kind]:
        message = ml_service_pb2.InferRequest()
        message.CopyFrom(template)
        if message.seq == 0:
            number += 1
        message.correlation_id = f"{call_id}.{number}"
        messages.append(message)
    return messages


def check_call(kind: str, sent: list[ml_service_pb2.InferRequest], answers: list, tally: Tally) -> None:
    """Exactly one final per request, for its own id, and each a result or a documented refusal."""
    ids = list(dict.fromkeys(message.correlation_id for message in sent))
    finals = [answer for answer in answers if answer.is_final]
    assert sorted(answer.correlation_id for answer in finals) == sorted(ids), (kind, ids, answers)
    for answer in answers:
        assert answer.correlation_id in ids, f"{kind}: an answer for another request's id: {answer}"
    for final in finals:
        if final.HasField("error"):
            code = final.error.code
            expected = ErrorCode.ERROR_CODE_INVALID_ARGUMENT if kind in BAD else ErrorCode.ERROR_CODE_UNAVAILABLE
            assert code == expected, (kind, final.error)
            tally.count(f"{kind}: {ErrorCode.Name(code)}")
            continue
        assert kind not in BAD, (kind, final)
        text = json.loads(final.result)["text"]
        group = SAME_TEXT.get(kind, kind)
        if kind == "two-on-one-stream" and final.correlation_id.endswith(".2"):
            group = "landscape"  # the stream variant of the same question: the same greedy text
        tally.results.setdefault(group, set()).add(text)
        tally.count(f"{kind}: result")


def call(stub: ml_service_pb2_grpc.InferenceStub, kind: str, call_id: str, tally: Tally) -> None:
    sent = with_ids(kind, call_id)
    answers = list(stub.Infer(iter(sent), timeout=60))
    check_call(kind, sent, answers, tally)


def cancelled_call(stub: ml_service_pb2_grpc.InferenceStub, call_id: str, tally: Tally) -> None:
    """A long generation the client cancels after its first answer."""
    long = request("vlm_generate_stream", correlation_id=f"{call_id}.1", max_new_tokens=400)
    responses = stub.Infer(iter([long]), timeout=60)
    first = next(responses)  # a first delta, or a busy refusal
    assert first.correlation_id == long.correlation_id
    responses.cancel()
    tally.count("cancelled")


def short_deadline_call(stub: ml_service_pb2_grpc.InferenceStub, call_id: str, tally: Tally) -> None:
    """A long generation with a 50 ms deadline: DEADLINE_EXCEEDED, as a status or a final answer."""
    long = request("vlm_generate_stream", correlation_id=f"{call_id}.1", max_new_tokens=400)
    try:
        answers = list(stub.Infer(iter([long]), timeout=0.05))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
        tally.count("deadline: status")
        return
    finals = [answer for answer in answers if answer.is_final]
    assert len(finals) == 1 and finals[0].correlation_id == long.correlation_id, answers
    codes = (ErrorCode.ERROR_CODE_DEADLINE_EXCEEDED, ErrorCode.ERROR_CODE_UNAVAILABLE)
    assert not finals[0].HasField("error") or finals[0].error.code in codes, finals[0]
    tally.count("deadline: answer")


def client(server: Server, index: int, rounds: int) -> Tally:
    tally = Tally()
    with server.channel() as channel:
        stub = ml_service_pb2_grpc.InferenceStub(channel)
        counter = itertools.count()
        kinds = [*KINDS, "cancelled", "short-deadline"]
        for _ in range(rounds):
            for kind in kinds[index % len(kinds) :] + kinds[: index % len(kinds)]:
                call_id = f"client{index}-{next(counter)}"
                if kind == "cancelled":
                    cancelled_call(stub, call_id, tally)
                elif kind == "short-deadline":
                    short_deadline_call(stub, call_id, tally)
                else:
                    call(stub, kind, call_id, tally)
    return tally


def run_clients(server: Server, rounds: int) -> Tally:
    with ThreadPoolExecutor(CLIENTS) as pool:
        tallies = list(pool.map(lambda index: client(server, index, rounds), range(CLIENTS)))
    total = Tally()
    for tally in tallies:
        for group, texts in tally.results.items():
            total.results.setdefault(group, set()).update(texts)
        for outcome, count in tally.outcomes.items():
            total.outcomes[outcome] = total.outcomes.get(outcome, 0) + count
    return total


def test_mixed_load_from_8_clients_keeps_every_guarantee(server: Server) -> None:
    warm_up = run_clients(server, rounds=1)
    assert all(len(texts) == 1 for texts in warm_up.results.values()), warm_up.results
    rss_after_warm_up = server.rss_bytes()

    soak = run_clients(server, rounds=ROUNDS)

    for group, texts in soak.results.items():
        assert texts == warm_up.results.get(group, texts), f"{group}: greedy text changed: {texts}"
        assert len(texts) == 1, f"{group}: {texts}"
    assert sum(soak.outcomes.values()) >= CLIENTS * ROUNDS * (len(KINDS) + 2)
    assert any(outcome.endswith(": result") for outcome in soak.outcomes), soak.outcomes
    growth = server.rss_bytes() - rss_after_warm_up
    assert growth <= RSS_GROWTH_BOUND, f"RSS grew {growth / MIB:.0f} MiB during the soak; outcomes: {soak.outcomes}"
    assert server.process.process.poll() is None, "the server died"
    with server.channel() as channel:
        health_answers(channel, timeout=1.0)
