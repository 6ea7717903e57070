"""Our proto next to another generated copy of the Lumen proto, in one process, in either order.

The other copy is generated here from our own .proto text without IOTask's fields 5 and 6 (the
proto the hub and the other Lumen packages ship), registered as ``proto/ml_service.proto`` as
theirs is. Import order matters and is fixed for the life of an interpreter, so each order runs
in a fresh one (tests/proto_coexistence_child.py).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2

import lumen_vlm
from lumen_vlm.fastvlm.fastvlm_service import FastVLMService
from lumen_vlm.proto import _pool, ml_service_pb2

from .service.conftest import image_bytes, make_request, make_settings, result_of

ROOT = Path(__file__).resolve().parents[1]
OUR_PROTO = ROOT / "src" / "lumen_vlm" / "proto" / "ml_service.proto"
CHILD = Path(__file__).resolve().parent / "proto_coexistence_child.py"
CHILD_TIMEOUT_S = 240  # imports, the tiny model's load and a few short generations, on a busy machine
NEW_FIELDS = ("tensor_preprocess_id", "tensor_batching_supported")
TASKS = ["vlm_generate", "vlm_generate_stream"]


def without_lines(text: str, pattern: str, count: int) -> str:
    """``text`` without the lines matching ``pattern``; exactly ``count`` of them must match."""
    stripped, found = re.subn(rf"^.*(?:{pattern}).*\n", "", text, flags=re.MULTILINE)
    assert found == count, f"expected {count} lines matching {pattern!r} in the proto, found {found}"
    return stripped


def older_proto_text() -> str:
    """Our proto as the hub ships it: IOTask without the SDK's tensor fields."""
    return without_lines(OUR_PROTO.read_text(encoding="utf-8"), "|".join(NEW_FIELDS), len(NEW_FIELDS))


