"""A small HTTP proxy in front of the test S3 server that misbehaves as real stores and networks do:
it answers 503 SlowDown to a share of requests, loses the reply to a write after the store has done
it, or plays a store that ignores conditional writes. Loopback only; it stops by itself after
`lifetime` seconds, so a failed test cannot leave it behind.

Requests pass through byte for byte (headers included), so their AWS signatures still verify.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class S3Proxy:
    def __init__(self, upstream_port: int, slow_down_every: int = 0, lose_reply_to: str = "",
                 ignore_conditions: bool = False, lifetime: float = 120.0):
        """slow_down_every: answer 503 SlowDown to every n-th request (0: never);
        lose_reply_to: forward the first PUT whose path ends so, then close without a reply;
        ignore_conditions: answer 200 to a PUT with If-None-Match or If-Match, storing nothing."""
        self.upstream_port = upstream_port
        self.slow_down_every, self.lose_reply_to, self.ignore_conditions = slow_down_every, lose_reply_to, ignore_conditions
        self.requests = self.slowed = self.lost = self.ignored = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                proxy._relay(self)

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def __enter__(self) -> S3Proxy:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def _relay(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        with self._lock:
            self.requests += 1
            slow = self.slow_down_every and self.requests % self.slow_down_every == 0
            lose = bool(self.lose_reply_to) and h.command == "PUT" and h.path.split("?")[0].endswith(self.lose_reply_to) and not self.lost
            conditional = h.command == "PUT" and ("If-None-Match" in h.headers or "If-Match" in h.headers)
            ignore = self.ignore_conditions and conditional
            self.slowed += bool(slow and not lose)
            self.lost += lose
            self.ignored += ignore
        if slow and not lose:
            return self._answer(h, 503, {"Content-Type": "application/xml"}, SLOW_DOWN)
        if ignore:
            return self._answer(h, 200, {"ETag": '"' + "1" * 32 + '"'}, b"")
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        upstream.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
        for name, value in h.headers.items():
            upstream.putheader(name, value)
        upstream.endheaders(body)
        reply = upstream.getresponse()
        data = reply.read()
        upstream.close()
        if lose:  # the store did the write; its reply never arrives
            h.close_connection = True
            return
        headers = {k: v for k, v in reply.getheaders() if k.lower() not in ("transfer-encoding", "content-length", "connection")}
        length = reply.getheader("Content-Length", "0") if h.command == "HEAD" else None
        self._answer(h, reply.status, headers, data, length)

    @staticmethod
    def _answer(h: BaseHTTPRequestHandler, status: int, headers: dict, data: bytes, head_length: str | None = None) -> None:
        """A reply; `head_length`: a HEAD's, whose Content-Length is the object's but which has no body."""
        h.send_response_only(status)
        for name, value in headers.items():
            h.send_header(name, value)
        h.send_header("Content-Length", head_length if head_length is not None else str(len(data)))
        h.end_headers()
        if head_length is None:
            h.wfile.write(data)
