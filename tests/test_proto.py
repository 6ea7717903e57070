"""The shared Lumen protocol: generated code is current, the descriptor matches the spec, and it works."""

from __future__ import annotations

import importlib.util
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, empty_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lumen_vlm.proto import ml_service_pb2, ml_service_pb2_grpc
from lumen_vlm.resources.settings import ServerSettings
from lumen_vlm.server import VLMServer

from .service.conftest import make_settings

ROOT = Path(__file__).resolve().parents[1]
F = descriptor_pb2.FieldDescriptorProto

OPT = F.LABEL_OPTIONAL
REP = F.LABEL_REPEATED
STRING, BYTES, BOOL = F.TYPE_STRING, F.TYPE_BYTES, F.TYPE_BOOL
U32, U64 = F.TYPE_UINT32, F.TYPE_UINT64
MSG, ENUM = F.TYPE_MESSAGE, F.TYPE_ENUM

PKG = ".home_native.v1"

# (name, number, type, label, type_name) per message, in declaration order, from the protocol spec
# (the Lumen-SDK's proto/ml_service.proto; IOTask's fields 5 and 6 are its tensor fast path).
EXPECTED_FIELDS = {
    "Error": [
        ("code", 1, ENUM, OPT, f"{PKG}.ErrorCode"),
        ("message", 2, STRING, OPT, ""),
        ("detail", 3, STRING, OPT, ""),
    ],
    "IOTask": [
        ("name", 1, STRING, OPT, ""),
        ("input_mimes", 2, STRING, REP, ""),
        ("output_mimes", 3, STRING, REP, ""),
        ("limits", 4, MSG, REP, f"{PKG}.IOTask.LimitsEntry"),
        ("tensor_preprocess_id", 5, STRING, OPT, ""),
        ("tensor_batching_supported", 6, BOOL, OPT, ""),
    ],
    "Capability": [
        ("service_name", 1, STRING, OPT, ""),
        ("model_ids", 2, STRING, REP, ""),
        ("runtime", 3, STRING, OPT, ""),
        ("max_concurrency", 4, U32, OPT, ""),
        ("precisions", 5, STRING, REP, ""),
        ("extra", 6, MSG, REP, f"{PKG}.Capability.ExtraEntry"),
        ("tasks", 7, MSG, REP, f"{PKG}.IOTask"),
        ("protocol_version", 8, STRING, OPT, ""),
    ],
    "InferRequest": [
        ("correlation_id", 1, STRING, OPT, ""),
        ("task", 2, STRING, OPT, ""),
        ("payload", 3, BYTES, OPT, ""),
        ("meta", 4, MSG, REP, f"{PKG}.InferRequest.MetaEntry"),
        ("payload_mime", 5, STRING, OPT, ""),
        ("seq", 6, U64, OPT, ""),
        ("total", 7, U64, OPT, ""),
        ("offset", 8, U64, OPT, ""),
    ],
    "InferResponse": [
        ("correlation_id", 1, STRING, OPT, ""),
        ("is_final", 2, BOOL, OPT, ""),
        ("result", 3, BYTES, OPT, ""),
        ("meta", 4, MSG, REP, f"{PKG}.InferResponse.MetaEntry"),
        ("error", 5, MSG, OPT, f"{PKG}.Error"),
        ("seq", 6, U64, OPT, ""),
        ("total", 7, U64, OPT, ""),
        ("offset", 8, U64, OPT, ""),
        ("result_mime", 9, STRING, OPT, ""),
        ("result_schema", 10, STRING, OPT, ""),
    ],
}

# Map fields: message name -> (map field, entry type name); entries are map<string, string>.
EXPECTED_MAPS = {
    "IOTask": ("limits", "LimitsEntry"),
    "Capability": ("extra", "ExtraEntry"),
    "InferRequest": ("meta", "MetaEntry"),
    "InferResponse": ("meta", "MetaEntry"),
}

EXPECTED_ENUM = [
    ("ERROR_CODE_UNSPECIFIED", 0),
    ("ERROR_CODE_INVALID_ARGUMENT", 1),
    ("ERROR_CODE_UNAVAILABLE", 2),
    ("ERROR_CODE_DEADLINE_EXCEEDED", 3),
    ("ERROR_CODE_INTERNAL", 4),
]

EMPTY = ".google.protobuf.Empty"
# (name, input_type, output_type, client_streaming, server_streaming)
EXPECTED_METHODS = [
    ("Infer", f"{PKG}.InferRequest", f"{PKG}.InferResponse", True, True),
    ("GetCapabilities", EMPTY, f"{PKG}.Capability", False, False),
    ("StreamCapabilities", EMPTY, f"{PKG}.Capability", False, True),
    ("Health", EMPTY, EMPTY, False, False),
]


