"""A real two-node Ray cluster for tests and benchmarks, inside a network namespace that has
nothing but loopback.

Ray ignores `--node-ip-address 127.0.0.1` on a machine with a network interface: it registers,
binds and connects through that interface. In a namespace of our own (`unshare -n`, then
`ip link set lo up`; needs root) loopback is all there is, so every byte stays on 127.0.0.1.
Commands run inside through `nsenter`; Python code in this process runs inside through
`LoopbackNamespace.call`, on a thread that entered the namespace (setns(2) moves one thread,
and threads it starts inherit the namespace).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CLONE_NEWNET = 0x40000000
RAY = str(Path(sys.executable).with_name("ray"))


class LoopbackNamespace:
    """A network namespace holding only `lo` (up), kept alive by a sleeping process."""

    def __init__(self):
        self.holder = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && echo ready && exec sleep infinity"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if self.holder.stdout.readline().strip() != "ready":
            self.holder.kill()
            raise RuntimeError(f"no network namespace (unshare -n needs root): {self.holder.stderr.read()}")
        self.path = f"/proc/{self.holder.pid}/ns/net"
        self.prefix = ["nsenter", f"--net={self.path}"]

    def interfaces(self) -> str:
        return subprocess.run([*self.prefix, "ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout

    def call(self, function, *args):
        """`function(*args)` on a thread inside the namespace; its result, or its exception."""
        outcome: dict = {}

        def inside() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    outcome["error"] = OSError(ctypes.get_errno(), "setns failed")
                    return
            finally:
                os.close(fd)
            try:
                outcome["value"] = function(*args)
            except BaseException as e:  # re-raised on the caller's thread
                outcome["error"] = e

        thread = threading.Thread(target=inside)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def processes(self, name: str = "") -> list[int]:
        """The processes in this namespace whose command line contains `name`, the holder aside."""
        inode = os.readlink(self.path)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.holder.pid:
                continue
            try:
                if os.readlink(entry / "ns" / "net") == inode and name in (entry / "cmdline").read_text():
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
        return found

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


class RayCluster:
    """`ray start --head` and a second `ray start --address` node, separate processes with
    `cpus` CPUs each, inside `namespace`; `address` is the head's 127.0.0.1:PORT. The nodes'
    environment, `self.env`, is this process's plus `env` (their workers inherit it); drivers
    need it too."""

    def __init__(self, namespace: LoopbackNamespace, cpus: int = 1, env: dict | None = None, port: int = 6380):
        self.namespace = namespace
        # Ray's socket paths must stay short: a temp folder of its own under /tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        # Ray 2.60 authenticates every connection with a token; this cluster's own, given to its
        # nodes and to the drivers the tests start (`env`), so no file under ~/.ray is involved.
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32), **(env or {})}
        self.address = f"127.0.0.1:{port}"
        common = ["--num-cpus", str(cpus), "--disable-usage-stats"]
        try:
            self._ray("start", "--head", "--port", str(port), "--include-dashboard", "false",
                      "--temp-dir", self.temp_dir, *common)
            self._ray("start", "--address", self.address, *common)
            deadline = time.monotonic() + 60
            while self.nodes() < 2:  # the second node registers shortly after `ray start` returns
                if time.monotonic() > deadline:
                    raise RuntimeError("the second Ray node did not join within 60 s")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def _ray(self, *args: str) -> str:
        done = subprocess.run([*self.namespace.prefix, RAY, *args], capture_output=True, text=True, env=self.env,
                              timeout=180)
        if done.returncode:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def nodes(self) -> int:
        """Alive nodes, as `ray status` counts them."""
        status = self._ray("status", "--address", self.address)
        return status.split("Active:")[1].split("Pending:")[0].count("node_")

    def stop(self) -> None:
        """Kill this cluster's processes: every process in its namespace (`ray stop` would kill
        every Ray process on the machine)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.namespace.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while self.namespace.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
