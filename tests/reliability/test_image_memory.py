"""Tiny images cannot cost a server gigabytes (issue 9, defect 1).

A real `lumen-vlm` process is sent the thinnest images its `max_image_pixels` still accepts and
some just past it, several at once, in both resize modes; its peak resident memory (VmHWM from
/proc, reset first through /proc/<pid>/clear_refs) may grow by at most `RSS_GROWTH_BOUND`.
Before the fix, one 86-byte 1x1464 PNG in crop mode raised it by 0.9-1.4 GB and one 115-byte
12247x1 PNG in pad mode by 0.6 GB, whatever max_image_pixels said. Pad mode now makes no padded
square (it is resized in strips), so the 12247x1 PNG is accepted under the default limits and
costs a few MB.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import zip_longest
from pathlib import Path

import grpc
from PIL import Image

from lumen_vlm.proto import ml_service_pb2, ml_service_pb2_grpc
from lumen_vlm.resources.settings import GenerationLimits

from ..server.test_server_process import free_port, serving, write_config

ErrorCode = ml_service_pb2.ErrorCode
MIB = 1024 * 1024
CALL_TIMEOUT_S = 60.0  # a bound against hangs on a slow, shared machine
CLIENT_THREADS = 8
MAX_CONCURRENCY = 2  # images are preprocessed inside a generation slot: at most 2 at once

# The tiny test model's input is 256x256. Under 1 M pixels the thinnest images accepted are
# 3906x1 in pad mode (a 256x3906 resize temporary, 999 936 pixels), 1x1414 in pad mode (its
# 1414x1414 square, read in strips, 1 999 396 pixels: pad mode may read twice the limit) and
# 1x15 in crop mode (a 256x3840 resized image, 983 040 pixels); one pixel more is refused.
MAX_IMAGE_PIXELS = 1_000_000
ACCEPTED = [("pad", 3906, 1), ("pad", 1, 1414), ("crop", 1, 15), ("crop", 15, 1)]
REFUSED = [
    ("pad", 3907, 1),
    ("pad", 1, 1415),
    ("crop", 1, 16),
    ("pad", 12_247, 1),  # issue 9: 115 bytes, 0.6 GB before the fix
    ("crop", 1, 1464),  # issue 9: 86 bytes, 1.4 GB before the fix
]
# The default max_image_pixels, 50 M: issue 9's pad shape, now accepted (a 256x12247 resize
# temporary, 12.5 MB), its crop shape and the first ones past the limit for the tiny model (a
# 256x195313 resize temporary; a 10001x10001 square to read; a 256x195328 resized image).
DEFAULT_ACCEPTED = [("pad", 12_247, 1)]
DEFAULT_REFUSED = [("crop", 1, 1464), ("pad", 195_313, 1), ("pad", 1, 10_001), ("crop", 1, 763)]
# Each accepted image above needs at most ~10 MB while preprocessed: its largest intermediate
# is 1 M pixels at 4 bytes (the 1x1414 one makes a 256x1414 temporary and 64-row strips of its
# square), Pillow's crop-mode resize temporary 1 MB, the float arrays 4 MB; issue 9's 12247x1
# needs ~15 MB. Two run at once, but every gRPC thread that preprocessed one may keep its peak
# in its own malloc arena, so up to 8 x 10 MB may stay resident (measured: 18 MB for the first
# 16 such images, from 8 clients). One refused shape alone cost 580 MB to 1.4 GB before the fix.
RSS_GROWTH_BOUND = 100 * MIB

Answers = dict[str, ml_service_pb2.InferResponse]  # by correlation_id


def thin_png(width: int, height: int, shade: int) -> bytes:
    """A solid PNG of a few dozen bytes; each shade is other bytes, which the feature cache has not seen."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def request(image: bytes, resize_mode: str, correlation_id: str) -> ml_service_pb2.InferRequest:
    return ml_service_pb2.InferRequest(
        correlation_id=correlation_id,
        task="vlm_generate",
        payload=image,
        payload_mime="image/png",
        meta={
            "messages": json.dumps([{"role": "user", "content": "Describe the image."}]),
            "max_new_tokens": "1",
            "resize_mode": resize_mode,
        },
    )


class Memory:
    """A process's resident memory, from /proc/<pid>/status."""

    def __init__(self, pid: int) -> None:
        self.status = Path(f"/proc/{pid}/status")
        self.clear_refs = Path(f"/proc/{pid}/clear_refs")

    def _kib(self, key: str) -> int:
        for line in self.status.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {key} in {self.status}")

    def rss(self) -> int:
        return self._kib("VmRSS") * 1024

    def peak(self) -> int:
        return self._kib("VmHWM") * 1024

    def reset_peak(self) -> None:
        """Make the peak the current RSS (Linux: "5" to clear_refs), so a transient spike counts."""
        self.clear_refs.write_text("5")


