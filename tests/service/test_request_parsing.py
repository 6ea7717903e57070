"""Meta parsing and chunk reassembly without a server: the lenient-but-bounded rules."""

from __future__ import annotations

import json

import pytest

from lumen_vlm.fastvlm.request_parsing import (
    ChunkAssembler,
    ChunkError,
    CompleteRequest,
    RequestError,
    build_generation_request,
    check_image_payload,
    normalize_mime,
    parse_bool,
    parse_float,
    parse_generation_params,
    parse_int,
    parse_messages,
    parse_sampling,
)
from lumen_vlm.proto import ml_service_pb2
from lumen_vlm.resources.settings import GenerationLimits

from .conftest import image_bytes

LIMITS = GenerationLimits(default_max_new_tokens=100, max_new_tokens=500)


@pytest.mark.parametrize(("raw", "value"), [("256", 256), (" 256 ", 256), ("256.0", 256), ("1e2", 100)])
def test_ints_in_any_notation(raw: str, value: int) -> None:
    assert parse_int("n", raw, 1, 1000) == value


@pytest.mark.parametrize("raw", ["abc", "2.5", "", "inf", "nan", "0x10"])
def test_ints_refused(raw: str) -> None:
    with pytest.raises(RequestError, match="'n'"):
        parse_int("n", raw, 0, 1000)


@pytest.mark.parametrize(("raw", "value"), [("0.7", 0.7), ("%.1f" % 0.7, 0.7), ("1", 1.0), (" 0.25 ", 0.25)])  # noqa: UP031 - the Go SDK's format
def test_floats(raw: str, value: float) -> None:
    assert parse_float("t", raw, 0.0, 2.0) == pytest.approx(value)


def test_open_lower_bound() -> None:
    assert parse_float("p", "1", 0.0, 1.0, low_open=True) == 1.0
    with pytest.raises(RequestError, match=r"\(0, 1\]"):
        parse_float("p", "0", 0.0, 1.0, low_open=True)


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("TRUE", True), ("1", True), ("Yes", True)])
def test_true(raw: str, value: bool) -> None:
    assert parse_bool("b", raw) is value


@pytest.mark.parametrize("raw", ["false", "False", "0", "no", "NO"])
def test_false(raw: str) -> None:
    assert parse_bool("b", raw) is False


@pytest.mark.parametrize(
    ("meta", "temperature"),
    [
        ({}, 0.0),
        ({"do_sample": "true"}, 1.0),
        ({"do_sample": "false"}, 0.0),
        ({"do_sample": "false", "temperature": "0.7"}, 0.7),  # the Go SDK + Lumilio app
        ({"do_sample": "true", "temperature": "0.3"}, 0.3),
        ({"temperature": "0"}, 0.0),
    ],
)
def test_sampling_switch(meta: dict[str, str], temperature: float) -> None:
    assert parse_sampling(meta).temperature == pytest.approx(temperature)


def test_sampling_fields() -> None:
    sampling = parse_sampling(
        {"temperature": "0.5", "top_p": "0.9", "top_k": "40", "repetition_penalty": "1.1", "seed": "9"}
    )
    assert (sampling.top_p, sampling.top_k, sampling.repetition_penalty, sampling.seed) == (0.9, 40, 1.1, 9)


def test_generation_defaults_come_from_the_settings() -> None:
    params = parse_generation_params({}, LIMITS)
    assert params.max_new_tokens == 100
    assert params.add_generation_prompt is True
    assert params.stop_sequences == ()
    with pytest.raises(RequestError, match="between 1 and 500"):
        parse_generation_params({"max_new_tokens": "501"}, LIMITS)


def test_stop_alias() -> None:
    assert parse_generation_params({"stop": json.dumps(["\n\n"])}, LIMITS).stop_sequences == ("\n\n",)
    same = json.dumps(["x"])
    assert parse_generation_params({"stop": same, "stop_sequences": same}, LIMITS).stop_sequences == ("x",)
    with pytest.raises(RequestError, match="both"):
        parse_generation_params({"stop": same, "stop_sequences": json.dumps(["y"])}, LIMITS)


def test_prompt_becomes_one_user_message() -> None:
    assert parse_messages({"prompt": "Describe."}, LIMITS) == [{"role": "user", "content": "Describe."}]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert parse_messages({"messages": json.dumps(messages), "prompt": "ignored"}, LIMITS) == messages


def test_messages_length_is_bounded() -> None:
    limits = GenerationLimits(max_messages_chars=50)
    with pytest.raises(RequestError, match="limit of 50"):
        parse_messages({"prompt": "x" * 51}, limits)


@pytest.mark.parametrize(
    ("mime", "normal"),
    [("image/jpg", "image/jpeg"), ("IMAGE/PNG", "image/png"), ("image/webp; q=1", "image/webp"), ("", "")],
)
def test_mime_normalization(mime: str, normal: str) -> None:
    assert normalize_mime(mime) == normal


def test_payload_checks() -> None:
    png = image_bytes()
    assert check_image_payload(png, "", 10**7) is png  # no mime: the signature decides
    assert check_image_payload(b"", "", 10**7) is None  # text only
    with pytest.raises(RequestError, match=r"image/webp.*image/png"):
        check_image_payload(png, "image/webp", 10**7)


def test_unknown_keys_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="lumen_vlm.fastvlm.request_parsing")
    request = CompleteRequest("c", "vlm_generate", {"prompt": "hi", "client": "go-sdk"})
    build_generation_request(request, LIMITS)
    assert any("client" in record.getMessage() and record.levelname == "DEBUG" for record in caplog.records)


# --------------------------------------------------------------------------- chunks


def chunk(seq: int, total: int, payload: bytes, offset: int, cid: str = "c") -> ml_service_pb2.InferRequest:
    return ml_service_pb2.InferRequest(
        correlation_id=cid, task="vlm_generate", payload=payload, seq=seq, total=total, offset=offset, meta={"k": "v"}
    )


def test_assembly_in_order() -> None:
    assembler = ChunkAssembler(100)
    assert assembler.feed(chunk(0, 3, b"ab", 0), "c") is None
    assert assembler.feed(chunk(1, 3, b"cd", 2), "c") is None
    complete = assembler.feed(chunk(2, 3, b"e", 4), "c")
    assert complete is not None and complete.payload == b"abcde" and complete.chunks == 3
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
