"""The server as a person runs it: a real process, real signals, real ports on loopback."""

from __future__ import annotations

import ast
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lumen_vlm import server as server_module
from lumen_vlm.proto import ml_service_pb2, ml_service_pb2_grpc

from ..conftest import GOLDEN, TINY_MODEL

START_TIMEOUT_S = 120.0
SLOW_DECODING_SERVER = Path(__file__).with_name("slow_decoding_server.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, port: int, model: str = str(TINY_MODEL), **vlm_settings: object) -> Path:
    config = {
        "cache_dir": str(path.parent / "cache"),
        "server": {"host": "127.0.0.1", "port": port},
        "services": {
            "vlm": {
                "models": {"fastvlm": {"model": model, "runtime": "onnx"}},
                "backend_settings": {"device": "cpu", "max_new_tokens": 64},
                "vlm_settings": vlm_settings,
            }
        },
    }
    if not vlm_settings:
        del config["services"]["vlm"]["vlm_settings"]
    path.write_text(yaml.safe_dump(config))
    return path


class ServerProcess:
    """A server subprocess whose log lines are collected as they come."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        # faulthandler: a server that hangs is made to print every thread's stack (exit_code).
        env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"never saw {text!r}; output:\n{''.join(self.lines)}")

    def exit_code(self, timeout: float) -> int:
        """The exit code, with every line read; a process still running after `timeout` fails
        with its log and stacks."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            self.process.wait(timeout=30)
            self._reader.join(timeout=5)
            raise AssertionError(f"no exit within {timeout:g} s; output:\n{''.join(self.lines)}") from None
        self._reader.join(timeout=5)
        return code

    def stop(self) -> int:
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.exit_code(timeout=60)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@contextmanager
def serving(command: list[str], port: int) -> Iterator[ServerProcess]:
    """The server `command` starts, once it listens on `port`; killed at the end if still running."""
    proc = ServerProcess(command)
    try:
        proc.wait_for(f"listening on 127.0.0.1:{port}")
        yield proc
    finally:
        proc.kill()


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[ServerProcess, int]]:
    port = free_port()
    config = write_config(tmp_path / "config.yaml", port)
    with serving([sys.executable, "-m", "lumen_vlm.server", str(config), str(port)], port) as proc:
        yield proc, port


def stream_request(max_new_tokens: int) -> ml_service_pb2.InferRequest:
    return ml_service_pb2.InferRequest(
        correlation_id="long",
        task="vlm_generate_stream",
        payload=(GOLDEN / "landscape.png").read_bytes(),
        payload_mime="image/png",
        meta={
            "messages": json.dumps([{"role": "user", "content": "Tell me a long story."}]),
            "max_new_tokens": str(max_new_tokens),
        },
    )


def test_the_seed_command_serves_health_reflection_and_capabilities(server: tuple[ServerProcess, int]) -> None:
    _, port = server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        inference = "home_native.v1.Inference"
        assert health.Check(health_pb2.HealthCheckRequest(service=inference), timeout=10).status == status
        stub = ml_service_pb2_grpc.InferenceStub(channel)
        stub.Health(empty_pb2.Empty(), timeout=10)
        capability = stub.GetCapabilities(empty_pb2.Empty(), timeout=10)
        assert capability.model_ids == ["tiny-fastvlm"]
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for answer in answers for s in answer.list_services_response.service}
        assert {inference, "grpc.health.v1.Health"} <= names


def slow_decoding_server(config: Path) -> list[str]:
    """The real server, each decode step slowed, so that a generation is still running when signalled."""
    return [sys.executable, str(SLOW_DECODING_SERVER), "--config", str(config)]


def index_of(lines: list[str], text: str) -> int:
    return next(i for i, line in enumerate(lines) if text in line)


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    with serving(slow_decoding_server(write_config(tmp_path / "config.yaml", port)), port) as proc:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ml_service_pb2_grpc.InferenceStub(channel)
            responses = stub.Infer(iter([stream_request(max_new_tokens=300)]), timeout=120)
            first = next(responses)
            assert not first.is_final
            proc.process.send_signal(signal.SIGTERM)
            rest = list(responses)
        final = rest[-1]
        assert final.is_final and not final.HasField("error"), final
        assert json.loads(final.result)["generated_tokens"] == 300
        assert proc.exit_code(timeout=60) == 0
        # The generation was still running when the server began shutting down.
        assert index_of(proc.lines, "shutting down") < index_of(proc.lines, "correlation_id='long'")


