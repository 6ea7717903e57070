"""The server process: config, gRPC server, health, reflection, mDNS, signals.

    python -m lumen_vlm.server config.yaml [PORT]    (the command line's: `cli.server_module_main`)

The port starts listening before the model is downloaded or loaded, with both health services
saying NOT_SERVING and every request answered UNAVAILABLE; once the model is ready the real
service takes over and health turns SERVING. On SIGINT/SIGTERM it stops admitting requests, lets
in-flight generations finish within the grace period, cancels the rest and exits 0.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import __version__
from .fastvlm.chunks import MAX_META_BYTES
from .proto import ml_service_pb2
from .resources.exceptions import CONFIG_ERROR_EXIT, ConfigError, ResourceError
from .resources.settings import HttpSettings, VLMSettings
from .transports.grpc_aio import INFERENCE_SERVICE, AsyncInference, keepalive_options
from .transports.http import HttpFrontDoor, listen_socket

if TYPE_CHECKING:
    from .fastvlm.fastvlm_service import FastVLMService

log = logging.getLogger("lumen_vlm.server")

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")  # bind every interface
# Shutdown after the grace period: how long cancelled generations get to reach their next
# decode step, then how long grpc gets to send the answers still queued before it ends every
# call. Together they keep the exit within about half a second of the grace period.
_CANCEL_WAIT_S = 0.3
_STOP_GRACE_S = 0.2


def server_options(settings: VLMSettings) -> list[tuple[str, int]]:
    """Message size limits that let a whole max_payload_bytes image arrive in one message
    (grpc's default is 4 MiB); the Go SDK chunks anything over 1 MiB anyway.

    SO_REUSEPORT is off: grpc turns it on by default on Linux, and then a second server started
    on a port that is already serving binds without error and takes a share of its connections.
    """
    limit = settings.limits.max_payload_bytes + MAX_META_BYTES
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
    ]


def server_thread_pool_size(service: FastVLMService, headroom: int = 32) -> int:
    """Workers a synchronous grpc server hosting `service` needs (the Lumen hub's kind; our
    asyncio server sizes its own pool, see `transports.grpc_aio`): one per running and waiting
    request (each waits on the engine in its worker), plus headroom for idle streams, health
    checks and capability calls."""
    return service.engine.max_concurrency + service.engine.max_queue + headroom


def server_max_concurrent_rpcs(service: FastVLMService) -> int:
    """grpc.server's maximum_concurrent_rpcs: one RPC per worker. grpc refuses the RPCs beyond
    it with RESOURCE_EXHAUSTED rather than queueing them where no deadline or log sees them."""
    return server_thread_pool_size(service)


class VLMServer:
    """One gRPC server with the Inference, health and reflection services.

    The server is grpc's asyncio server (see `transports.grpc_aio` for why), run on an
    event loop in a thread of its own, so that the process's main thread stays free for
    signals and every method here is an ordinary blocking call.
    """

    def __init__(self, settings: VLMSettings) -> None:
        self.settings = settings
        self.inference = AsyncInference(settings)
        self.service: Any = None
        self._mdns: Any = None
        self._stopped = False
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="grpc-aio", daemon=True)
        self._loop_thread.start()
        self.http: HttpFrontDoor | None = None
        try:
            self.port = self._on_loop(self._build())
            self.http = _http_front_door(settings)
        except BaseException:
            if hasattr(self, "server"):  # bound: the HTTP port failed after it
                self._on_loop(self.server.stop(0))
            self._stop_loop()
            raise

    async def _build(self) -> int:
        """The aio server, built on its loop, with every service; returns the bound port."""
        self.server = grpc.aio.server(options=server_options(self.settings) + keepalive_options())
        self.server.add_generic_rpc_handlers((self.inference.handler(),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server,
            pool=ml_service_pb2.DESCRIPTOR.pool,  # the pool our proto lives in: see proto/_pool.py
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        return bind(self.server, self.settings.server.host, self.settings.server.port)

    def _on_loop(self, coroutine: Any, timeout: float | None = 30.0) -> Any:
        """Run `coroutine` on the server's event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    @property
    def address(self) -> str:
        return f"{self.settings.server.host}:{self.port}"

    async def _set_health(self, status: Any) -> None:
        for name in ("", INFERENCE_SERVICE):
            await self.health.set(name, status)

    def start(self) -> None:
        self._on_loop(self.server.start())
        if self.http is not None:
            self.http.start()

    def install(self, service: Any) -> None:
        """The model is ready: serve it."""
        self.service = service
        self.inference.install(service)
        if self.http is not None:
            self.http.install(service)
        self._on_loop(self._set_health(health_pb2.HealthCheckResponse.SERVING))
        if self.settings.server.mdns.enabled:
            self._mdns = advertise_mdns(self.settings, self.port)
        log.info("listening on %s", self.address)

    def shutdown(self, forced: Callable[[], bool] = lambda: False) -> bool:
        """Stop admitting, let in-flight work finish within the grace period, cancel the rest.

        Returns within the grace period plus about half a second: True if every generation
        ended, False if one was still inside a model step when time ran out (the caller may
        then exit without waiting for it). `forced()` turning true (a second SIGINT/SIGTERM)
        cuts the grace period short.
        """
        if self._stopped:
            return True
        grace = self.settings.admission.shutdown_grace_s
        deadline = time.monotonic() + grace
        log.info("shutting down: in-flight generations have %g s to finish", grace)
        self._on_loop(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        self._withdraw_mdns()
        idle = True
        if self.service is not None:
            self.service.begin_shutdown()
            if not self._drain(deadline, forced):
                log.warning("grace period over: cancelling the generations still running")
                self.service.cancel_all()  # each stops at its next decode step
                idle = self.service.wait_idle(_CANCEL_WAIT_S)
        if not idle:  # a model step outlasts the wait: answer its request without it
            self._on_loop(self.inference.abandon_in_flight())
        # Calls still open (idle streams, answers not yet sent) end now.
        self._on_loop(self.server.stop(_STOP_GRACE_S))
        if self.http is not None:
            self.http.close()
        self.inference.close()
        if self.service is not None and idle:
            self.service.close(timeout=0)
        self._stop_loop()
        log.info("stopped" if idle else "stopped, with a generation still inside a model step")
        return idle

    def _drain(self, deadline: float, forced: Callable[[], bool]) -> bool:
        """Wait for in-flight generations; False when the grace period ran out or was cut short."""
        while (left := deadline - time.monotonic()) > 0:
            if self.service.wait_idle(min(ShutdownSignals.POLL_S, left)):
                return True
            if forced():
                return False
        return self.service.wait_idle(0)

    def _withdraw_mdns(self) -> None:
        if self._mdns is None:
            return
        try:
            self._mdns.close()
        except Exception as exc:  # withdrawing is best effort: shutting down matters more
            log.warning("mDNS withdrawal failed: %s", exc)
        self._mdns = None

    def close(self) -> None:
        """Release everything without draining (start-up failed)."""
        if self._stopped:
            return
        self._withdraw_mdns()
        self._on_loop(self.server.stop(0))
        if self.http is not None:
            self.http.close()
        self.inference.close()
        self._stop_loop()

    def _stop_loop(self) -> None:
        """Stop and close the event loop; the server is then stopped for good (a second
        shutdown() or close() does nothing)."""
        self._stopped = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(5.0)
        if not self._loop_thread.is_alive():
            self._loop.close()


def _http_front_door(settings: VLMSettings) -> HttpFrontDoor | None:
    """The HTTP front door, its port bound, when the config has server.http (or --http-port)."""
    http = settings.server.http
    if http is None:
        return None
    host = settings.server.http_host
    try:
        sock = listen_socket(host, http.port)
    except OSError as exc:
        reason = _BIND_ERRORS.get(exc.errno or 0, "{strerror}").format(host=host, port=http.port, strerror=exc.strerror)
        reason = reason.replace(_PORT_KEYS, _HTTP_PORT_KEYS).replace(_HOST_KEYS, _HTTP_HOST_KEYS)
        raise BindError(f"cannot listen for HTTP on {host}:{http.port}: {reason}") from None
    return HttpFrontDoor(settings, sock)


# What to change, and why a bind failed, by errno: said by `explain_bind_failure`.
_PORT_KEYS = "server.port in the config, or --port"
_HOST_KEYS = "server.host in the config, or --host"
_HTTP_PORT_KEYS = "server.http.port in the config, or --http-port"
_HTTP_HOST_KEYS = "server.http.host in the config"
_BIND_ERRORS = {
    errno.EADDRINUSE: "port {port} is already in use: another server (perhaps another lumen-vlm) listens on it. "
    f"Stop that one, or set another port ({_PORT_KEYS})",
    errno.EADDRNOTAVAIL: "{host} is not an address of this machine, so nothing can listen on it. Set one of its "
    f"own addresses, 127.0.0.1 for this machine only, or 0.0.0.0 for every interface ({_HOST_KEYS})",
    errno.EACCES: "this process may not listen on port {port} (ports below 1024 need privileges). Set a port "
    f"from 1024 up ({_PORT_KEYS})",
}


class BindError(ConfigError):
    """The configured host and port cannot be listened on; the message says why and what to change."""


def bind(server: Any, host: str, port: int) -> int:
    """Add `host:port` to the server; the bound port (the one chosen, for port 0).

    grpc reports any bind failure as a RuntimeError that says only that it failed, after its C
    core has logged the reason to stderr in its own format. That line is kept off the console
    (logged at DEBUG) and `explain_bind_failure` says the reason in words instead.
    """
    address = f"{host}:{port}"
    with _stderr_captured() as captured:
        try:
            bound: int | None = server.add_insecure_port(address)
        except RuntimeError:
            bound = None
    grpc_log = "".join(captured)
    if bound is not None:
        sys.stderr.write(grpc_log)  # nothing failed: whatever was written meanwhile is not lost
        return bound
    log.debug("grpc: %s", grpc_log.strip())
    raise BindError(f"cannot listen on {address}: {explain_bind_failure(host, port)}")


def explain_bind_failure(host: str, port: int) -> str:
    """Why `host:port` cannot be bound, and what to change; the one place that explains it.

    grpc does not say why, so the bind is tried again with a plain socket, for its errno.
    """
    if not 0 <= port <= 65535:
        return f"port {port} is out of range. Set a port from 1024 to 65535 ({_PORT_KEYS})"
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        reason = f"{host!r} is neither an address nor a host name this machine can resolve ({exc.strerror})"
        return f"{reason}. Set another ({_HOST_KEYS})"
    for family, kind, protocol, _, sockaddr in addresses:
        try:
            with socket.socket(family, kind, protocol) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does
                probe.bind(sockaddr)
        except OSError as exc:
            return _BIND_ERRORS.get(exc.errno, "{strerror}").format(host=host, port=port, strerror=exc.strerror)
    return "grpc could not bind it, though a plain socket can (--log-level DEBUG shows grpc's own message)"


@contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """What is written to file descriptor 2 meanwhile (C code writes there directly), in the
    list once the block is left."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as file:
        os.dup2(file.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            captured.append(file.read().decode("utf-8", errors="replace"))


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
    if host not in WILDCARD_HOSTS:
        return [host]
    import ifaddr

    addresses = [
        ip.ip
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if ip.is_IPv4 and not str(ip.ip).startswith("127.")
    ]
    return addresses or ["127.0.0.1"]


def node_uuid(settings: VLMSettings) -> str:
    """This installation's id for mDNS, made once and kept in the cache dir, so that the hub
    sees the same node after a restart."""
    path = settings.cache_dir / "lumen-vlm.uuid"
    try:
        return str(uuid.UUID(path.read_text().strip()))
    except (OSError, ValueError):
        pass
    value = str(uuid.uuid4())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    except OSError as exc:
        log.warning("cannot keep the mDNS uuid in %s (%s); it will change on restart", path, exc)
    return value


def advertise_mdns(settings: VLMSettings, port: int) -> MdnsAdvertisement | None:
    """Announce the service on the local network; failure to announce is logged, not fatal."""
    import socket

    from zeroconf import ServiceInfo, Zeroconf

    mdns = settings.server.mdns
    service_type = "_lumen._tcp.local."
    properties = {"uuid": node_uuid(settings), "status": "ready", "version": __version__}
    try:
        addresses = _advertised_addresses(settings.server.host)
        # Announce only on the interfaces the server listens on.
        wildcard = settings.server.host in WILDCARD_HOSTS
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


class ShutdownSignals:
    """Counts SIGINT/SIGTERM, and lets the main thread wait for the first one.

    Python runs a signal handler in the main thread, between any two of its bytecodes, and only
    once the main thread runs: a signal the kernel hands to one of grpc's or ORT's threads does
    not wake a main thread blocked on a lock. So the main thread never blocks without a timeout,
    and the handler takes no lock (an Event's set() could deadlock on the lock that the main
    thread's own Event.wait() holds at that moment): it only counts.
    """

    POLL_S = 0.05  # also how late the shutdown may start after the signal

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *_: Any) -> None:
        self.count += 1

    def wait_for_first(self) -> None:
        while self.count == 0:
            time.sleep(self.POLL_S)

    def forced(self) -> bool:
        """A second signal: stop waiting for the generations still running."""
        return self.count > 1


def run(settings: VLMSettings, fetch_model: Callable[[], Path]) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code.

    The port opens first, with health NOT_SERVING. Then `fetch_model` gives the model directory
    (downloading it first if needed, which may take minutes), and the model is loaded and served.
    A port that cannot be bound, or a ResourceError while fetching or loading, is logged and
    ends the process with CONFIG_ERROR_EXIT, the port closed. A signal during the download stops
    the process at once, with 0 (one while the model loads is acted on once it is loaded); a
    second signal during the drain cancels the generations still running.
    """
    from .fastvlm.fastvlm_service import FastVLMService

    signals = ShutdownSignals()
    try:
        server = VLMServer(settings)
    except BindError as exc:
        log.error("%s", exc)
        return CONFIG_ERROR_EXIT
    previous = {sig: signal.signal(sig, signals) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        log.info("port %d open (health NOT_SERVING until the model is ready)", server.port)
        try:
            model_dir = _wait_for_model(fetch_model, signals)
            if model_dir is None:
                server.close()
                _exit_during_download()
            log.info("loading %s", model_dir)
            server.install(FastVLMService.from_settings(settings, model_dir))
        except ResourceError as exc:
            log.error("%s", exc)
            server.close()
            return CONFIG_ERROR_EXIT
        except BaseException:
            server.close()
            raise
        signals.wait_for_first()
        if not server.shutdown(signals.forced):
            _exit_now("a generation was still inside a model step")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_for_model(fetch_model: Callable[[], Path], signals: ShutdownSignals) -> Path | None:
    """`fetch_model()`, run in a thread so that a signal ends the wait; None if a signal came first.

    The main thread must stay free to notice signals (see ShutdownSignals) while a download
    runs, which may take minutes. What `fetch_model` raises is raised here.
    """
    outcome: list[Path | BaseException] = []

    def fetch() -> None:
        try:
            outcome.append(fetch_model())
        except BaseException as exc:
            outcome.append(exc)

    # A daemon: a signal during a download leaves it behind.
    fetcher = threading.Thread(target=fetch, name="model-fetch", daemon=True)
    fetcher.start()
    while fetcher.is_alive() and signals.count == 0:
        fetcher.join(ShutdownSignals.POLL_S)
    if not outcome:
        return None
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _exit_during_download() -> NoReturn:
    """Stop now, with 0, leaving the download thread behind.

    A normal exit would wait for it: huggingface_hub downloads in a thread pool, whose threads
    Python joins at exit, so the whole download would finish first. What it leaves resumes on
    the next start (the loader's marker vouches for nothing unfinished).
    """
    log.info("stopped before the model was ready")
    _exit_now("")


def _exit_now(why: str) -> NoReturn:
    """Exit with 0 at once, without joining worker threads (Python joins them at a normal exit).

    Used where waiting would overrun a promise: the grace period at shutdown (a model step
    cannot be interrupted), or a download that would otherwise run to its end.
    """
    if why:
        log.info("exiting without waiting: %s", why)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def settings_with_overrides(
    settings: VLMSettings, host: str | None, port: int | None, http_port: int | None = None
) -> VLMSettings:
    """The command line's --host, --port and --http-port over the config's (--http-port turns
    HTTP on with server.http's defaults where the config has no server.http)."""
    server = settings.server
    server = replace(
        server, host=host if host is not None else server.host, port=port if port is not None else server.port
    )
    if http_port is not None:
        server = replace(server, http=replace(server.http or HttpSettings(), port=http_port))
    return replace(settings, server=server)


if __name__ == "__main__":
    # `python -m lumen_vlm.server CONFIG [PORT]` is the command line's to read. Only this copy,
    # run as the program, imports it; the module `lumen_vlm.server`, which the CLI imports, never does.
    from .cli import server_module_main

    sys.exit(server_module_main())
