"""Fault injection between a client and the real S3 server: an HTTP proxy that forwards every request to
the stack's versitygw unchanged (the signature covers the Host header, which it keeps), and on demand
answers 503 Slow Down or stalls before answering. It fakes nothing: every request it lets through is
served by the real server, so Delta tables written through it are real tables.

It runs in a process of its own (`python -m ingest_tests.s3_faults <upstream>`): delta-rs holds the GIL in
some calls, so a proxy thread inside the test process could not answer while the client waits. The test
steers it through `/__faults__` requests (`FaultProxy.configure`, `FaultProxy.seen`)."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

CONTROL = "/__faults__"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "content-length", "expect"}  # the body is re-sent whole, with its own length
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass
class Seen:
    method: str
    path: str
    status: int  # 0: the client had gone before the answer


# ---------------------------------------------------------------- the test's handle
@dataclass
class FaultProxy:
    upstream: str  # http://127.0.0.1:9000
    endpoint: str = ""
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> FaultProxy:
        self._proc = subprocess.Popen([sys.executable, "-m", "ingest_tests.s3_faults", self.upstream],
                                      stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        self.endpoint = self._proc.stdout.readline().strip()
        assert self.endpoint.startswith("http://"), "the fault proxy did not start"
        return self

    def _control(self, **query: Any) -> Any:
        url = self.endpoint + CONTROL + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def configure(self, fail_next: int = 0, always_503: bool = False, delay_seconds: float = 0.0,
                  clear: bool = False) -> None:
        """`fail_next`: answer the next N requests with 503; `always_503`; `delay_seconds` before each answer."""
        self._control(fail_next=fail_next, always_503=int(always_503), delay_seconds=delay_seconds, clear=int(clear))

    def seen(self) -> list[Seen]:
        return [Seen(**s) for s in self._control()]

    def attempts(self, path: str, method: str | None = None) -> int:
        return sum(1 for s in self.seen() if s.path.split("?")[0] == path.split("?")[0]
                   and (method is None or s.method == method))

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)


# ---------------------------------------------------------------- the proxy process
class _State:
    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.fail_next, self.always_503, self.delay = 0, False, 0.0
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def fault(self) -> bool:
        with self.lock:
            if self.always_503:
                return True
            if self.fail_next > 0:
                self.fail_next -= 1
                return True
        return False


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: object) -> None:
            return None

        def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]] = (), length: str | None = None) -> None:
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", length or str(len(body)))  # HEAD: the object's length
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _control(self) -> None:
            query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
            with state.lock:
                if query:
                    state.fail_next = int(query.get("fail_next", 0))
                    state.always_503 = query.get("always_503") == "1"
                    state.delay = float(query.get("delay_seconds", 0))
                    if query.get("clear") == "1":
                        state.seen.clear()
                seen = list(state.seen)
            self._reply(200, json.dumps(seen).encode(), [("Content-Type", "application/json")])

        def _handle(self) -> None:
            if self.path.startswith(CONTROL):
                return self._control()
            body = self._body()
            seen: dict[str, Any] = {"method": self.command, "path": self.path, "status": 0}  # 0: no answer sent
            with state.lock:
                state.seen.append(seen)  # counted on arrival: a client that timed out has still tried
            failing = state.fault()
            if state.delay:
                time.sleep(state.delay)
            try:
                if failing:
                    self._reply(503, SLOW_DOWN, [("Content-Type", "application/xml")])
                    seen["status"] = 503
                else:
                    seen["status"] = self._forward(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up waiting
            return None

        def _forward(self, body: bytes) -> int:
            conn = http.client.HTTPConnection(state.upstream.hostname, state.upstream.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"date", "server"}]
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self._reply(response.status, data, kept, length)
                return response.status
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle  # noqa: N815 - http.server's names

    return Handler


def main(upstream: str) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(_State(upstream)))
    server.daemon_threads = True
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1])
