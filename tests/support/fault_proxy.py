"""An HTTP proxy that injects network faults at chosen points: for the remote-shard tests.

    python tests/support/fault_proxy.py --port P --upstream http://127.0.0.1:Q --rules rules.json --events events.jsonl

Forwards every request to the upstream server (a local S3 endpoint or http.server) unchanged. The
rules file (re-read when it changes, hit counts then start over) is a JSON list; the first rule
whose `method` (optional) and `path` (a substring) match and that has hits left applies:
  {"path": "val-000001.tar", "action": "reset", "after": 20000, "times": 1}
      forward the answer's headers and `after` body bytes, then reset the connection (TCP RST)
  {"path": "val-000002.tar", "action": "status", "status": 503, "times": 2}
      answer 503 (an S3-style SlowDown error body) without asking the upstream
  {"path": "val-000000.tar", "action": "stall", "seconds": 3, "times": 1}
      send nothing for `seconds`, then close (the client's read timeout fires)
`times` -1: every time. Each injected fault is appended to the events file as a JSON line.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}


class Rules:
    def __init__(self, path: str, events: str):
        self.path, self.events = path, events
        self.lock = threading.Lock()
        self.mtime = None
        self.rules: list[dict] = []
        self.hits: list[int] = []

    def match(self, method: str, path: str) -> dict | None:
        with self.lock:
            try:
                mtime = os.stat(self.path).st_mtime_ns
            except FileNotFoundError:
                mtime, self.rules = None, []
            if mtime != self.mtime:
                self.mtime = mtime
                self.rules = json.loads(open(self.path).read()) if mtime is not None else []
                self.hits = [0] * len(self.rules)
            for i, rule in enumerate(self.rules):
                if rule.get("method", method) != method or rule["path"] not in path:
                    continue
                times = rule.get("times", 1)
                if times >= 0 and self.hits[i] >= times:
                    continue
                self.hits[i] += 1
                with open(self.events, "a") as f:
                    f.write(json.dumps({"rule": i, "action": rule["action"], "path": path, "t": time.time()}) + "\n")
                return rule
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int]
    rules: Rules

    def log_message(self, *args) -> None:
        pass

    def _proxy(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        rule = self.rules.match(self.command, self.path)
        if rule and rule["action"] == "status":
            payload = (f"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>injected {rule['status']}"
                       f"</Message></Error>").encode()
            self.send_response(rule["status"])
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if rule and rule["action"] == "stall":
            time.sleep(rule["seconds"])
            self.close_connection = True
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        conn.request(self.command, self.path, body=body if body else None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_HEADERS and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if rule and rule["action"] == "reset":
            self.wfile.write(data[:rule["after"]])
            self.wfile.flush()
            # SO_LINGER 0: close() sends a RST instead of a FIN, as a dropped connection does
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass      # the socket was reset on purpose


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass          # resets and client timeouts are the point here


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="http://host:port of the real server")
    p.add_argument("--rules", required=True, help="JSON rules file (may not exist yet: no faults)")
    p.add_argument("--events", required=True, help="JSON-lines file of injected faults")
    args = p.parse_args()
    up = urlsplit(args.upstream)
    Handler.upstream = (up.hostname, up.port)
    Handler.rules = Rules(args.rules, args.events)
    server = Server(("127.0.0.1", args.port), Handler)
    print(f"fault proxy on 127.0.0.1:{args.port} -> {args.upstream}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
