"""An HTTP relay in front of an S3 emulator (moto) that misbehaves on request.

    s3_relay.py LISTEN_PORT TARGET_PORT [--forget-conditions]

--forget-conditions drops `If-None-Match` from every request, as an S3-compatible store that
ignores conditional requests would. Faults are asked for while it runs, by
`POST /__faults__?lose_commits=N&fail=N`:

- lose_commits=N: the next N puts of a Delta log entry (`_delta_log/….json`) reach the store, but
  their answer is lost (the connection closes before any reply), as when a network drops the
  response of a request that succeeded;
- fail=N: the next N requests are answered `503 SlowDown` without reaching the store.

`GET /__faults__` answers with how many of each are still pending and how many were injected.
"""
import http.client
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

listen, target = int(sys.argv[1]), int(sys.argv[2])
forget = "--forget-conditions" in sys.argv[3:]
lock = threading.Lock()
pending = {"lose_commits": 0, "fail": 0}
injected = {"lose_commits": 0, "fail": 0}


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
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def relay(self):
        if self.path.startswith("/__faults__"):
            return self.control()
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        if take("fail"):
            reply = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
            return
        drop = ("host",) + (("if-none-match",) if forget else ())
        headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
        upstream = http.client.HTTPConnection("127.0.0.1", target)
        upstream.request(self.command, self.path, body=body, headers=headers)
        r = upstream.getresponse()
        data = r.read()
        if self.command == "PUT" and "/_delta_log/" in self.path and self.path.endswith(".json") \
                and r.status < 300 and take("lose_commits"):
            self.close_connection = True
            return
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", listen), Relay).serve_forever()
