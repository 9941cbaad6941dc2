"""An HTTP relay in front of an S3 emulator (moto) that misbehaves on request.

    s3_relay.py LISTEN_PORT TARGET_PORT [--forget-conditions]

--forget-conditions drops `If-None-Match` from every request, as an S3-compatible store that
ignores conditional requests would. Faults are asked for while it runs, by
`POST /__faults__?lose_commits=N&fail=N`:

- lose_commits=N: the next N puts of a Delta log entry (`_delta_log/….json`, past version 0: a
  table's creation is not what is tested) reach the store, but their answer is lost (the
  connection closes before any reply), as when a network drops the response of a request that
  succeeded;
- fail=N: the next N requests are answered `503 SlowDown` without reaching the store.

`GET /__faults__` answers with how many of each are still pending and how many were injected.
"""
import http.client
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

listen, target = int(sys.argv[1]), int(sys.argv[2])
forget = "--forget-conditions" in sys.argv[3:]
lock = threading.Lock()
pending = {"lose_commits": 0, "fail": 0}
injected = {"lose_commits": 0, "fail": 0}
upstreams = threading.local()


def take(kind):
    with lock:
        if pending[kind] > 0:
            pending[kind] -= 1
            injected[kind] += 1
            return True
        return False


class Relay(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def control(self):
        if self.command == "POST":
            with lock:
                for k, v in parse_qs(urlparse(self.path).query).items():
                    pending[k] += int(v[0])
        with lock:
            body = f"pending={pending} injected={injected}".encode()
        self.reply(200, [], body)

    def reply(self, status, headers, data):
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("transfer-encoding", "connection"):
                self.send_header(k, v)
        if not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has headers only, whatever its length says
            self.wfile.write(data)

    def forward(self, body, headers):
        """The request sent to the store on this thread's own keep-alive connection."""
        for attempt in (1, 2):
            conn = getattr(upstreams, "conn", None)
            if conn is None:
                conn = upstreams.conn = http.client.HTTPConnection("127.0.0.1", target, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                return r.status, r.getheaders(), r.read()
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                upstreams.conn = None
                if attempt == 2:
                    raise

    def relay(self):
        if self.path.startswith("/__faults__"):
            return self.control()
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        if take("fail"):
            reply = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
            return self.reply(503, [], reply)
        drop = ("host",) + (("if-none-match",) if forget else ())
        headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
        started = time.monotonic()
        status, answer_headers, data = self.forward(body, headers)
        took = time.monotonic() - started
        if took > 2:
            print(f"slow store answer: {self.command} {self.path} {status} in {took:.1f} s", flush=True)
        if self.command == "PUT" and "/_delta_log/" in self.path and self.path.endswith(".json") \
                and not self.path.endswith("/00000000000000000000.json") \
                and status < 300 and take("lose_commits"):
            self.close_connection = True
            return
        self.reply(status, answer_headers, data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # walden opens many connections at once; 5 would refuse some

    def handle_error(self, request, client_address):
        print(f"request from {client_address} failed: {sys.exc_info()[1]!r}", flush=True)


Server(("127.0.0.1", listen), Relay).serve_forever()
