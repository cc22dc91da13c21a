"""Loopback (127.0.0.1) servers for tests that would touch the internet in real use.

- ``HubServer``: a minimal Hugging Face-style hub serving one folder as a model repository (the model-info API,
  HEAD/GET ``resolve`` URLs with ETag, commit and Range support), for ``huggingface_hub`` with ``endpoint=``.
- ``StallingIndex``: a PEP 503 "simple" package index whose wheel downloads send a few bytes and then hang,
  so a test can cancel pip in the middle of an install.
- ``closed_port()``: a loopback port nothing listens on (an unreachable index).
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class _Server:
    def __init__(self, handler) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)


class HubServer(_Server):
    """Serves ``folder`` as the repository ``repo_id`` at commit ``COMMIT``."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, folder: Path, repo_id: str = "portrait3d/test-model") -> None:
        self.folder = Path(folder)
        self.repo_id = repo_id
        self.files = sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())
        self.fail: set[str] = set()  # files answered with 404 (a broken mirror), to test resuming
        server = self

        class Handler(_Quiet):
            def _route(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                server.requests.append(f"{self.command} {path}")
                api = f"/api/models/{server.repo_id}"
                if path == api or path.startswith(api + "/revision/"):
                    siblings = [{"rfilename": f, "size": (server.folder / f).stat().st_size} for f in server.files]
                    body = json.dumps({"id": server.repo_id, "modelId": server.repo_id, "sha": server.COMMIT,
                                       "siblings": siblings, "private": False}).encode()
                    return self._send(200, body, {"Content-Type": "application/json"}, head)
                if path.startswith("/api/models/"):
                    return self._send(404, b'{"error": "Repository not found"}',
                                      {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"}, head)
                prefix = f"/{server.repo_id}/resolve/"
                if path.startswith(prefix):
                    _rev, _, name = path[len(prefix):].partition("/")
                    if name not in server.files or name in server.fail:
                        return self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"}, head)
                    data = (server.folder / name).read_bytes()
                    headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": server.COMMIT,
                               "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
                    start = 0
                    rng = self.headers.get("Range")
                    if rng and rng.startswith("bytes="):
                        start = int(rng[len("bytes="):].split("-")[0] or 0)
                    body = data[start:]
                    headers["Content-Length"] = str(len(body))
                    if start:
                        headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    return self._send(206 if start else 200, body, headers, head)
                return self._send(404, b"not found", {}, head)

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        super().__init__(Handler)


class StallingIndex(_Server):
    """A simple index offering ``wheel`` whose download stalls after a few bytes (until the server closes)."""

    def __init__(self, wheel: Path) -> None:
        self.wheel = Path(wheel)
        self.download_started = threading.Event()
        self._stop = threading.Event()
        server = self
        project = self.wheel.name.split("-")[0].replace("_", "-").lower()

        class Handler(_Quiet):
            def do_GET(self):
                path = unquote(urlparse(self.path).path).rstrip("/")
                server.requests.append(f"GET {path}")
                if path == f"/simple/{project}":
                    body = (f'<html><body><a href="/files/{server.wheel.name}">{server.wheel.name}</a>'
                            f"</body></html>").encode()
                    return self._send(200, body, {"Content-Type": "text/html"})
                if path == f"/files/{server.wheel.name}":
                    data = server.wheel.read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data) + 10_000_000))
                    self.end_headers()
                    self.wfile.write(data[:10])
                    self.wfile.flush()
                    server.download_started.set()
                    server._stop.wait(120)  # hang: pip sits in the middle of the download
                    return
                return self._send(404, b"not found")

        super().__init__(Handler)

    def close(self) -> None:
        self._stop.set()
        super().close()


def closed_port() -> int:
    """A loopback port with no listener (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False
