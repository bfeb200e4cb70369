"""sdonnx on a Ray cluster (the `ray` extra): `sdonnx batch --ray` and `sdonnx serve --ray`.

Ray (https://docs.ray.io) places the work; sdonnx brings only what is its own: `batch.Drawer`
as an actor holding one loaded Pipeline, and the server's app (server.create_app) as a Ray
Serve replica. The only module that imports Ray.

The model folder reaches a node one of two ways: read from `--model`'s path, which every node
must see holding the same folder (checked by `fingerprint`), or with `--ship-model` through
Ray's object store, one object per file, unpacked once per node into
~/.cache/sdonnx/ray-models/FINGERPRINT/NAME (`model_on_node`).

Batches are exactly-once on the output because only the driver (the `sdonnx batch` process)
writes: actors return PNG bytes. A job whose actor died (its process killed, its node lost) is
given to another actor, and a new actor replaces the dead one, up to MAX_ATTEMPTS tries a job.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import socket
import time
from collections import deque
from pathlib import Path
from typing import Callable

import ray
from ray.exceptions import RayError, RayTaskError

from sdonnx.cli.batch import Drawer, Drawn, Task
from sdonnx.runtime import cache
from sdonnx.runtime.errors import InputError, ModelFolderError, SdonnxError

MAX_ATTEMPTS = 3  # tries per job when workers die under it
START_TIMEOUT = 900  # seconds without any worker ready (placed and its model loaded) before giving up
SAMPLE = 2**20  # bytes read from each end of a large file for its fingerprint
SERVE_APP = "sdonnx"


def connect(address: str, verbose: bool = False) -> None:
    """Join the Ray cluster at `address` ("auto": the one this machine belongs to, or
    $RAY_ADDRESS; HOST:PORT or ray://HOST:10001), or with "local" start one on this machine
    for this process only. InputError when there is none."""
    options = {"log_to_driver": verbose, "logging_level": "INFO" if verbose else "WARNING",
               "configure_logging": verbose}
    if address not in ("auto", "local"):  # Ray retries a wrong address for minutes; say it at once
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
        except OSError as e:
            raise InputError(f"--ray {address}: nothing answers there ({e.strerror or e}); give the head node's "
                             "HOST:PORT (`ray status` on it shows it), or use --ray local") from None
    previous = signal.getsignal(signal.SIGTERM)
    try:
        if address == "local":  # a new cluster, never $RAY_ADDRESS's or the last one started here
            ray.init(address="local", include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    except ConnectionError as e:
        raise InputError(f"--ray {address}: no Ray cluster found ({str(e).splitlines()[0]}); start one with "
                         "`ray start --head`, or use --ray local") from None
    except ray.exceptions.AuthenticationError:
        raise InputError(f"--ray {address}: the cluster wants its token; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                         "(or ~/.ray/auth_token) as on its nodes") from None
    except (RayError, RuntimeError, ValueError) as e:
        raise InputError(f"--ray {address}: cannot join the cluster ({str(e).splitlines()[0][:300]})") from None
    if callable(previous):  # Ray's own handler logs a stack trace and exits 15 instead of cleaning up
        signal.signal(signal.SIGTERM, previous)


def fingerprint(folder: Path) -> str:
    """What identifies a model folder across nodes (16 hex digits): its files' relative paths
    and sizes, the whole of every file up to 2 MB (configs, tokenizer, sdonnx.json) and the
    first and last MB of larger ones (two fine-tunes of one architecture differ there)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= 2 * SAMPLE:
                digest.update(f.read())
            else:
                digest.update(f.read(SAMPLE))
                f.seek(-SAMPLE, os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def ship(folder: Path) -> dict[str, ray.ObjectRef]:
    """The folder's files in Ray's object store, one object per file (a node fetches one file
    at a time, not the whole model at once)."""
    return {path.relative_to(folder).as_posix(): ray.put(path.read_bytes())
            for path in sorted(folder.rglob("*")) if path.is_file()}


def model_on_node(path: str, expected: str, shipped: dict | None) -> str:
    """The model folder on this node: `path` when it holds the folder the driver fingerprinted,
    else the shipped copy, unpacked here once (to a temporary name, then renamed into place,
    so actors starting together on one node never read half a copy). ModelFolderError when
    this node does not see the folder and nothing was shipped."""
    if shipped is None:
        folder = Path(path)
        if folder.is_dir() and fingerprint(folder) == expected:
            return path
        raise ModelFolderError(f"the node at {ray.util.get_node_ip_address()} does not see the model folder {path} "
                               "(or holds another model there): put it on a path every node sees, or add --ship-model")
    root = (cache.resolve_root(None) or cache.default_root()) / "ray-models"  # (a copy is kept even with the cache off)
    target = root / expected
    if not target.is_dir():
        tmp = root / f".{expected}-{secrets.token_hex(6)}"
        try:
            for relative, ref in shipped.items():
                file = tmp / Path(path).name / relative  # the folder's name is the model's name in every PNG
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_bytes(ray.get(ref))
            try:
                os.rename(tmp, target)
            except OSError:  # another actor on this node placed it first
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target / Path(path).name)


class BatchWorker(Drawer):
    """A Drawer that finds its model folder on its node first (model_on_node)."""

    def start(self, model: str, expected: str, shipped: dict | None, options: dict) -> dict:
        """Load the model (model_on_node, then Drawer.load); returns Drawer.load's report
        plus this worker's Ray node id ("node")."""
        node = ray.get_runtime_context().get_node_id()
        self.where = f"{ray.util.get_node_ip_address()} node {node[:8]} pid {os.getpid()}"
        return {**self.load(model_on_node(model, expected, shipped), options), "node": node}


def slots(threads: int, what: str) -> int:
    """How many actors of `threads` CPUs the cluster's alive nodes hold (each on one node);
    InputError when no node has that many CPUs (an actor would wait for one forever)."""
    cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
    if max(cpus, default=0) < threads:
        raise InputError(f"no node of the Ray cluster has {threads} CPUs for a {what} (the largest has "
                         f"{max(cpus, default=0):g}); lower --threads")
    return sum(int(c // threads) for c in cpus)


def _cause(error: Exception) -> Exception:
    """The exception a task raised inside its worker (RayTaskError wraps it)."""
    return error.cause if isinstance(error, RayTaskError) and error.cause is not None else error


def run_batch(tasks: list[Task], model: Path, *, workers: int | None, threads: int, ship_model: bool,
              options: dict, on_drawn: Callable[[Drawn], None], on_failed: Callable[[Task, str], None],
              on_note: Callable[[str], None]) -> int:
    """Draw `tasks` on the connected cluster with `workers` actors of `threads` CPUs each
    (None: as many as the nodes hold, `slots`); `on_drawn` is called in this process for every
    image, `on_failed` for a job the model refuses or whose workers died MAX_ATTEMPTS times,
    `on_note` when a worker dies. Returns the number of workers asked for. InputError when
    the model cannot be loaded on the cluster, or no worker is ready within START_TIMEOUT."""
    count = workers or max(1, slots(threads, "worker"))
    expected = fingerprint(model)
    shipped = ship(model) if ship_model else None
    Actor = ray.remote(num_cpus=threads, max_restarts=0)(BatchWorker)

    def launch() -> None:
        actor = Actor.remote()
        starting[actor.start.remote(str(model), expected, shipped, {**options, "threads": threads})] = actor

    def replace(actor) -> None:
        """A worker died: end it for good (an unreachable one may still hold its CPUs), drop the
        idle workers of nodes that are gone with it, and start one more in its place."""
        ray.kill(actor, no_restart=True)
        alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        for other in [a for a in idle if nodes.get(a) not in alive]:
            idle.remove(other)
            ray.kill(other, no_restart=True)
            launch()
        launch()

    starting: dict = {}  # start ref -> actor
    nodes: dict = {}  # actor -> its node's id
    idle: list = []
    running: dict = {}  # draw ref -> (actor, task)
    pending = deque(tasks)
    attempts: dict[str, int] = {}
    for _ in range(count):
        launch()
    last_ready = time.monotonic()
    while pending or running:
        while idle and pending:
            actor, task = idle.pop(), pending.popleft()
            running[actor.draw.remote(task)] = (actor, task)
        if not running and not starting:
            raise InputError("no Ray worker could start; see `ray status` for the cluster's resources")
        done, _ = ray.wait(list(running) + list(starting), num_returns=1, timeout=10)
        if not done:
            if not running and time.monotonic() - last_ready > START_TIMEOUT:
                raise InputError(f"no Ray worker was ready within {START_TIMEOUT // 60} minutes (placed on a node "
                                 "with its model loaded); see `ray status` for the cluster's resources")
            continue
        ref = done[0]
        if ref in starting:
            actor = starting.pop(ref)
            try:
                nodes[actor] = ray.get(ref)["node"]
            except RayTaskError as e:  # the model cannot load there: another worker would fail the same way
                cause = _cause(e)
                message = str(cause) if isinstance(cause, SdonnxError) else \
                    f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
                raise InputError(f"a Ray worker could not load the model: {message}") from None
            except RayError:  # it died while loading
                on_note("a worker died while loading the model; starting another")
                attempts["(start)"] = attempts.get("(start)", 0) + 1
                if attempts["(start)"] <= MAX_ATTEMPTS * count:
                    replace(actor)
                continue
            idle.append(actor)
            last_ready = time.monotonic()
            continue
        actor, task = running.pop(ref)
        try:
            drawn = ray.get(ref)
        except RayTaskError as e:  # the job itself failed; the worker is fine
            cause = _cause(e)
            on_failed(task, str(cause) if isinstance(cause, SdonnxError) else f"{type(cause).__name__}: {cause}")
            idle.append(actor)
            continue
        except RayError as e:  # the worker died, or its node with the image in its object store
            tries = attempts[task.file] = attempts.get(task.file, 0) + 1
            if tries < MAX_ATTEMPTS:
                on_note(f"a worker died drawing line {task.line} ({task.file}); it is drawn again elsewhere")
                pending.appendleft(task)
            else:
                on_failed(task, f"its workers died {tries} times ({str(e).splitlines()[0][:200]})")
            replace(actor)
            continue
        on_drawn(drawn)
        idle.append(actor)
    return count


def replica_class():
    """The Ray Serve replica class (Ray Serve imported here: `sdonnx batch --ray` needs only Ray)."""
    from ray import serve

    @serve.ingress()
    class Replica:
        """One replica: a Pipeline behind the same app as `sdonnx serve` (server.create_app),
        built on the replica once the model has loaded."""

        def __init__(self, model: str, expected: str, shipped: dict | None, options: dict, app_options: dict):
            from sdonnx.runtime import Pipeline

            self.pipe = Pipeline.load(model_on_node(model, expected, shipped), **options)
            self.app_options = app_options

        def __serve_build_asgi_app__(self):
            from sdonnx.cli import server

            return server.create_app(self.pipe, **self.app_options)

    return Replica


def serve_app(model: Path, *, host: str, port: int, replicas: int | None, threads: int, queue: int,
              ship_model: bool, options: dict, app_options: dict) -> tuple[str, int]:
    """Deploy `replicas` replicas (None: as many as the nodes hold, `slots`) of `model` as the
    Ray Serve app "sdonnx", behind Serve's HTTP proxy on the head node at host:port; each
    replica generates one request at a time with up to `queue` waiting on it, and Ray's router
    holds `queue` more per replica before it answers 503. Blocks until every replica has
    loaded; returns (URL, replicas). InputError when Serve already runs on the cluster with its
    proxy elsewhere, an sdonnx app is already deployed, or the replicas cannot start (the
    app is then deleted)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.exceptions import RayServeException

    count = replicas or max(1, slots(threads, "replica"))
    try:
        running = _get_global_client()
    except RayServeException:
        running = None
    if running is not None:  # its proxy stays as it is: the app joins it
        http = running.http_config
        if http.host != host or port not in (0, http.port):
            raise InputError(f"Ray Serve already runs on this cluster with its HTTP proxy on {http.host}:{http.port}; "
                             f"give --host {http.host} --port {http.port}, or stop it (`serve shutdown`)")
        if SERVE_APP in serve.status().applications:
            raise InputError(f"the Ray Serve app {SERVE_APP!r} already runs on this cluster; stop it first "
                             f"(`serve delete {SERVE_APP}`)")
        port = http.port
    else:
        # A taken port fails here, at once, where the proxy will bind it: on this machine when
        # it is the head (the proxy runs there); port 0 picks one that is free here.
        from sdonnx.cli import server

        sock = server.bind(host, port)
        port = sock.getsockname()[1]
        sock.close()
    expected = fingerprint(model)
    shipped = ship(model) if ship_model else None
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly",
                logging_config={"log_level": "WARNING"})
    deployment = serve.deployment(replica_class()).options(
        name="sdonnx", num_replicas=count, ray_actor_options={"num_cpus": threads},
        max_ongoing_requests=queue + 1, max_queued_requests=queue * count, max_constructor_retry_count=1,
        health_check_timeout_s=600, graceful_shutdown_timeout_s=5)
    # The replica's own queue takes all that Ray lets through, so Ray's router is the one that refuses.
    app_options = {**app_options, "max_queue": queue + 1}
    deployed = False
    try:
        serve.run(deployment.bind(str(model), expected, shipped, {**options, "threads": threads}, app_options),
                  name=SERVE_APP, route_prefix="/")
        deployed = True
    except RuntimeError as e:
        message = str(e)
        for line in message.splitlines():
            if "Error:" in line and ("sdonnx" in line or "InputError" in line or "ModelFolderError" in line):
                message = line.split("Error:", 1)[1]
                break
        raise InputError(f"the replicas did not start: {' '.join(message.split())[:500]}") from None
    finally:
        if not deployed:  # failed or interrupted: no half-started app stays behind holding CPUs
            _delete()
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/", count


def _delete() -> None:
    from ray import serve

    try:
        serve.delete(SERVE_APP, _blocking=False)  # Serve's controller takes the replicas down
    except Exception:  # the cluster may be gone already
        pass


def wait_serving() -> None:
    """Block until Ctrl-C or SIGTERM, then delete the app (Serve itself stays for others)."""
    try:
        while True:
            time.sleep(3600)
    finally:
        _delete()
