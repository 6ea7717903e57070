"""Chunk reassembly without a server: ordering, the bounds on memory, the shared upload budget, the clocks.

tests/service/test_chunking.py sends chunked uploads through a real server."""

from __future__ import annotations

import time

import pytest

from lumen_vlm.fastvlm.chunks import ChunkAssembler, ChunkError, UploadBudget, UploadsBusy
from lumen_vlm.proto import ml_service_pb2


def chunk(seq: int, total: int, payload: bytes, offset: int, cid: str = "c") -> ml_service_pb2.InferRequest:
    return ml_service_pb2.InferRequest(
        correlation_id=cid, task="vlm_generate", payload=payload, seq=seq, total=total, offset=offset, meta={"k": "v"}
    )


def test_assembly_in_order() -> None:
    assembler = ChunkAssembler(100)
    assert assembler.feed(chunk(0, 3, b"ab", 0), "c") is None
    assert assembler.feed(chunk(1, 3, b"cd", 2), "c") is None
    complete = assembler.feed(chunk(2, 3, b"e", 4), "c")
    assert complete is not None and complete.payload == b"abcde"
    assert complete.meta == {"k": "v"} and assembler.open_uploads == 0


def test_the_buffer_is_bounded() -> None:
    assembler = ChunkAssembler(3)
    assembler.feed(chunk(0, 2, b"ab", 0), "c")
    with pytest.raises(ChunkError, match="limit of 3"):
        assembler.feed(chunk(1, 2, b"cd", 2), "c")
    assert assembler.open_uploads == 0


def test_open_uploads_are_bounded() -> None:
    assembler = ChunkAssembler(100, max_uploads=2)
    assembler.feed(chunk(0, 2, b"a", 0, "x"), "x")
    assembler.feed(chunk(0, 2, b"a", 0, "y"), "y")
    with pytest.raises(ChunkError, match="too many"):
        assembler.feed(chunk(0, 2, b"a", 0, "z"), "z")
    assert assembler.feed(chunk(1, 2, b"b", 1, "z"), "z") is None  # the refused upload's rest is dropped


def test_abandon_reports_open_uploads() -> None:
    assembler = ChunkAssembler(100)
    assembler.feed(chunk(0, 4, b"a", 0), "c")
    ((cid, error),) = assembler.abandon()
    assert cid == "c" and "1 of 4" in str(error)


def test_chunks_without_a_correlation_id_are_answered_once_per_upload() -> None:
    assembler = ChunkAssembler(100)
    with pytest.raises(ChunkError, match="correlation_id"):
        assembler.feed(chunk(0, 3, b"a", 0, cid=""), "generated-1")
    assert assembler.feed(chunk(1, 3, b"b", 1, cid=""), "generated-2") is None  # the same upload: dropped
    assert assembler.feed(chunk(2, 3, b"c", 2, cid=""), "generated-3") is None
    with pytest.raises(ChunkError, match="correlation_id"):  # its last chunk passed: a new upload
        assembler.feed(chunk(1, 3, b"b", 1, cid=""), "generated-4")
    with pytest.raises(ChunkError, match="correlation_id"):  # seq 0: a new upload
        assembler.feed(chunk(0, 3, b"a", 0, cid=""), "generated-5")
    with pytest.raises(ChunkError, match="correlation_id"):  # another total: another upload
        assembler.feed(chunk(1, 5, b"b", 1, cid=""), "generated-6")
    assert assembler.open_uploads == 0


def test_the_upload_budget_is_shared_by_every_stream() -> None:
    held = 3 + len("k") + len("v")  # chunk 0's payload, and the meta the upload keeps
    budget = UploadBudget(held + 2)
    first, second = ChunkAssembler(100, budget=budget), ChunkAssembler(100, budget=budget)
    first.feed(chunk(0, 3, b"aaa", 0, "x"), "x")
    assert budget.used == held
    with pytest.raises(UploadsBusy, match="too many uploads in progress"):
        second.feed(chunk(0, 2, b"bbb", 0, "y"), "y")
    assert budget.used == held and second.open_uploads == 0
    assert second.feed(chunk(1, 2, b"b", 3, "y"), "y") is None  # the refused upload's rest is dropped
    first.feed(chunk(1, 3, b"a", 3, "x"), "x")
    assert first.feed(chunk(2, 3, b"a", 4, "x"), "x") is not None  # completed: its bytes are freed
    assert budget.used == 0
    second.feed(chunk(0, 2, b"bbb", 0, "y"), "y")  # the retry now fits
    assert budget.used == held
    second.abandon()  # the stream ended
    assert budget.used == 0


def test_an_upload_s_meta_counts_against_the_budget() -> None:
    # A chunk 0 with a megabyte of meta and a 1-byte payload held memory the budget did not see.
    budget = UploadBudget(10_000)
    assembler = ChunkAssembler(100, budget=budget)
    squat = chunk(0, 50, b"x", 0, "squat")
    squat.meta["prompt"] = "p" * 5_000
    assembler.feed(squat, "squat")
    assert budget.used == 1 + len("k") + len("v") + len("prompt") + 5_000
    with pytest.raises(UploadsBusy):
        ChunkAssembler(100, budget=budget).feed(squat, "another")
    assembler.abandon()
    assert budget.used == 0


def test_a_stream_busy_answering_does_not_run_its_uploads_clocks() -> None:
    assembler = ChunkAssembler(100)
    assembler.feed(chunk(0, 3, b"ab", 0), "c")
    started = assembler.next_expiry(30.0)
    assert started is not None
    time.sleep(0.01)
    assembler.touch()  # the owner answered another request meanwhile
    later = assembler.next_expiry(30.0)
    assert later is not None and later > started
    assert assembler.expire(30.0, now=later - 0.001) == []


def test_a_failed_upload_frees_its_budget() -> None:
    budget = UploadBudget(100)
    assembler = ChunkAssembler(100, budget=budget)
    assembler.feed(chunk(0, 3, b"aaaa", 0), "c")
    with pytest.raises(ChunkError):
        assembler.feed(chunk(2, 3, b"a", 4), "c")  # out of order
    assert budget.used == 0


def test_an_abandoned_assembler_takes_nothing_more() -> None:
    # Our front door feeds a chunk in a pool thread; a client that cancels meanwhile has its
    # stream abandoned first. The chunk that comes after must not hold budget for nobody.
    budget = UploadBudget(100)
    assembler = ChunkAssembler(100, budget=budget)
    assembler.feed(chunk(0, 3, b"aaaa", 0), "c")
    assert len(assembler.abandon()) == 1
    assert assembler.feed(chunk(0, 3, b"bbbb", 0, "late"), "late") is None
    assert assembler.feed(chunk(0, 1, b"", 0, "plain"), "plain") is None
    assert budget.used == 0 and assembler.open_uploads == 0
    assert assembler.abandon() == []