def test_health_is_not_serving_after_sigterm_while_work_finishes(tmp_path: Path) -> None:
    port = free_port()
    command = slow_decoding_server(write_config(tmp_path / "config.yaml", port, shutdown_grace_s=30.0))
    with serving(command, port) as proc:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ml_service_pb2_grpc.InferenceStub(channel)
            responses = stub.Infer(iter([stream_request(max_new_tokens=600)]), timeout=120)
            next(responses)
            proc.process.send_signal(signal.SIGTERM)
            proc.wait_for("shutting down", timeout=30)
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not any("correlation_id='long'" in line for line in proc.lines)  # still generating
            final = list(responses)[-1]
        assert final.is_final and not final.HasField("error"), final
        assert proc.exit_code(timeout=60) == 0


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lumen_vlm", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_config_errors_exit_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("services:\n  vlm:\n    models:\n      fastvlm:\n        model: x\n        runtime: torch\n")
    result = run_cli("--config", str(config))
    assert result.returncode == 2
    assert "services.vlm.models.fastvlm.runtime" in result.stderr


def test_the_seed_configs_unknown_model_exits_2_listing_known_names(tmp_path: Path) -> None:
    config = tmp_path / "seed.yaml"
    config.write_text(
        f'cache_dir: "{tmp_path / "cache"}"\n'
        'services:\n  vlm:\n    models:\n      fastvlm:\n        model: "fastvlm-2b"\n        runtime: "onnx"\n'
        '    backend_settings:\n      device: "cpu"\n      max_new_tokens: 512\n'
    )
    result = run_cli("--config", str(config))
    assert result.returncode == 2
    assert "fastvlm-2b" in result.stderr and "fastvlm-0.5b" in result.stderr


def test_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("lumen-vlm ")


@pytest.mark.parametrize("args", [[], ["--port", "50051"]])
def test_the_seed_command_without_a_config_prints_its_usage_and_exits_2(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lumen_vlm.server", *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "usage: python -m lumen_vlm.server CONFIG.yaml [PORT]" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_server_module_leaves_the_command_line_to_the_cli() -> None:
    """server.py imports cli.py only where it runs as the program (`python -m lumen_vlm.server`):
    the module the CLI imports never imports the CLI back."""
    tree = ast.parse(Path(server_module.__file__).read_text(encoding="utf-8"))
    guards = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    guarded = {id(inner) for guard in guards for inner in ast.walk(guard)}
    cli_imports = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "cli"
    ]
    assert cli_imports, "the program form delegates to the CLI"
    assert all(id(node) in guarded for node in cli_imports), [ast.unparse(node) for node in cli_imports]


