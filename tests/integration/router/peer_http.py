"""Tiny HTTP server for the router tests: GET answers ``<name> <peer ip>``; POST reads the
body and answers its length. ``python3 peer_http.py NAME HOST PORT``."""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(f"{sys.argv[1]} {self.client_address[0]}\n".encode())

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        left = n
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)
        self._send(f"{sys.argv[1]} {self.client_address[0]} {n - left}\n".encode())

    def log_message(self, format: str, *args: object) -> None:
        return


if __name__ == "__main__":
    ThreadingHTTPServer((sys.argv[2], int(sys.argv[3])), Handler).serve_forever()
