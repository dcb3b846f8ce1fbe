"""Fixtures: the real backstop binary on ports the OS picks, and a misbehaving upstream."""

import json
import os
import pathlib
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BINARY = os.environ.get("BACKSTOP_BIN", str(ROOT / "target" / "debug" / "backstop"))


class Sidecar:
    def __init__(self, policy: str, env=None):
        self._dir = tempfile.TemporaryDirectory()
        path = pathlib.Path(self._dir.name) / "policy.yaml"
        path.write_text(policy)
        self.process = subprocess.Popen(
            [BINARY, "sidecar", "--policy-file", str(path), "--listen", "127.0.0.1:0",
             "--admin", "127.0.0.1:0", "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        self.log = []
        ready = threading.Event()

        def read():
            for line in self.process.stderr:
                self.log.append(line)
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("message") == "backstop sidecar listening":
                    self.llm, self.admin = event["llm"], event["admin"]
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(10):
            self.stop()
            raise RuntimeError("sidecar did not start:\n" + "".join(self.log))
        self.base_url = f"http://{self.llm}/v1"

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._dir.cleanup()


@pytest.fixture
def sidecar():
    started = []

    def start(policy: str, env=None) -> Sidecar:
        s = Sidecar(policy, env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def chunk(delta, finish=None):
    return {"id": "chatcmpl-cut", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


class CuttingUpstream(BaseHTTPRequestHandler):
    """Streams a role chunk and one content chunk, then drops the connection."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        for event in (chunk({"role": "assistant", "content": ""}), chunk({"content": "partial"})):
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        time.sleep(0.05)
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args):
        pass


@pytest.fixture
def cutting_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), CuttingUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
