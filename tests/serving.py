"""A real `sdonnx serve` on loopback for the server tests and the load benchmark.

The server runs in its own process, started through the CLI exactly as a user starts it, on a
free port it reports itself; requests go through the standard library's HTTP client, so what is
tested is the wire format, not an in-process shortcut.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass
class Reply:
    status: int
    text: str
    headers: dict = field(default_factory=dict)

    @property
    def body(self):
        """The JSON body (the text itself when it is not JSON)."""
        try:
            return json.loads(self.text) if self.text else None
        except json.JSONDecodeError:
            return {"detail": self.text}

    @property
    def message(self) -> str:
        return self.body.get("detail", "") if isinstance(self.body, dict) else ""


class Client:
    """HTTP requests to a server at `url` (http://HOST:PORT)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                raw: bytes | None = None, timeout: float = 300) -> Reply:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = headers or {}
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        if data is not None and not any(k.lower() == "content-type" for k in headers):
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return Reply(response.status, response.read().decode(errors="replace"), dict(response.headers))
        except urllib.error.HTTPError as e:
            return Reply(e.code, e.read().decode(errors="replace"), dict(e.headers))

    def get(self, path: str, **kw) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, body=None, **kw) -> Reply:
        return self.request("POST", path, body if body is not None else {}, **kw)


class Server(Client):
    """`sdonnx serve --port 0 ARGS...` in a child process; `url` once it listens."""

    def __init__(self, *args: str, timeout: float = 120):
        command = [sys.executable, "-c", "from sdonnx.cli.app import main; main()", "serve", "--port", "0", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        deadline = time.monotonic() + timeout
        self.url = ""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.output.append(line)
            found = re.search(r"on (http://\S+/)", line)
            if found:
                self.url = found.group(1).rstrip("/")
                break
        if not self.url:
            self.stop()
            raise RuntimeError("sdonnx serve did not start:\n" + "".join(self.output))
        # Keep draining the pipe so the child never blocks on a full one.
        threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True).start()

    def peak_rss_mb(self) -> float:
        """The server process's peak resident memory (Linux VmHWM)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def multipart(fields: dict, files: dict) -> tuple[bytes, dict]:
    """A multipart/form-data body as OpenAI's clients send one (the openai package through httpx):
    text fields, then files as (filename, bytes, content type); returns (body, headers)."""
    boundary = "sdonnx-test-" + uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, content_type) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass
class LoadResult:
    clients: int
    completed: int = 0  # 200 with a decodable image of the asked size
    busy: int = 0  # 503 with Retry-After
    other: list[str] = field(default_factory=list)  # anything else: a lost or broken request
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)


def load(server: Server, clients: int, body: dict, size: int) -> LoadResult:
    """`clients` concurrent OpenAI requests released together; every reply accounted for."""
    result = LoadResult(clients)
    gate = threading.Barrier(clients)
    lock = threading.Lock()

    def one(i: int) -> None:
        gate.wait()
        start = time.perf_counter()
        reply = server.post("/v1/images/generations", {**body, "seed": i})
        elapsed = time.perf_counter() - start
        with lock:
            if reply.status == 200:
                image = png(reply.body["data"][0]["b64_json"])
                if image.size == (size, size):
                    result.completed += 1
                    result.latencies.append(elapsed)
                else:
                    result.other.append(f"client {i}: image of size {image.size}")
            elif reply.status == 503 and reply.headers.get("retry-after", reply.headers.get("Retry-After")):
                result.busy += 1
            else:
                result.other.append(f"client {i}: {reply.status} {reply.message}")

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))
    result.seconds = time.perf_counter() - start
    return result
