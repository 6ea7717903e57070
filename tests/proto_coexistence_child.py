"""One import order per interpreter; run by tests/test_proto_coexistence.py, never collected.

    python proto_coexistence_child.py SCENARIO OTHER_COPY_DIR [HUB_YAML]

OTHER_COPY_DIR holds another generated copy of the Lumen proto as the package ``proto``,
registered as ``proto/ml_service.proto`` like the hub's and the other Lumen packages'. Each
scenario prints what it found as one JSON line on stdout; a broken step is an uncaught
exception (a traceback on stderr, exit status 1).

Scenarios:

* ``other-first``: the other copy, then ours; which descriptors ours took.
* ``ours-first``: ours, then the other copy; both import, and what our private pool answers.
* ``hub``: the hub's whole path with HUB_YAML: its proto first, lumen-resources' config,
  ``registry_class.from_config(service_config, cache_dir)``, a router like the hub's
  ``HubRouter`` on a server built with the other copy, then ``import_info.add_to_server``.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

CALL_TIMEOUT = 60.0
IMAGE = Path(__file__).resolve().parent / "fixtures" / "golden" / "landscape.png"
QUESTION = "What do you see in this image?"
MAX_NEW_TOKENS = "4"


def import_other_copy(directory: str) -> tuple[Any, Any]:
    sys.path.insert(0, directory)
    from proto import ml_service_pb2, ml_service_pb2_grpc  # the other copy, as the hub imports its own

    return ml_service_pb2, ml_service_pb2_grpc


def import_ours() -> Any:
    from lumen_vlm.proto import ml_service_pb2

    return ml_service_pb2


def descriptor_fields(message_class: Any) -> list[str]:
    """The fields a message's descriptor serializes to: it breaks if its offsets are wrong."""
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.DescriptorProto()
    message_class.DESCRIPTOR.CopyToProto(proto)
    return [field.name for field in proto.field]


# --------------------------------------------------------------------------- import orders


def other_first(other_dir: str) -> dict[str, Any]:
    from google.protobuf import descriptor_pool

    other, _ = import_other_copy(other_dir)
    ours = import_ours()
    return {
        "our_file": ours.DESCRIPTOR.name,
        "in_default_pool": ours.DESCRIPTOR.pool is descriptor_pool.Default(),
        "shared_classes": [
            name for name in ("IOTask", "InferResponse", "Capability") if getattr(ours, name) is getattr(other, name)
        ],
        "other_response_fields": descriptor_fields(other.InferResponse),
    }


def ours_first(other_dir: str) -> dict[str, Any]:
    from google.protobuf import descriptor_pool
    from grpc_health.v1 import health_pb2  # noqa: F401 (into the default pool, as server.py has it)

    ours = import_ours()
    other, _ = import_other_copy(other_dir)
    pool = ours.DESCRIPTOR.pool
    try:
        pool.FindFileByName(other.DESCRIPTOR.name)
        other_copy_in_our_pool = True
    except KeyError:
        other_copy_in_our_pool = False
    task = {"name": "vlm_generate", "input_mimes": ["image/png"], "limits": {"max_new_tokens": "4"}}
    return {
        "our_file": ours.DESCRIPTOR.name,
        "in_default_pool": pool is descriptor_pool.Default(),
        "other_file": other.DESCRIPTOR.name,
        "other_in_default_pool": other.DESCRIPTOR.pool is descriptor_pool.Default(),
        "our_io_task_fields": [field.name for field in ours.IOTask.DESCRIPTOR.fields],
        "same_wire_bytes": ours.IOTask(**task).SerializeToString() == other.IOTask(**task).SerializeToString(),
        "our_pool_finds": {
            symbol: pool.FindFileContainingSymbol(symbol).name
            for symbol in ("home_native.v1.Inference", "google.protobuf.Empty", "grpc.health.v1.Health")
        },
        "other_copy_in_our_pool": other_copy_in_our_pool,
    }


# --------------------------------------------------------------------------- the hub's path


