"""Reading `InferRequest`s off the wire without letting one bad message end the stream.

protobuf refuses a whole message when a `string` field holds bytes that are not UTF-8, and
grpc's own deserializer then ends the stream with INTERNAL ("Exception deserializing
request!"), losing the stream's other requests. `read_infer_request` is the deserializer our
server registers instead: a message that cannot be read becomes an `UnreadableRequest` that
says why, which the stream answers with INVALID_ARGUMENT and goes on.

To say which field is at fault and whom to answer, the bytes are read a second time with a
*lenient* twin of `InferRequest`, built at import from our own descriptor: the same field
numbers, with every `string` turned into `bytes` (which protobuf does not check), and the
`meta` map turned into its wire-identical repeated entries (map keys may not be bytes).

Its correlation_id is echoed only within `MAX_CORRELATION_ID_BYTES`, as for any request: an
id past it is neither echoed (escaped, it could outgrow the largest message the server may
send, which would end the stream) nor kept to tie the message to an upload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from ..fastvlm.request_meta import MAX_CORRELATION_ID_BYTES
from ..proto import ml_service_pb2
from ..text import shown

InferRequest = ml_service_pb2.InferRequest

_LENIENT_PACKAGE = "lumen_vlm.lenient"


@dataclass(frozen=True)
class UnreadableRequest:
    """A message of the stream that is not a valid InferRequest, and what could be read of it."""

    reason: str
    correlation_id: str = ""
    seq: int = 0
    total: int = 0


def read_infer_request(data: bytes) -> Any:
    """An `InferRequest`, or an `UnreadableRequest` saying why `data` is not one."""
    try:
        return InferRequest.FromString(data)
    except DecodeError:
        return _explain(data)


def _explain(data: bytes) -> UnreadableRequest:
    try:
        lenient = _LENIENT_CLASS.FromString(data)
    except DecodeError:
        return UnreadableRequest("the message is not a valid InferRequest (it cannot be parsed)")
    fields = _non_utf8_fields(lenient)
    reason = (
        f"the request is not valid UTF-8 in {', '.join(fields)}: string fields must be UTF-8 text"
        if fields
        else "the message is not a valid InferRequest"
    )
    if len(lenient.correlation_id) > MAX_CORRELATION_ID_BYTES:
        reason += (
            f"; and its correlation_id is {len(lenient.correlation_id)} bytes, more than the limit of "
            f"{MAX_CORRELATION_ID_BYTES} bytes (UTF-8)"
        )
        return UnreadableRequest(reason)
    # The id is echoed so the client can match the answer; undecodable bytes are escaped.
    correlation_id = lenient.correlation_id.decode("utf-8", errors="backslashreplace")
    return UnreadableRequest(reason, correlation_id, int(lenient.seq), int(lenient.total))


def _non_utf8_fields(lenient: Any) -> list[str]:
    """The request's text fields whose bytes are not UTF-8, named for an error message."""
    named = [(name, getattr(lenient, name)) for name in _STRING_FIELDS]
    for entry in lenient.meta:
        key = entry.key.decode("utf-8", errors="backslashreplace")
        named += [("a meta key", entry.key), (f"meta[{shown(key)}]", entry.value)]
    return [name for name, value in named if not _is_utf8(value)]


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _lenient_class() -> tuple[Any, tuple[str, ...]]:
    """The lenient twin of InferRequest, in a pool of its own, and its formerly-string fields."""
    message = descriptor_pb2.DescriptorProto()
    InferRequest.DESCRIPTOR.CopyToProto(message)
    strings = tuple(field.name for field in message.field if field.type == field.TYPE_STRING)
    _strings_to_bytes(message)
    for nested in message.nested_type:  # the meta map's entry
        nested.options.map_entry = False
        _strings_to_bytes(nested)
    ours = f".{InferRequest.DESCRIPTOR.file.package}."
    for field in message.field:
        if field.type_name:
            field.type_name = field.type_name.replace(ours, f".{_LENIENT_PACKAGE}.")
    file = descriptor_pb2.FileDescriptorProto(name="lumen_vlm/lenient_infer_request.proto", package=_LENIENT_PACKAGE)
    file.syntax = "proto3"
    file.message_type.append(message)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    descriptor = pool.FindMessageTypeByName(f"{_LENIENT_PACKAGE}.{message.name}")
    return message_factory.GetMessageClass(descriptor), strings


def _strings_to_bytes(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        if field.type == field.TYPE_STRING:
            field.type = field.TYPE_BYTES


_LENIENT_CLASS, _STRING_FIELDS = _lenient_class()
