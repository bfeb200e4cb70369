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
import time
from collections import deque
from pathlib import Path
from typing import Callable

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from sdonnx.cli.batch import Drawer, Drawn, Task
from sdonnx.runtime import cache
from sdonnx.runtime.errors import InputError, ModelFolderError, SdonnxError

MAX_ATTEMPTS = 3  # tries per job when workers die under it
SERVE_APP = "sdonnx"


def connect(address: str, verbose: bool = False) -> None:
    """Join the Ray cluster at `address` ("auto": the one this machine belongs to, or
    $RAY_ADDRESS; HOST:PORT or ray://HOST:10001), or with "local" start one on this machine
    for this process only. InputError when there is none."""
    options = {"log_to_driver": verbose, "logging_level": "INFO" if verbose else "WARNING",
               "configure_logging": verbose}
    try:
        if address == "local":
            ray.init(include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    except ConnectionError as e:
        raise InputError(f"--ray {address}: no Ray cluster found ({str(e).splitlines()[0]}); start one with "
                         "`ray start --head`, or use --ray local") from None


def fingerprint(folder: Path) -> str:
    """What identifies a model folder across nodes: its files' relative paths and sizes, and
    the contents of its JSON files (configs, tokenizer, sdonnx.json); 16 hex digits."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        digest.update(f"{relative}\0{path.stat().st_size}\0".encode())
        if path.suffix == ".json":
            digest.update(path.read_bytes())
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
    root = (cache.resolve_root(None) or Path.home() / ".cache" / "sdonnx") / "ray-models"
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
        context = ray.get_runtime_context()
        self.where = f"{ray.util.get_node_ip_address()} node {context.get_node_id()[:8]} pid {os.getpid()}"
        return self.load(model_on_node(model, expected, shipped), options)


def _cause(error: Exception) -> Exception:
    """The exception a task raised inside its worker (RayTaskError wraps it)."""
    return error.cause if isinstance(error, RayTaskError) and error.cause is not None else error


def run_batch(tasks: list[Task], model: Path, *, workers: int | None, threads: int, ship_model: bool,
              options: dict, on_drawn: Callable[[Drawn], None], on_failed: Callable[[Task, str], None],
              on_note: Callable[[str], None]) -> int:
    """Draw `tasks` on the connected cluster with `workers` actors of `threads` CPUs each
    (None: as many as the cluster's CPUs allow); `on_drawn` is called in this process for
    every image, `on_failed` for a job the model refuses or that failed MAX_ATTEMPTS times,
    `on_note` for a worker that died. Returns the number of workers used. InputError when
    the model cannot be loaded on the cluster, or no worker can start."""
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < threads:
        raise InputError(f"the Ray cluster has {cpus:g} CPUs, fewer than --threads {threads} per worker")
    count = workers or max(1, int(cpus // threads))
    expected = fingerprint(model)
    shipped = ship(model) if ship_model else None
    Actor = ray.remote(num_cpus=threads, max_restarts=0)(BatchWorker)

    def launch():
        actor = Actor.remote()
        return actor, actor.start.remote(str(model), expected, shipped, {**options, "threads": threads})

    starting = dict(launch()[::-1] for _ in range(count))  # start ref -> actor
    idle: list = []
    running: dict = {}  # draw ref -> (actor, task)
    pending = deque(tasks)
    attempts: dict[str, int] = {}
    while pending or running:
        while idle and pending:
            actor, task = idle.pop(), pending.popleft()
            running[actor.draw.remote(task)] = (actor, task)
        if not running and not starting:
            raise InputError("no Ray worker could start; see `ray status` for the cluster's resources")
        [ref], _ = ray.wait(list(running) + list(starting), num_returns=1)
        if ref in starting:
            actor = starting.pop(ref)
            try:
                ray.get(ref)
            except RayTaskError as e:
                cause = _cause(e)
                if isinstance(cause, SdonnxError):  # the model cannot load: no other worker would do better
                    raise type(cause)(str(cause)) from None
                raise
            except RayActorError:  # died while loading: try one more in its place
                on_note("a worker died while loading the model; starting another")
                if attempts.setdefault("(start)", 0) < MAX_ATTEMPTS * count:
                    attempts["(start)"] += 1
                    new, new_ref = launch()
                    starting[new_ref] = new
                continue
            idle.append(actor)
            continue
        actor, task = running.pop(ref)
        try:
            drawn = ray.get(ref)
        except RayActorError as e:
            tries = attempts[task.file] = attempts.get(task.file, 0) + 1
            reason = str(e).splitlines()[0][:200]
            if tries < MAX_ATTEMPTS:
                on_note(f"a worker died drawing line {task.line} ({task.file}); it is drawn again elsewhere")
                pending.appendleft(task)
            else:
                on_failed(task, f"its workers died {tries} times ({reason})")
            new, new_ref = launch()
            starting[new_ref] = new
            continue
        except RayTaskError as e:
            cause = _cause(e)
            on_failed(task, str(cause) if isinstance(cause, SdonnxError) else f"{type(cause).__name__}: {cause}")
            idle.append(actor)
            continue
        on_drawn(drawn)
        idle.append(actor)
    return count


@serve.ingress()
class Replica:
    """One Ray Serve replica: a Pipeline behind the same app as `sdonnx serve`
    (server.create_app), built on the replica after the model has loaded."""

    def __init__(self, model: str, expected: str, shipped: dict | None, options: dict, app_options: dict):
        from sdonnx.runtime import Pipeline

        self.pipe = Pipeline.load(model_on_node(model, expected, shipped), **options)
        self.app_options = app_options

    def __serve_build_asgi_app__(self):
        from sdonnx.cli import server

        return server.create_app(self.pipe, **self.app_options)


def serve_app(model: Path, *, host: str, port: int, replicas: int | None, threads: int, queue: int,
              ship_model: bool, options: dict, app_options: dict) -> tuple[str, int]:
    """Deploy `replicas` replicas (None: the cluster's CPUs / `threads`) of `model` behind
    Ray Serve's HTTP proxy on the head node at host:port; each replica generates one request
    at a time with up to `queue` waiting on it, and Ray's router holds `queue` more per
    replica before it answers 503. Returns (URL, replicas). Blocks until every replica has
    loaded; InputError when they cannot."""
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < threads:
        raise InputError(f"the Ray cluster has {cpus:g} CPUs, fewer than --threads {threads} per replica")
    count = replicas or max(1, int(cpus // threads))
    expected = fingerprint(model)
    shipped = ship(model) if ship_model else None
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly",
                logging_config={"log_level": "WARNING"})
    deployment = serve.deployment(Replica).options(
        name="sdonnx", num_replicas=count, ray_actor_options={"num_cpus": threads},
        max_ongoing_requests=queue + 1, max_queued_requests=queue * count, max_constructor_retry_count=1,
        health_check_timeout_s=600, graceful_shutdown_timeout_s=5)
    # The replica's own queue takes all that Ray lets through, so Ray's router is the one that refuses.
    app_options = {**app_options, "max_queue": queue + 1}
    try:
        serve.run(deployment.bind(str(model), expected, shipped, {**options, "threads": threads}, app_options),
                  name=SERVE_APP, route_prefix="/")
    except RuntimeError as e:
        message = str(e)
        for line in message.splitlines():
            if "Error:" in line and ("sdonnx" in line or "InputError" in line or "ModelFolderError" in line):
                message = line.split("Error:", 1)[1]
                break
        serve.shutdown()
        raise InputError(f"the replicas did not start: {' '.join(message.split())[:500]}") from None
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/", count


def wait_serving() -> None:
    """Block until Ctrl-C or SIGTERM, then take the app down."""
    try:
        while True:
            time.sleep(3600)
    finally:
        try:
            serve.delete(SERVE_APP)
            serve.shutdown()
        except Exception:  # the cluster may be gone already
            pass

