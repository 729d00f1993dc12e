"""Real servers on loopback for the remote-shard tests: a local S3 endpoint (moto's server),
Python's http.server and the fault proxy; each started in its own process group and stopped by PID."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import free_port

HERE = Path(__file__).resolve().parent


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    files: dict = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)     # its own group: started with start_new_session
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _start(cmd: list[str], url: str, probe: str, log: Path, **extra) -> Server:
    out = open(log, "wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    server = Server(proc, url, extra)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + probe, timeout=2).close()
            return server
        except urllib.error.HTTPError:
            return server          # it answers
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                server.stop()
                raise RuntimeError(f"{cmd[:3]} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)


def start_moto(tmp: Path) -> Server:
    port = free_port()
    return _start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                  f"http://127.0.0.1:{port}", "/", tmp / "moto.log")


def start_http(folder: Path, tmp: Path) -> Server:
    port = free_port()
    return _start([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                   str(folder)], f"http://127.0.0.1:{port}", "/", tmp / f"http-{port}.log")


def start_proxy(upstream: str, tmp: Path) -> Server:
    port = free_port()
    rules, events = tmp / f"rules-{port}.json", tmp / f"events-{port}.jsonl"
    return _start([sys.executable, str(HERE / "fault_proxy.py"), "--port", str(port), "--upstream", upstream,
                   "--rules", str(rules), "--events", str(events)],
                  f"http://127.0.0.1:{port}", "/", tmp / f"proxy-{port}.log", rules=rules, events=events)


def set_faults(proxy: Server, rules: list[dict]) -> None:
    """Replace the proxy's rules (hit counts start over) and clear its event log."""
    tmp = proxy.files["rules"].with_suffix(".tmp")
    tmp.write_text(json.dumps(rules))
    os.replace(tmp, proxy.files["rules"])
    time.sleep(0.01)          # a new mtime even on coarse clocks
    proxy.files["events"].unlink(missing_ok=True)


def fault_events(proxy: Server) -> list[dict]:
    path = proxy.files["events"]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def s3_env(endpoint: str) -> dict:
    """What a user sets for an S3-compatible store: endpoint and credentials in the environment."""
    return {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}
