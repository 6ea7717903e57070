"""A Hugging Face hub on 127.0.0.1 serving one model directory, for the real huggingface_hub client.

It answers the few endpoints `snapshot_download` uses (model info, the file tree, file
downloads) and 404 with huggingface_hub's "repo not found" code for anything else. A test can
hold every request about a repo (this one or another) until it says so (`hold()` /
`release()`), to keep a download in flight.

Point a process at it with HF_ENDPOINT=hub.url (huggingface_hub reads it at import).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HOLD_LIMIT_S = 60.0  # a held request is answered after this at the latest, so no test can hang on it


class LoopbackHub:
    def __init__(self, repo: str, model_dir: Path) -> None:
        self.repo = repo
        self.files = {path.relative_to(model_dir).as_posix(): path for path in model_dir.rglob("*") if path.is_file()}
        self.reported_size: dict[str, int] = {}  # sizes to claim instead of the real ones
        self.requests: list[str] = []
        self.received = threading.Event()  # a model request has arrived
        self._released = threading.Event()
        self._released.set()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    # ------------------------------------------------------------------ answers

    def _size(self, name: str) -> int:
        return self.reported_size.get(name, self.files[name].stat().st_size)

    def _info(self) -> dict[str, Any]:
        siblings = [{"rfilename": name, "size": self._size(name)} for name in sorted(self.files)]
        return {"id": self.repo, "modelId": self.repo, "sha": COMMIT, "siblings": siblings}

    def _tree(self) -> list[dict[str, Any]]:
        directories = sorted({str(Path(name).parent) for name in self.files} - {"."})
        entries: list[dict[str, Any]] = [{"type": "directory", "path": d, "oid": COMMIT} for d in directories]
        for name in sorted(self.files):
            entries.append({"type": "file", "path": name, "size": self._size(name), "oid": _etag(self.files[name])})
        return entries

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer(body=True)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def _answer(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                models, resolve = f"/api/models/{hub.repo}", f"/{hub.repo}/resolve/{COMMIT}/"
                if path.startswith("/api/models/") or "/resolve/" in path:  # about any repo
                    hub.received.set()
                    hub._released.wait(HOLD_LIMIT_S)
                if path in (models, f"{models}/revision/main", f"{models}/revision/{COMMIT}"):
                    self._json(hub._info(), body)
                elif path.startswith(f"{models}/tree/{COMMIT}"):
                    self._json(hub._tree(), body)
                elif path.startswith(resolve) and path[len(resolve) :] in hub.files:
                    self._file(hub.files[path[len(resolve) :]], body)
                else:
                    self._send(404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})

            def _json(self, data: Any, body: bool) -> None:
                self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"}, body)

            def _file(self, file: Path, body: bool) -> None:
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_etag(file)}"'}
                self._send(200, file.read_bytes(), headers, body)

            def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool = True) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    # ------------------------------------------------------------------ lifetime

    def start(self) -> None:
        threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True).start()

    def stop(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()


def _etag(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@contextmanager
def loopback_hub(repo: str, model_dir: Path) -> Iterator[LoopbackHub]:
    hub = LoopbackHub(repo, model_dir)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()
