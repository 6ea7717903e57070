"""SIGTERM: the process exits 0 within shutdown_grace_s + 1 s, whatever is running or was sent.

Issue 9, defect 5: with a 4 s grace the process exited after 6.3 s; after one request with
non-UTF-8 bytes, shutdown also waited out `server.stop(...).wait(10)` (10.2 s, nothing running).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from .conftest import ErrorCode, OpenStream, Server, request, result_of, with_raw_bytes

GRACE_S = 3.0
STEP_S = 0.05  # 400 steps of 50 ms: 20 s, far past the grace
IDLE_EXIT_S = 2.0  # nothing to wait for: well under the 3 s grace, with room for a loaded machine


def seconds_to_exit(server: Server) -> float:
    """SIGTERM, then the seconds until the process ended; it must exit 0."""
    signalled = time.monotonic()
    server.process.process.send_signal(signal.SIGTERM)
    code = server.process.exit_code(timeout=60)
    took = time.monotonic() - signalled
    print(f"exited {took:.2f} s after SIGTERM")  # the figure, for `pytest -s`
    assert code == 0, server.log
    return took


def test_sigterm_during_long_generations_exits_0_within_the_grace_plus_1_s(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(step_s=STEP_S, shutdown_grace_s=GRACE_S, max_concurrency=2, max_queue=1)
    channels = [server.channel() for _ in range(3)]
    streams = [OpenStream(channel) for channel in channels]
    for index, stream in enumerate(streams):  # two generate, then one waits for a slot
        stream.send(request("vlm_generate_stream", correlation_id=f"long-{index}", max_new_tokens=400))
        if index < 2:  # in this order, so that the third is the one waiting
            assert not stream.responses(1, timeout=30)[0].is_final  # generating
    took = seconds_to_exit(server)
    assert took <= GRACE_S + 1.0, f"exited {took:.1f} s after SIGTERM with shutdown_grace_s={GRACE_S:g}"
    for index, stream in enumerate(streams):
        finals = [answer for answer in stream.until_end(timeout=30) if answer.is_final]
        assert len(finals) == 1, f"long-{index}: {len(finals)} final answers ({stream.code()} {stream.details()})"
        (final,) = finals
        assert final.correlation_id == f"long-{index}"
        if final.HasField("error"):
            assert final.error.code == ErrorCode.ERROR_CODE_UNAVAILABLE, final.error
    for channel in channels:
        channel.close()


def test_sigterm_with_nothing_running_exits_well_within_the_grace(start_server: Callable[..., Server]) -> None:
    server = start_server(shutdown_grace_s=GRACE_S)
    with server.channel() as channel:
        stream = OpenStream(channel)
        stream.send(request(correlation_id="done"))
        result_of(stream.final(timeout=30))
        stream.close()
    took = seconds_to_exit(server)
    assert took <= IDLE_EXIT_S, f"exited {took:.1f} s after SIGTERM with nothing running"


def test_sigterm_after_a_non_utf8_request_exits_within_the_grace_plus_1_s(start_server: Callable[..., Server]) -> None:
    """Nothing runs; the clients that sent the bad bytes are still connected, their streams open.

    On main the hang after bad bytes is a race (about one run in two with one stream), so
    several streams send them.
    """
    server = start_server(shutdown_grace_s=GRACE_S)
    bad = with_raw_bytes(request(correlation_id="bad", prompt="a XXXX"), "XXXX", b"\xff\xfe\xfd\xfc")
    channels = [server.channel() for _ in range(4)]
    streams = [OpenStream(channel) for channel in channels]
    for stream in streams:
        stream.send(bad)
    for stream in streams:
        stream.ended(timeout=1.0)  # answered (before the fix: the stream died INTERNAL)
    took = seconds_to_exit(server)
    for stream, channel in zip(streams, channels, strict=True):
        stream.close()
        channel.close()
    assert took <= GRACE_S + 1.0, f"exited {took:.1f} s after SIGTERM, nothing running, after a non-UTF-8 request"


def test_sigterm_with_idle_streams_open_exits_within_the_grace_plus_1_s(start_server: Callable[..., Server]) -> None:
    server = start_server(shutdown_grace_s=GRACE_S)
    channels = [server.channel() for _ in range(2)]
    streams = [OpenStream(channel) for channel in channels for _ in range(4)]
    time.sleep(0.5)
    took = seconds_to_exit(server)
    assert took <= GRACE_S + 1.0, f"exited {took:.1f} s after SIGTERM with idle streams open"
    for stream in streams:
        stream.close()
    for channel in channels:
        channel.close()