def _load_gen_proto():
    spec = importlib.util.spec_from_file_location("_gen_proto", ROOT / "tools" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fdp() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    proto.ParseFromString(ml_service_pb2.DESCRIPTOR.serialized_pb)
    return proto


def test_generated_code_is_current():
    problems = _load_gen_proto().check()
    assert not problems, "\n".join(problems) + "\nrun: python tools/gen_proto.py"


def test_file_header(fdp):
    assert fdp.name == "ml_service.proto"
    assert fdp.package == "home_native.v1"
    assert fdp.syntax == "proto3"
    assert fdp.options.go_package == "server/proto"
    assert list(fdp.dependency) == ["google/protobuf/empty.proto"]
    assert not fdp.extension


def test_enum(fdp):
    assert [e.name for e in fdp.enum_type] == ["ErrorCode"]
    assert [(v.name, v.number) for v in fdp.enum_type[0].value] == EXPECTED_ENUM


def test_messages_and_fields(fdp):
    assert [m.name for m in fdp.message_type] == list(EXPECTED_FIELDS)
    for msg in fdp.message_type:
        got = [(f.name, f.number, f.type, f.label, f.type_name) for f in msg.field]
        assert got == EXPECTED_FIELDS[msg.name], msg.name
        assert not any(f.HasField("proto3_optional") for f in msg.field), msg.name
        assert not msg.oneof_decl, msg.name
        assert not msg.enum_type, msg.name


def test_map_entries(fdp):
    by_name = {m.name: m for m in fdp.message_type}
    for msg_name, msg in by_name.items():
        expected = EXPECTED_MAPS.get(msg_name)
        if expected is None:
            assert not msg.nested_type, msg_name
            continue
        _, entry_name = expected
        assert [n.name for n in msg.nested_type] == [entry_name], msg_name
        entry = msg.nested_type[0]
        assert entry.options.map_entry
        assert [(f.name, f.number, f.type, f.label) for f in entry.field] == [
            ("key", 1, STRING, OPT),
            ("value", 2, STRING, OPT),
        ]


def test_service(fdp):
    assert [s.name for s in fdp.service] == ["Inference"]
    got = [(m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in fdp.service[0].method]
    assert got == EXPECTED_METHODS


def test_package_imports():
    assert callable(ml_service_pb2_grpc.add_InferenceServicer_to_server)
    assert isinstance(ml_service_pb2_grpc.InferenceStub, type)
    assert isinstance(ml_service_pb2_grpc.InferenceServicer, type)
    # The grpc module must use the package's pb2, not a top-level copy.
    assert ml_service_pb2_grpc.ml__service__pb2 is ml_service_pb2


class _EchoServicer(ml_service_pb2_grpc.InferenceServicer):
    def Infer(self, request_iterator, context):
        for req in request_iterator:
            yield ml_service_pb2.InferResponse(
                correlation_id=req.correlation_id,
                is_final=True,
                result=req.payload,
                meta={"task": req.task},
                seq=req.seq,
                result_mime=req.payload_mime,
            )

    def Health(self, request, context):
        return empty_pb2.Empty()


def test_infer_round_trip():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ml_service_pb2_grpc.add_InferenceServicer_to_server(_EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            stub = ml_service_pb2_grpc.InferenceStub(channel)
            stub.Health(empty_pb2.Empty(), timeout=10)
            requests = [
                ml_service_pb2.InferRequest(
                    correlation_id=f"c{i}",
                    task="vlm_generate",
                    payload=f"p{i}".encode(),
                    payload_mime="text/plain",
                    seq=i,
                )
                for i in range(2)
            ]
            responses = list(stub.Infer(iter(requests), timeout=10))
    finally:
        server.stop(grace=None).wait(timeout=10)

    assert [r.correlation_id for r in responses] == ["c0", "c1"]
    assert [r.result for r in responses] == [b"p0", b"p1"]
    assert all(r.is_final and r.meta["task"] == "vlm_generate" for r in responses)
    assert [r.seq for r in responses] == [0, 1]
    assert not any(r.HasField("error") for r in responses)


def reflected_files(answer: reflection_pb2.ServerReflectionResponse) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    assert not answer.HasField("error_response"), answer.error_response
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b) for b in answer.file_descriptor_response.file_descriptor_proto
    ]
    return {f.name: f for f in files}


def test_server_reflection_lists_and_describes_the_services(tiny_model_dir: Path) -> None:
    """What grpcurl asks for `list` and `describe`: the real server's reflection, before a model is loaded."""
    server = VLMServer(replace(make_settings(tiny_model_dir), server=ServerSettings(host="127.0.0.1", port=0)))
    server.start()
    asked = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="home_native.v1.Inference"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="home_native.v1.IOTask"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
    ]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            listed, inference, io_task, health = list(stub.ServerReflectionInfo(iter(asked), timeout=10))
    finally:
        server.shutdown()

    names = [s.name for s in listed.list_services_response.service]
    assert {"home_native.v1.Inference", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        names
    )
    files = reflected_files(inference)
    assert set(files) == {"ml_service.proto", "google/protobuf/empty.proto"}  # the file and its dependency
    methods = files["ml_service.proto"].service[0].method
    assert [(m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in methods] == (
        EXPECTED_METHODS
    )
    task = next(m for m in reflected_files(io_task)["ml_service.proto"].message_type if m.name == "IOTask")
    assert [(f.name, f.number, f.type, f.label, f.type_name) for f in task.field] == EXPECTED_FIELDS["IOTask"]
    health_file = reflected_files(health)["grpc_health/v1/health.proto"]
    assert [s.name for s in health_file.service] == ["Health"]