@contextmanager
def image_server(directory: Path, **vlm_settings: object) -> Iterator[tuple[str, Memory]]:
    """A `lumen-vlm --config` process with the tiny model and `vlm_settings`: its address and memory."""
    port = free_port()
    config = write_config(directory / "config.yaml", port, max_queue=4 * CLIENT_THREADS, **vlm_settings)
    with serving([sys.executable, "-m", "lumen_vlm", "--config", str(config)], port) as proc:
        address = f"127.0.0.1:{port}"
        # The first image of each mode sizes the vision encoder's buffers once and for all.
        warm_up = send_all(address, shape_requests([("pad", 40, 30), ("crop", 40, 30)], range(1)))
        assert all(not answer.HasField("error") for answer in warm_up.values()), warm_up
        yield address, Memory(proc.process.pid)


def send_all(address: str, requests: list[ml_service_pb2.InferRequest]) -> Answers:
    """Each request on a stream of its own, `CLIENT_THREADS` at once; the final answer of each."""
    with grpc.insecure_channel(address) as channel:
        stub = ml_service_pb2_grpc.InferenceStub(channel)

        def final(message: ml_service_pb2.InferRequest) -> ml_service_pb2.InferResponse:
            return list(stub.Infer(iter([message]), timeout=CALL_TIMEOUT_S))[-1]

        with ThreadPoolExecutor(max_workers=CLIENT_THREADS) as pool:
            answers = list(pool.map(final, requests))
    return {answer.correlation_id: answer for answer in answers}


def shape_requests(shapes: list[tuple[str, int, int]], shades: range) -> list[ml_service_pb2.InferRequest]:
    return [
        request(thin_png(width, height, shade), mode, f"{mode}-{width}x{height}-{shade}")
        for shade in shades
        for mode, width, height in shapes
    ]


def measured(memory: Memory, send: Callable[[], Answers]) -> tuple[Answers, int, int]:
    """`send()`'s answers, how far it raised the process's peak RSS above its RSS before, and
    how much of that stayed resident."""
    memory.reset_peak()
    before = memory.rss()
    answers = send()
    return answers, memory.peak() - before, memory.rss() - before


def assert_memory_bounded(peak_growth: int, rss_growth: int) -> None:
    print(f"peak RSS +{peak_growth / MIB:.0f} MiB, kept +{rss_growth / MIB:.0f} MiB")  # for `pytest -s`
    assert peak_growth < RSS_GROWTH_BOUND, f"peak RSS grew by {peak_growth / MIB:.0f} MiB"
    assert rss_growth < RSS_GROWTH_BOUND, f"RSS grew by {rss_growth / MIB:.0f} MiB and stayed"


def assert_refused(answer: ml_service_pb2.InferResponse, max_image_pixels: int) -> None:
    assert answer.error.code == ErrorCode.ERROR_CODE_INVALID_ARGUMENT, answer
    assert "too extreme an aspect ratio" in answer.error.message
    # A made image's limit is max_image_pixels, a read square's twice that: both name it.
    assert "more than the limit of " in answer.error.message
    assert f"max_image_pixels = {max_image_pixels} pixels" in answer.error.message


def assert_answered(
    answers: Answers,
    accepted: list[ml_service_pb2.InferRequest],
    refused: list[ml_service_pb2.InferRequest],
    max_image_pixels: int,
) -> None:
    """One answer each: a result for the accepted images, a refusal naming the limit for the others."""
    assert len(answers) == len(accepted) + len(refused)
    for message in accepted:
        answer = answers[message.correlation_id]
        assert answer.is_final and not answer.HasField("error"), answer
    for message in refused:
        assert_refused(answers[message.correlation_id], max_image_pixels)


def test_the_thinnest_images_accepted_and_refused_cost_little_memory(tmp_path: Path) -> None:
    with image_server(tmp_path, max_image_pixels=MAX_IMAGE_PIXELS, max_concurrency=MAX_CONCURRENCY) as (
        address,
        memory,
    ):
        accepted, refused = shape_requests(ACCEPTED, range(1, 5)), shape_requests(REFUSED, range(1, 3))
        mixed = [message for pair in zip_longest(accepted, refused) for message in pair if message is not None]
        answers, peak_growth, rss_growth = measured(memory, lambda: send_all(address, mixed))

    assert_answered(answers, accepted, refused, MAX_IMAGE_PIXELS)
    assert_memory_bounded(peak_growth, rss_growth)


def test_the_shapes_of_issue_9_under_the_default_limits(tmp_path: Path) -> None:
    default = GenerationLimits().max_image_pixels
    with image_server(tmp_path, max_concurrency=MAX_CONCURRENCY) as (address, memory):
        accepted = shape_requests(DEFAULT_ACCEPTED, range(1, 5))
        refused = shape_requests(DEFAULT_REFUSED, range(1, 3))
        answers, peak_growth, rss_growth = measured(memory, lambda: send_all(address, accepted + refused))

    assert_answered(answers, accepted, refused, default)
    assert_memory_bounded(peak_growth, rss_growth)
