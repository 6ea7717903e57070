"""The HTTP front door: the Ollama and OpenAI APIs, Prometheus metrics and a page to try the
model in a browser, on uvicorn, beside the gRPC server and over the same engine.

`HttpFrontDoor` binds its port at once (so a bad port is a start-up error, as gRPC's is) and
serves on an event loop in a thread of its own: a slow HTTP body never delays a gRPC health
check. Until `install`, every API call is answered 503 "the model is still loading".
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import TYPE_CHECKING

import uvicorn

from ...resources.settings import VLMSettings
from .app import build_app
from .common import Served

if TYPE_CHECKING:
    from ...fastvlm.fastvlm_service import FastVLMService

__all__ = ["HttpFrontDoor", "build_app", "listen_socket"]

log = logging.getLogger(__name__)


class HttpFrontDoor:
    def __init__(self, settings: VLMSettings, sock: socket.socket) -> None:
        """`sock`: bound and listening (`listen_socket`)."""
        http = settings.server.http
        assert http is not None, "HttpFrontDoor needs server.http"
        self.served = Served(settings, http)
        self._socket = sock
        self.host, self.port = sock.getsockname()[:2]
        config = uvicorn.Config(
            build_app(self.served),
            log_config=None,  # our logging, not uvicorn's own handlers
            access_log=False,
            lifespan="off",
            # Open connections at once; beyond it uvicorn answers 503 (the gRPC side's max_streams).
            limit_concurrency=settings.admission.max_streams,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._server.serve(sockets=[self._socket]))

    def start(self) -> None:
        self._thread.start()

    def install(self, service: FastVLMService) -> None:
        self.served.service = service
        log.info("HTTP (Ollama and OpenAI APIs, /metrics, the page at /) on http://%s:%d", self.host, self.port)

    def close(self, timeout: float = 3.0) -> None:
        """Stop serving: open streams end, the port closes."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()
        self._socket.close()


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (OSError as the bind failed)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # socket says it is TCP. Without it Nagle holds each streamed token behind the client's
    # delayed ACK (some 40 ms), and a stream's lines arrive in one burst.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(512)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
