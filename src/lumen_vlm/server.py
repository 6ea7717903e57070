"""The server process: config, gRPC server, health, reflection, mDNS, signals.

    python -m lumen_vlm.server config.yaml [PORT]

The port starts listening before the model is loaded, with both health services saying
NOT_SERVING and every request answered UNAVAILABLE; once the model is ready the real service
takes over and health turns SERVING. On SIGINT/SIGTERM it stops admitting requests, lets
in-flight generations finish within the grace period, cancels the rest and exits 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import __version__
from .proto import ml_service_pb2, ml_service_pb2_grpc
from .resources.settings import VLMSettings

log = logging.getLogger("lumen_vlm.server")

INFERENCE_SERVICE = ml_service_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


class SwitchableInference(ml_service_pb2_grpc.InferenceServicer):
    """Answers UNAVAILABLE until the real service is installed, then delegates to it."""

    def __init__(self) -> None:
        self._service: Any = None

    def install(self, service: Any) -> None:
        self._service = service

    def _not_ready(self, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")

    def Infer(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        if self._service is None:
            yield from self._loading_answers(request_iterator)
            return
        yield from self._service.Infer(request_iterator, context)

    @staticmethod
    def _loading_answers(request_iterator: Iterator[Any]) -> Iterator[Any]:
        for request in request_iterator:
            if request.total > 1 and request.seq + 1 < request.total:
                continue  # one answer per request, after its last chunk
            yield ml_service_pb2.InferResponse(
                correlation_id=request.correlation_id,
                is_final=True,
                error=ml_service_pb2.Error(
                    code=ml_service_pb2.ERROR_CODE_UNAVAILABLE, message="the model is still loading"
                ),
            )

    def GetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self._service is None:
            self._not_ready(context)
        return self._service.GetCapabilities(request, context)

    def StreamCapabilities(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        if self._service is None:
            self._not_ready(context)
        yield from self._service.StreamCapabilities(request, context)

    def Health(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self._service is None:
            self._not_ready(context)
        return self._service.Health(request, context)


class VLMServer:
    """One gRPC server with the Inference, health and reflection services."""

    def __init__(self, settings: VLMSettings) -> None:
        self.settings = settings
        from .fastvlm.fastvlm_service import server_options, server_thread_pool_size

        # Queued requests wait inside a worker thread: the pool leaves room for health checks.
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=server_thread_pool_size(settings), thread_name_prefix="grpc"),
            options=server_options(settings),
        )
        self.inference = SwitchableInference()
        self.health = health.HealthServicer()
        ml_service_pb2_grpc.add_InferenceServicer_to_server(self.inference, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{settings.server.host}:{settings.server.port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self.service: Any = None
        self._mdns: Any = None

    @property
    def address(self) -> str:
        return f"{self.settings.server.host}:{self.port}"

    def _set_health(self, status: Any) -> None:
        for name in ("", INFERENCE_SERVICE):
            self.health.set(name, status)

    def start(self) -> None:
        self.server.start()

    def install(self, service: Any) -> None:
        """The model is ready: serve it."""
        self.service = service
        self.inference.install(service)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.settings.server.mdns.enabled:
            self._mdns = advertise_mdns(self.settings, self.port)
        log.info("listening on %s", self.address)

    def shutdown(self) -> None:
        """Stop admitting, let in-flight work finish within the grace period, cancel the rest."""
        grace = self.settings.admission.shutdown_grace_s
        log.info("shutting down: in-flight generations have %.0f s to finish", grace)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._mdns is not None:
            self._mdns.close()
        if self.service is not None:
            self.service.begin_shutdown()
            if not self.service.wait_idle(grace):
                log.warning("grace period over: cancelling the generations still running")
                self.service.cancel_all()
                self.service.wait_idle(5.0)
        self.server.stop(grace=2.0).wait(10.0)
        if self.service is not None:
            self.service.close()
        log.info("stopped")


class MdnsAdvertisement:
    """A `_lumen._tcp.local.` record, withdrawn by close()."""

    def __init__(self, zeroconf: Any, info: Any) -> None:
        self._zeroconf, self._info = zeroconf, info

    def close(self) -> None:
        try:
            self._zeroconf.unregister_service(self._info)
        finally:
            self._zeroconf.close()


def _advertised_addresses(host: str) -> list[str]:
    """The IPv4 addresses to announce: the bound one, or every non-loopback one for a wildcard."""
    if host not in ("0.0.0.0", "::", "[::]", ""):
        return [host]
    import ifaddr

    addresses = [
        ip.ip
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if ip.is_IPv4 and not str(ip.ip).startswith("127.")
    ]
    return addresses or ["127.0.0.1"]


def advertise_mdns(settings: VLMSettings, port: int) -> MdnsAdvertisement | None:
    """Announce the service on the local network; failure to announce is logged, not fatal."""
    import socket
    import uuid

    from zeroconf import ServiceInfo, Zeroconf

    mdns = settings.server.mdns
    service_type = "_lumen._tcp.local."
    properties = {"uuid": mdns.uuid or str(uuid.uuid4()), "status": "ready", "version": __version__}
    addresses = _advertised_addresses(settings.server.host)
    try:
        # Announce only on the interfaces the server listens on.
        wildcard = settings.server.host in ("0.0.0.0", "::", "[::]", "")
        zeroconf = Zeroconf() if wildcard else Zeroconf(interfaces=addresses)
        info = ServiceInfo(
            service_type,
            f"{mdns.service_name}.{service_type}",
            port=port,
            properties=properties,
            server=f"{socket.gethostname().split('.')[0]}.local.",
            parsed_addresses=addresses,
        )
        zeroconf.register_service(info)
    except Exception as exc:  # network stacks fail in many ways; serving matters more
        log.warning("mDNS advertisement failed: %s", exc)
        return None
    log.info("advertised %s on mDNS (%s)", info.name, ", ".join(addresses))
    return MdnsAdvertisement(zeroconf, info)


def run(settings: VLMSettings, model_dir: Path) -> int:
    """Serve `model_dir` until SIGINT/SIGTERM; returns the process exit code."""
    from .fastvlm.fastvlm_service import FastVLMService

    server = VLMServer(settings)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        log.info("port %d open; loading %s (health NOT_SERVING until ready)", server.port, model_dir)
        server.install(FastVLMService.from_settings(settings, model_dir))
        stop.wait()
        server.shutdown()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def settings_with_overrides(settings: VLMSettings, host: str | None, port: int | None) -> VLMSettings:
    server = settings.server
    server = replace(
        server, host=host if host is not None else server.host, port=port if port is not None else server.port
    )
    return replace(settings, server=server)


def main(argv: list[str] | None = None) -> int:
    """`python -m lumen_vlm.server config.yaml [PORT]`, as the seed README runs it."""
    from .cli import serve_main

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: python -m lumen_vlm.server CONFIG.yaml [PORT]", file=sys.stderr)
        return 2
    cli_args = ["--config", args[0]]
    if len(args) > 1:
        cli_args += ["--port", args[1]]
    return serve_main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
