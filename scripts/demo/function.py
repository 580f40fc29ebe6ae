#!/usr/bin/env python3
"""Sample functions for scripts/demo.sh, served the way an OpenFaaS gateway serves them.

POST /function/shout    answers the body in capitals
POST /function/slow     waits ?ms= milliseconds (default 2000), then answers "done"
POST /function/flaky    answers 503 to the first two attempts of each X-Call-Id, then 200
POST /callback          receives results; each one is printed to stdout as a line of JSON
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

attempts = {}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One write per response, sent at once: unbuffered, http.server writes the head and the body
    # separately, and Nagle's algorithm holds the body until the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024

    def do_POST(self):
        url = urlparse(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, answer = 200, b""
        if url.path.startswith("/function/shout"):
            answer = body.upper()
        elif url.path.startswith("/function/slow"):
            ms = int(parse_qs(url.query).get("ms", ["2000"])[0])
            time.sleep(ms / 1000)
            answer = b"done"
        elif url.path.startswith("/function/flaky"):
            call = self.headers.get("X-Call-Id", "")
            with lock:
                attempts[call] = attempts.get(call, 0) + 1
                n = attempts[call]
            status, answer = (503, b"not yet") if n <= 2 else (200, f"ok after {n} attempts".encode())
        elif url.path == "/callback":
            record = {k: self.headers.get(k) for k in
                      ("X-Call-Id", "X-Function-Name", "X-Function-Status", "X-Duration-Seconds", "X-Retry")}
            record["body"] = body.decode("utf-8", "replace")
            print(json.dumps(record), flush=True)
        else:
            status, answer = 404, b"no such function"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer.request_queue_size = 128  # the default of 5 drops bursts of connects
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.serve_forever()