def generate_copy(root: Path, proto_text: str) -> Path:
    """protoc ``proto_text`` as ``proto/ml_service.proto`` into ``root``; returns the import dir."""
    source, out = root / "src", root / "gen"
    (source / "proto").mkdir(parents=True)
    out.mkdir()
    (source / "proto" / "ml_service.proto").write_text(proto_text, encoding="utf-8")
    include = importlib.resources.files("grpc_tools") / "_proto"
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{source}", f"-I{include}"]
    command += [f"--python_out={out}", f"--grpc_python_out={out}", str(source / "proto" / "ml_service.proto")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"protoc failed:\n{proc.stderr}"
    return out


@pytest.fixture(scope="module")
def other_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_copy(tmp_path_factory.mktemp("older"), older_proto_text())


def run_child(*args: str, cwd: Path, home: Path, backend: str = "upb") -> tuple[dict[str, Any], str]:
    """Run one scenario in a fresh interpreter: its findings and its stderr."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(lumen_vlm.__file__).parents[1]), env.get("PYTHONPATH", "")])
    env["HOME"] = str(home)  # whatever the child expands "~" to stays in the test's directory
    env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = backend
    proc = subprocess.run(
        [sys.executable, str(CHILD), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    cwd, home = tmp_path / "work", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    return cwd, home


# --------------------------------------------------------------------------- import orders


@pytest.mark.parametrize("backend", ["upb", "python"])
def test_other_copy_first_our_classes_are_its_classes(other_copy: Path, dirs: tuple[Path, Path], backend: str) -> None:
    found, stderr = run_child("other-first", str(other_copy), cwd=dirs[0], home=dirs[1], backend=backend)
    assert found["our_file"] == "proto/ml_service.proto"  # the registered copy, reused
    assert found["in_default_pool"]
    assert found["shared_classes"] == ["IOTask", "InferResponse", "Capability"]
    # Our generated module did not overwrite the other copy's descriptors with offsets into our bytes.
    assert len(found["other_response_fields"]) == 10
    assert "WARNING" not in stderr


def test_ours_first_then_the_other_copy_both_import(other_copy: Path, dirs: tuple[Path, Path]) -> None:
    found, _ = run_child("ours-first", str(other_copy), cwd=dirs[0], home=dirs[1])
    assert (found["our_file"], found["in_default_pool"]) == ("ml_service.proto", False)
    assert (found["other_file"], found["other_in_default_pool"]) == ("proto/ml_service.proto", True)
    assert found["our_io_task_fields"][-2:] == list(NEW_FIELDS)
    # Left at their defaults, the new fields are not on the wire: the older copy reads the same bytes.
    assert found["same_wire_bytes"]
    # Our pool reads what it lacks from the default pool, but never the other copy of our package.
    assert found["our_pool_finds"] == {
        "home_native.v1.Inference": "ml_service.proto",
        "google.protobuf.Empty": "google/protobuf/empty.proto",
        "grpc.health.v1.Health": "grpc_health/v1/health.proto",
    }
    assert not found["other_copy_in_our_pool"]


def test_a_registered_copy_lacking_a_field_we_write_is_not_reused(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    lacking = without_lines(older_proto_text(), "result_schema", 1)
    found, stderr = run_child("other-first", str(generate_copy(tmp_path, lacking)), cwd=dirs[0], home=dirs[1])
    assert (found["our_file"], found["in_default_pool"], found["shared_classes"]) == ("ml_service.proto", False, [])
    assert "home_native.v1.InferResponse.result_schema missing" in stderr


# --------------------------------------------------------------------------- the hub's path


def write_hub_config(path: Path, model_dir: Path) -> Path:
    """A hub deployment of our service as a user writes it; cache_dir keeps its "~"."""
    config = {
        "metadata": {"version": "1.0.0", "region": "other", "cache_dir": "~/x"},
        "deployment": {"mode": "hub", "services": ["vlm"]},
        "server": {"port": 50099, "host": "127.0.0.1"},  # the hub's port: not opened here
        "services": {
            "vlm": {
                "enabled": True,
                "package": "lumen_vlm",
                "import_info": {
                    "registry_class": "lumen_vlm.fastvlm.GeneralFastVLMService",
                    "add_to_server": "lumen_vlm.proto.ml_service_pb2_grpc.add_InferenceServicer_to_server",
                },
                "models": {"fastvlm": {"model": str(model_dir), "runtime": "onnx"}},
            }
        },
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def direct_result(manager: Any, tiny_model_dir: Path) -> dict[str, Any]:
    """The child's request answered by our service called directly: what the hub's path must give."""
    service = FastVLMService(manager, make_settings(tiny_model_dir))
    request = make_request(image=image_bytes(), correlation_id="hub", max_new_tokens="4")
    (response,) = list(service.Infer(iter([request]), None))
    return result_of(response)


@pytest.fixture(scope="module")
def hub_run(other_copy: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hub")
    cwd, home = root / "work", root / "home"
    cwd.mkdir()
    home.mkdir()
    config = write_hub_config(root / "hub.yaml", tiny_model_dir.resolve())
    found, _ = run_child("hub", str(other_copy), str(config), cwd=cwd, home=home)
    found["cwd_entries"] = sorted(p.name for p in cwd.iterdir())
    found["home_dirs_written"] = sorted(
        {"/".join(p.relative_to(home).parts[:2]) for p in home.rglob("*") if p.is_file()}
    )
    return found


def same_answer(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got["error"] is None and got["is_final"] and got["correlation_id"] == "hub", got
    assert got["result_mime"] == "application/json;schema=text_generation_v1"
    for key in ("text", "generated_tokens", "finish_reason", "model_id"):
        assert got["result"][key] == expected[key], key


def test_a_router_on_the_other_copy_serves_our_service(hub_run: dict[str, Any], direct_result: dict[str, Any]) -> None:
    """The hub's HubRouter pattern: its requests in, our responses out through its server."""
    assert hub_run["shared_classes"] and hub_run["in_default_pool"]
    router = hub_run["router"]
    same_answer(router, direct_result)
    assert router["capability_tasks"] == TASKS  # aggregated into the other copy's Capability
    assert all(limits["max_new_tokens"] for limits in router["capability_task_limits"])
    assert router["streamed_tasks"] == [TASKS]
    assert router["streamed_model_ids"] == [[direct_result["model_id"]]]
    assert router["health"] == "Empty"


def test_the_hub_loading_contract(hub_run: dict[str, Any], direct_result: dict[str, Any]) -> None:
    """from_config with the hub's unexpanded "~" cache_dir, get_supported_tasks, add_to_server."""
    assert hub_run["cache_dir_passed"] == "~/x"
    assert hub_run["vlm.supported_tasks"] == TASKS
    assert not hub_run["literal_tilde_dir_made"] and hub_run["cwd_entries"] == []
    # What the service wrote went to ~/x in HOME; ONNX Runtime itself keeps a device id in ~/.cache/Microsoft.
    assert all(d.startswith("x/") or d == ".cache/Microsoft" for d in hub_run["home_dirs_written"]), hub_run
    assert any(d.startswith("x/") for d in hub_run["home_dirs_written"])
    own = hub_run["add_to_server"]
    same_answer(own, direct_result)
    assert own["capability_tasks"] == TASKS and own["streamed_tasks"] == [TASKS]
    assert own["health"] == "Empty"


# --------------------------------------------------------------------------- the reuse rule, in process


def file_proto(descriptor: Any) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.CopyToProto(proto)
    return proto


def registered_as(proto_text_edit: Any) -> Any:
    """Our file, edited, in a pool of its own: a stand-in for a copy another package registered."""
    proto = file_proto(ml_service_pb2.DESCRIPTOR)
    proto.name = "proto/ml_service.proto"
    proto_text_edit(proto)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(empty_pb2.DESCRIPTOR.serialized_pb)
    return pool.AddSerializedFile(proto.SerializeToString())


def message(proto: descriptor_pb2.FileDescriptorProto, name: str) -> descriptor_pb2.DescriptorProto:
    return next(m for m in proto.message_type if m.name == name)


def drop_field(message_name: str, field_name: str) -> Any:
    def edit(proto: descriptor_pb2.FileDescriptorProto) -> None:
        fields = message(proto, message_name).field
        fields.remove(next(f for f in fields if f.name == field_name))

    return edit


def test_reuse_rule() -> None:
    ours = file_proto(ml_service_pb2.DESCRIPTOR)
    assert _pool.differences(ours, registered_as(lambda proto: None)) == []
    older = registered_as(lambda proto: [drop_field("IOTask", name)(proto) for name in NEW_FIELDS])
    assert _pool.differences(ours, older) == []  # fields we leave at their defaults may be absent
    assert _pool.differences(ours, registered_as(drop_field("Error", "detail"))) == [
        "home_native.v1.Error.detail missing"
    ]

    def renumber(proto: descriptor_pb2.FileDescriptorProto) -> None:
        message(proto, "InferRequest").field[0].number = 99

    (problem,) = _pool.differences(ours, registered_as(renumber))
    assert problem.startswith("home_native.v1.InferRequest.correlation_id is (99,")

    def drop_method(proto: descriptor_pb2.FileDescriptorProto) -> None:
        del proto.service[0].method[-1]

    assert _pool.differences(ours, registered_as(drop_method)) == ["home_native.v1.Inference.Health missing"]


def test_alone_our_file_lives_in_a_private_pool() -> None:
    """Nothing of home_native.v1 enters the default pool: a copy imported later still loads."""
    assert ml_service_pb2.DESCRIPTOR.pool is not descriptor_pool.Default()
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindFileContainingSymbol("home_native.v1.InferRequest")
    assert _pool.built_from_ours(ml_service_pb2.DESCRIPTOR)