@pytest.mark.parametrize("source", ["--model", "--config"])
def test_describe_prints_the_answer(tmp_path: Path, source: str) -> None:
    # describe uses the model's own resize rule, crop for the tiny model: the crop golden.
    cases = json.loads((GOLDEN / "golden.json").read_text())["cases"]
    golden = next(case for case in cases if case["resize_mode"] == "crop")
    model = str(TINY_MODEL) if source == "--model" else str(write_config(tmp_path / "config.yaml", free_port()))
    result = run_cli(
        "describe",
        str(GOLDEN / golden["image"]),
        "--prompt",
        golden["messages"][0]["content"],
        source,
        model,
        "--max-new-tokens",
        str(golden["max_new_tokens"]),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == golden["text"] + "\n"


def test_describe_refuses_a_bad_image(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    result = run_cli("describe", str(bad), "--model", str(TINY_MODEL))
    assert result.returncode == 1
    assert "unsupported image format" in result.stderr


def test_mdns_announces_while_serving_and_withdraws_on_shutdown(tmp_path: Path) -> None:
    from zeroconf import Zeroconf

    from lumen_vlm import __version__

    port = free_port()
    config = write_config(tmp_path / "config.yaml", port)
    data = yaml.safe_load(config.read_text())
    data["server"]["mdns"] = {"enabled": True, "service_name": "lumen-vlm-test"}
    config.write_text(yaml.safe_dump(data))
    name = "lumen-vlm-test._lumen._tcp.local."
    with serving([sys.executable, "-m", "lumen_vlm", "--config", str(config)], port) as proc:
        browser = Zeroconf(interfaces=["127.0.0.1"])
        try:
            info = browser.get_service_info("_lumen._tcp.local.", name, timeout=10_000)
        finally:
            browser.close()
        assert info is not None, "".join(proc.lines)
        assert info.port == port
        assert info.properties[b"status"] == b"ready"
        assert info.properties[b"version"] == __version__.encode()
        assert len(info.properties[b"uuid"]) >= 8
        assert proc.stop() == 0
        browser = Zeroconf(interfaces=["127.0.0.1"])
        try:
            assert browser.get_service_info("_lumen._tcp.local.", name, timeout=2_000) is None
        finally:
            browser.close()


def test_cli_port_and_host_override_the_config_and_sigint_stops_with_0(tmp_path: Path) -> None:
    config_port, cli_port = free_port(), free_port()
    config = write_config(tmp_path / "config.yaml", config_port)
    data = yaml.safe_load(config.read_text())
    data["server"]["host"] = "0.0.0.0"
    config.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "lumen_vlm", "--config", str(config), "--port", str(cli_port)]
    with serving([*command, "--host", "127.0.0.1", "--log-level", "DEBUG"], cli_port) as proc:
        assert any("DEBUG" in line for line in proc.lines)
        with grpc.insecure_channel(f"127.0.0.1:{cli_port}") as channel:
            ml_service_pb2_grpc.InferenceStub(channel).Health(empty_pb2.Empty(), timeout=10)
        proc.process.send_signal(signal.SIGINT)
        assert proc.exit_code(timeout=60) == 0


def assert_clear_bind_error(result: subprocess.CompletedProcess[str], address: str, reason: str) -> None:
    """Exit 2 like any config error, with our words only: no traceback, no grpc log line."""
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on {address}: {reason}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "add_port" not in result.stderr and "Failed to add port" not in result.stderr, result.stderr


def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("--config", str(write_config(tmp_path / "config.yaml", port)))
    assert_clear_bind_error(result, f"127.0.0.1:{port}", f"port {port} is already in use")
    assert "--port" in result.stderr


def test_a_second_server_on_a_serving_port_exits_2_and_the_first_keeps_serving(tmp_path: Path) -> None:
    """grpc's default SO_REUSEPORT would let the second bind too and take a share of the connections."""
    port = free_port()
    config = write_config(tmp_path / "config.yaml", port)
    with serving([sys.executable, "-m", "lumen_vlm", "--config", str(config)], port) as first:
        second = run_cli("--config", str(config))
        assert_clear_bind_error(second, f"127.0.0.1:{port}", f"port {port} is already in use")
        assert "loading" not in second.stderr, "the second server stopped before loading the model"
        # Each new channel is a new connection: with a shared port some would reach the second.
        for _ in range(8):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING
        assert first.process.poll() is None
        assert first.stop() == 0


class NotThisMachinesAddress(socket.socket):
    """A socket whose bind fails as binding an address this machine does not have does."""

    def bind(self, address: object) -> None:
        raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))


def test_a_host_that_is_not_local_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests bind loopback addresses only, so the kernel's answer for another address is played."""
    from lumen_vlm.server import explain_bind_failure

    monkeypatch.setattr(socket, "socket", NotThisMachinesAddress)
    message = explain_bind_failure("192.0.2.1", 50051)
    assert message.startswith("192.0.2.1 is not an address of this machine")
    assert "127.0.0.1" in message and "--host" in message and "server.host" in message


@pytest.mark.parametrize(
    "change, key, message",
    [
        ({"device": "cuda"}, "services.vlm.backend_settings.device", "CUDAExecutionProvider"),
        ({"model": "."}, "services.vlm.models.fastvlm", "not a FastVLM model directory"),
    ],
)
def test_unloadable_settings_exit_2_before_loading(tmp_path: Path, change: dict, key: str, message: str) -> None:
    config = write_config(tmp_path / "config.yaml", free_port())
    data = yaml.safe_load(config.read_text())
    vlm = data["services"]["vlm"]
    if "device" in change:
        vlm["backend_settings"]["device"] = change["device"]
    else:
        model = vlm["models"]["fastvlm"]
        model.update({k: (str(tmp_path) if v == "." else v) for k, v in change.items()})
    config.write_text(yaml.safe_dump(data))
    result = run_cli("--config", str(config))
    assert result.returncode == 2, result.stderr
    assert key in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
    assert "port" not in result.stderr.split(key)[0], "nothing was started before the error"
