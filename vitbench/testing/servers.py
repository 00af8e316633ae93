"""Real servers on loopback for the remote-data tests: a threaded HTTP file server that honours Range (or, like
Python's own http.server, ignores it), with faults injected on request (503s with Retry-After, bodies cut
mid-transfer, a stall, redirects to another origin), a small stand-in for the Hub's API, moto's S3 server and
gcp-storage-emulator's GCS server."""

from __future__ import annotations

import http.server
import json
import re
import socketserver
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Threaded(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # a client that hangs up (a cut or stalled response it gave up on) is part of the tests


class FileServer:
    """Serves ROOT's files at http://127.0.0.1:PORT/PREFIX/<name>. FAULTS: a list the server pops one entry from
    per request of a path matching `fault_on` (a regex): "503" (with Retry-After: 0), "cut" (half the body,
    then the connection closes), "stall" (a third of the body, then silence for `stall_s`), "trickle" (the body
    in eight pieces, `stall_s` / 3 apart), None (served normally).
    REDIRECT_TO: another server's base URL every file request is sent to with a 302. HUB_SHA: answer the Hub
    API's dataset_info for any repo with this commit."""

    def __init__(self, root: Path, *, prefix: str = "", honour_range: bool = True, redirect_to: str | None = None,
                 hub_sha: str | None = None, stall_s: float = 5.0):
        self.root, self.prefix, self.honour_range = Path(root), prefix.strip("/"), honour_range
        self.redirect_to, self.hub_sha, self.stall_s = redirect_to, hub_sha, stall_s
        self.faults: list = []
        self.fault_on = r"\.tar$"
        self.requests: list[dict] = []  # path, range, authorization, status of every request
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server._handle(self)

        self.httpd = _Threaded(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}" + (f"/{self.prefix}" if self.prefix else "")
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _record(self, h, status: int) -> None:
        with self.lock:
            self.requests.append({"path": h.path, "range": h.headers.get("Range"),
                                  "authorization": h.headers.get("Authorization"), "status": status})

    def _send(self, h, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self._record(h, status)
        h.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def _handle(self, h) -> None:
        path = unquote(urlsplit(h.path).path)
        if self.hub_sha and (m := re.match(r"^/api/datasets/([^/]+/[^/]+)(?:/revision/(.+))?$", path)):
            body = json.dumps({"id": m.group(1), "_id": "x", "sha": self.hub_sha, "private": False,
                               "downloads": 0, "likes": 0, "tags": []}).encode()
            return self._send(h, 200, body, {"Content-Type": "application/json"})
        if self.redirect_to:  # the Hub's resolve/<revision>/<file> -> its CDN
            rest = re.sub(r"^/datasets/[^/]+/[^/]+/resolve/[^/]+/", "/", h.path)
            return self._send(h, 302, headers={"Location": f"{self.redirect_to}{rest}"})
        rel = path.lstrip("/")
        if self.prefix:
            if not rel.startswith(self.prefix + "/"):
                return self._send(h, 404)
            rel = rel[len(self.prefix) + 1:]
        file = (self.root / rel).resolve()
        if self.root.resolve() not in file.parents or not file.is_file():
            return self._send(h, 404)
        fault = None
        with self.lock:
            if self.faults and re.search(self.fault_on, path):
                fault = self.faults.pop(0)
        if fault == "503":
            return self._send(h, 503, b"busy", {"Retry-After": "0"})
        data = file.read_bytes()
        start, status, headers = 0, 200, {}
        m = re.match(r"bytes=(\d+)-$", h.headers.get("Range") or "")
        if m and self.honour_range:
            start, status = int(m.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        self._record(h, status)
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if fault == "cut":
            h.wfile.write(body[:len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        if fault == "trickle":  # slow but moving: a piece every stall_s / 3
            for i in range(8):
                h.wfile.write(body[i * len(body) // 8:(i + 1) * len(body) // 8])
                h.wfile.flush()
                time.sleep(self.stall_s / 3)
            return
        if fault == "stall":
            h.wfile.write(body[:len(body) // 3])
            h.wfile.flush()
            time.sleep(self.stall_s)
            h.close_connection = True
            return
        h.wfile.write(body)


class S3Server:
    """moto's S3 server on loopback with bucket BUCKET holding ROOT's files under PREFIX/; ENV: what a process
    needs to reach it (endpoint and dummy credentials, the standard AWS variables)."""

    def __init__(self, root: Path, bucket: str = "shards", prefix: str = "demo"):
        import boto3
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.env = {"AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        client = boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL_S3"], aws_access_key_id="test",
                              aws_secret_access_key="test", region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        for f in sorted(Path(root).iterdir()):
            if f.is_file():
                client.put_object(Bucket=bucket, Key=f"{prefix}/{f.name}", Body=f.read_bytes())
        self.url = f"s3://{bucket}/{prefix}"

    def close(self) -> None:
        self.server.stop()


class GcsServer:
    """gcp-storage-emulator (a GCS server: JSON and XML APIs) on loopback, bucket BUCKET holding ROOT's files under
    PREFIX/; ENV: STORAGE_EMULATOR_HOST, as Google's clients read it."""

    def __init__(self, root: Path, bucket: str = "shards", prefix: str = "demo"):
        import requests
        from gcp_storage_emulator.server import create_server

        from vitbench.runinfo import free_port

        port = free_port()
        self.server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
        self.server.start()
        host = f"http://127.0.0.1:{port}"
        self.env = {"STORAGE_EMULATOR_HOST": host}
        for f in sorted(Path(root).iterdir()):
            if f.is_file():
                requests.put(f"{host}/{bucket}/{prefix}/{f.name}", data=f.read_bytes(), timeout=30).raise_for_status()
        self.url = f"gs://{bucket}/{prefix}"

    def close(self) -> None:
        self.server.stop()