def resolve(dotted: str) -> Any:
    """What the hub's ServiceLoader does with ``import_info`` strings."""
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def make_router(other: Any, other_grpc: Any, services: list[Any]) -> Any:
    """A servicer of the other copy that uses our service as the hub's HubRouter does."""
    import grpc
    from google.protobuf import empty_pb2

    class Router(other_grpc.InferenceServicer):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self.routes: dict[str, Any] = {}
            for service in services:
                for task in service.get_supported_tasks():
                    self.routes.setdefault(task, service)

        def Infer(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
            first = next(request_iterator, None)
            if first is None:
                return
            target = self.routes.get(first.task)
            if target is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Task {first.task} not supported")
            # The other copy's requests go in; our responses come out and its server serializes them.
            yield from target.Infer(itertools.chain([first], request_iterator), context)

        def GetCapabilities(self, request: Any, context: Any) -> Any:
            tasks = [task for service in services for task in service.GetCapabilities(request, context).tasks]
            return other.Capability(tasks=tasks)  # the other copy's class, holding our IOTasks

        def StreamCapabilities(self, request: Any, context: Any) -> Iterator[Any]:
            # The hub has none; this relays ours, so the other copy's server serializes them.
            for service in services:
                yield from service.StreamCapabilities(request, context)

        def Health(self, request: Any, context: Any) -> Any:
            for service in services:
                service.Health(empty_pb2.Empty(), context)
            return empty_pb2.Empty()

    return Router()


def served_on_loopback(add: Callable[[Any, Any], None], servicer: Any) -> tuple[Any, int]:
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def exercise(other: Any, other_grpc: Any, port: int) -> dict[str, Any]:
    """vlm_generate, GetCapabilities, StreamCapabilities and Health, with the other copy's stub."""
    import grpc
    from google.protobuf import empty_pb2

    request = other.InferRequest(
        correlation_id="hub",
        task="vlm_generate",
        payload=IMAGE.read_bytes(),
        payload_mime="image/png",
        meta={"messages": json.dumps([{"role": "user", "content": QUESTION}]), "max_new_tokens": MAX_NEW_TOKENS},
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = other_grpc.InferenceStub(channel)
        responses = list(stub.Infer(iter([request]), timeout=CALL_TIMEOUT))
        capability = stub.GetCapabilities(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
        streamed = list(stub.StreamCapabilities(empty_pb2.Empty(), timeout=CALL_TIMEOUT))
        health = stub.Health(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    (response,) = responses
    return {
        "correlation_id": response.correlation_id,
        "is_final": response.is_final,
        "error": response.error.message if response.HasField("error") else None,
        "result_mime": response.result_mime,
        "result": json.loads(response.result) if response.result else None,
        "capability_tasks": [task.name for task in capability.tasks],
        "capability_task_limits": [dict(task.limits) for task in capability.tasks],
        "streamed_model_ids": [list(c.model_ids) for c in streamed],
        "streamed_tasks": [[task.name for task in c.tasks] for c in streamed],
        "health": type(health).__name__,
    }


def hub(other_dir: str, hub_yaml: str) -> dict[str, Any]:
    from google.protobuf import descriptor_pool
    from lumen_resources import load_and_validate_config

    other, other_grpc = import_other_copy(other_dir)  # the hub imports its proto before any service
    config = load_and_validate_config(hub_yaml)
    assert config.deployment.mode == "hub", config.deployment
    cache_dir = Path(config.metadata.cache_dir)  # exactly what the hub passes: "~" not expanded
    findings: dict[str, Any] = {"cache_dir_passed": str(cache_dir)}
    services = []
    for name, service_config in config.services.items():
        service_class = resolve(service_config.import_info.registry_class)
        service = service_class.from_config(service_config=service_config, cache_dir=cache_dir)
        services.append(service)
        findings[f"{name}.supported_tasks"] = service.get_supported_tasks()
    ours = import_ours()
    findings["shared_classes"] = ours.InferResponse is other.InferResponse and ours.IOTask is other.IOTask
    findings["in_default_pool"] = ours.DESCRIPTOR.pool is descriptor_pool.Default()

    router_server, port = served_on_loopback(
        other_grpc.add_InferenceServicer_to_server, make_router(other, other_grpc, services)
    )
    try:
        findings["router"] = exercise(other, other_grpc, port)
    finally:
        router_server.stop(grace=None).wait(10)

    (service_config,) = config.services.values()
    add_to_server = resolve(service_config.import_info.add_to_server)
    own_server, port = served_on_loopback(add_to_server, services[0])
    try:
        findings["add_to_server"] = exercise(other, other_grpc, port)
    finally:
        own_server.stop(grace=None).wait(10)
    for service in services:
        service.close()
    findings["literal_tilde_dir_made"] = Path("~").exists()  # the cwd: an unexpanded path lands here
    return findings


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {"other-first": other_first, "ours-first": ours_first, "hub": hub}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    scenario, *args = argv
    print(json.dumps(SCENARIOS[scenario](*args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
