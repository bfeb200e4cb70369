"""`sdonnx serve` (the `serve` extra): one loaded model behind OpenAI's images API, AUTOMATIC1111's /sdapi/v1 and a page.

One worker thread generates, one request at a time, from a bounded queue: a request that finds
the queue full gets 503 at once (with Retry-After), never a silent drop. Cancellation
(/sdapi/v1/interrupt) stops the running generation after its current step. Requests carry
images as base64, never file-system paths; bodies over the size limit get 413; with an API key,
every endpoint wants it (`Authorization: Bearer KEY`, or HTTP Basic with KEY as password, which
is what a browser asks for on the page).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import queue
import random
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError

from sdonnx.runtime.errors import InputError, SdonnxError
from sdonnx.runtime.pipeline import SAMPLERS, GenerationConfig, Pipeline

MAX_BODY_BYTES = 16 * 2**20
MAX_QUEUE = 4
MAX_SIDE = 2048
MAX_BATCH = 8
SEED_LIMIT = 2**32 - 1


class Busy(Exception):
    """The queue is full."""


class Interrupted(Exception):
    """A generation stopped by /sdapi/v1/interrupt, after `step` of `total` steps."""

    def __init__(self, step: int, total: int):
        super().__init__(f"interrupted by /sdapi/v1/interrupt after step {step} of {total}")
        self.step, self.total = step, total


class _HttpError(Exception):
    """An answer other than 200: status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _b64_png(image: Image.Image) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def decode_image(value: Any, field_name: str) -> Image.Image:
    """A base64 image (plain, or a data: URL as browsers make them); nothing else is accepted."""
    if not isinstance(value, str) or not value:
        raise InputError(f"{field_name}: expected a base64-encoded image")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        data = base64.b64decode(value, validate=True)
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (binascii.Error, ValueError):
        raise InputError(f"{field_name}: not valid base64") from None
    except (UnidentifiedImageError, OSError):
        raise InputError(f"{field_name}: not a readable image (PNG, JPEG, WebP ...)") from None


def sampler_key(name: str | None, scheduler: str | None = None, default: str = "euler") -> tuple[str, str]:
    """(sampler, schedule) from an A1111 sampler name ("Euler a", "DPM++ 2M Karras") or ours."""
    schedule = "karras" if (scheduler or "").lower() == "karras" else "default"
    if not name:
        return default, schedule
    wanted = name.strip().lower()
    if wanted.endswith(" karras"):
        wanted, schedule = wanted[: -len(" karras")], "karras"
    for key, sampler in SAMPLERS.items():
        if wanted in (key, sampler.label.lower()):
            return key, schedule
    known = ", ".join(s.label for s in SAMPLERS.values())
    raise InputError(f"unknown sampler {name!r}; choose one of: {known}")


def _number(body: dict, name: str, default, kind=int, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise InputError(f"{name}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{name}: {value} is outside {low}..{high}")
    return value


def _text(body: dict, name: str, default: str = "") -> str:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InputError(f"{name}: expected a string")
    return value


@dataclass
class Job:
    """One request's generation settings; the worker fills `images` or `error`, then settles
    `done`, a future of the request's event loop, so a waiting request holds no thread."""

    settings: dict
    done: asyncio.Future
    images: list[Image.Image] = field(default_factory=list)
    error: Exception | None = None

    def settle(self) -> None:
        """Called from the worker thread."""
        def finish() -> None:
            if not self.done.done():  # the client may have gone away and cancelled it
                self.done.set_result(None)

        self.done.get_loop().call_soon_threadsafe(finish)


class Worker:
    """The loaded pipeline, its queue, and what the progress endpoint reports.

    Every model call happens on the worker thread: a preview requested by /sdapi/v1/progress is
    decoded there after the next step (one VAE decode per request, not per step), so no
    execution provider is ever entered from two threads.
    """

    def __init__(self, pipe: Pipeline, max_queue: int = MAX_QUEUE):
        self.pipe = pipe
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.lock = threading.Lock()
        self.step = self.total = 0
        self.started = 0.0
        self.preview: str | None = None
        self.preview_wanted = threading.Event()
        self.running: Job | None = None
        self.interrupt = threading.Event()
        self.completed = 0
        self.thread = threading.Thread(target=self._loop, name="sdonnx-worker", daemon=True)
        self.thread.start()

    def submit(self, settings: dict) -> Job:
        """Queue a generation; called on the event loop that will await `job.done`."""
        job = Job(settings, asyncio.get_running_loop().create_future())
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy from None
        return job

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            with self.lock:
                self.running, self.step, self.total, self.preview = job, 0, job.settings["steps"], None
                self.started = time.monotonic()
                self.interrupt.clear()
            try:
                job.images = self.pipe.generate(**job.settings, on_step=self._on_step)
            except Exception as e:  # reported to the waiting request
                job.error = e
            finally:
                with self.lock:
                    self.running, self.preview = None, None
                    self.completed += 1
                job.settle()

    def _on_step(self, step: int, total: int, denoised) -> None:
        if self.interrupt.is_set():
            raise Interrupted(step, total)
        preview = None
        if self.preview_wanted.is_set() and step < total:
            self.preview_wanted.clear()
            preview = _b64_png(self.pipe.decode(denoised[:1])[0])
        with self.lock:
            self.step, self.total = step, total
            if preview is not None:
                self.preview = preview
        if self.interrupt.is_set():
            raise Interrupted(step, total)

    def stop_current(self) -> bool:
        """Ask the running generation to stop after its current step; False if none runs."""
        with self.lock:
            if self.running is None:
                return False
            self.interrupt.set()
            return True

    def progress(self, preview: bool) -> dict:
        with self.lock:
            running, step, total, image = self.running, self.step, self.total, self.preview
            elapsed = time.monotonic() - self.started
        if preview and running:
            self.preview_wanted.set()
        fraction = step / total if running and total else 0.0
        return {
            "progress": fraction,
            "eta_relative": elapsed / fraction - elapsed if fraction > 0 else 0.0,
            "state": {"job_count": self.jobs.qsize() + (1 if running else 0), "sampling_step": step,
                      "sampling_steps": total, "interrupted": self.interrupt.is_set(),
                      "job": "generating" if running else ""},
            "current_image": image if preview and running else None,
            "textinfo": f"step {step} of {total}" if running else None,
        }


class Settings:
    """Request bodies -> Pipeline.generate keyword arguments, with A1111's and OpenAI's names."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe

    def _size(self, width: int, height: int) -> tuple[int, int]:
        m = self.pipe.size_multiple
        if width % m or height % m:
            raise InputError(f"width and height must be multiples of {m} for this model; got {width}x{height}")
        return width, height

    def _seed(self, body: dict, name: str = "seed") -> int:
        seed = _number(body, name, -1, int, -1, SEED_LIMIT)
        return random.randrange(SEED_LIMIT // 2) if seed == -1 else seed

    def a1111(self, body: dict, img2img: bool = False) -> dict:
        native = self.pipe.native_size
        defaults = self.pipe.defaults
        sampler, schedule = sampler_key(_text(body, "sampler_name") or _text(body, "sampler_index"),
                                        _text(body, "scheduler"), defaults.sampler)
        width = _number(body, "width", native, int, 8, MAX_SIDE)
        height = _number(body, "height", native, int, 8, MAX_SIDE)
        settings = {
            "prompt": _text(body, "prompt"),
            "negative_prompt": _text(body, "negative_prompt"),
            "steps": _number(body, "steps", defaults.steps, int, 1, 150),
            "guidance": _number(body, "cfg_scale", defaults.guidance, float, 0.0, 30.0),
            "seed": self._seed(body),
            "sampler": sampler,
            "schedule": schedule,
            "n": _number(body, "batch_size", 1, int, 1, MAX_BATCH),
        }
        if img2img:
            images = body.get("init_images")
            if not isinstance(images, list) or not images:
                raise InputError("init_images: expected a list with one base64 image")
            settings["init_image"] = decode_image(images[0], "init_images[0]")
            settings["strength"] = _number(body, "denoising_strength", 0.75, float, 0.0, 1.0)
            if body.get("mask"):
                settings["mask_image"] = decode_image(body["mask"], "mask")
            if "width" not in body and "height" not in body:
                width = height = None  # the init image's own size
        if width is not None:
            settings["width"], settings["height"] = self._size(width, height)
        return settings

    def openai(self, body: dict) -> dict:
        native = self.pipe.native_size
        size = _text(body, "size", f"{native}x{native}")
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise InputError(f"size: expected WIDTHxHEIGHT such as {native}x{native}, got {size!r}") from None
        if not (8 <= width <= MAX_SIDE and 8 <= height <= MAX_SIDE):
            raise InputError(f"size: {size} is outside 8..{MAX_SIDE} per side")
        if _text(body, "response_format", "b64_json") != "b64_json":
            raise InputError("response_format: only b64_json is served (no URLs: nothing is stored)")
        if not _text(body, "prompt").strip():
            raise InputError("prompt: required")
        defaults = self.pipe.defaults
        sampler, schedule = sampler_key(_text(body, "sampler"), _text(body, "schedule"), defaults.sampler)
        width, height = self._size(width, height)
        return {
            "prompt": _text(body, "prompt"),
            "negative_prompt": _text(body, "negative_prompt"),
            "steps": _number(body, "steps", defaults.steps, int, 1, 150),
            "guidance": _number(body, "guidance", defaults.guidance, float, 0.0, 30.0),
            "seed": self._seed(body),
            "sampler": sampler,
            "schedule": schedule,
            "n": _number(body, "n", 1, int, 1, MAX_BATCH),
            "width": width,
            "height": height,
        }


def create_app(pipe: Pipeline, api_key: str | None = None, max_queue: int = MAX_QUEUE,
               max_body: int = MAX_BODY_BYTES):
    app = FastAPI(title="sdonnx", docs_url=None, redoc_url=None, openapi_url=None)
    worker = Worker(pipe, max_queue)
    settings = Settings(pipe)
    app.state.worker = worker

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        # OpenAI's error shape; A1111 clients read "detail".
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"},
                             "detail": message}, status_code=status, headers=headers)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return secrets.compare_digest(value.strip(), api_key)
        if scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(value).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return secrets.compare_digest(password, api_key)
        return False

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if not authorized(request):
            return error(401, "missing or wrong API key: send Authorization: Bearer KEY",
                         {"WWW-Authenticate": 'Basic realm="sdonnx"'})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return error(413, f"request body over {max_body // 2**20} MB")
        return await call_next(request)

    async def body_of(request: Request) -> dict:
        data = b""
        async for chunk in request.stream():  # chunked bodies have no content-length
            data += chunk
            if len(data) > max_body:
                raise _HttpError(413, f"request body over {max_body // 2**20} MB")
        try:
            body = json.loads(data or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _HttpError(400, f"malformed JSON: {e}") from None
        if not isinstance(body, dict):
            raise _HttpError(400, "the body must be a JSON object")
        return body

    async def run(job_settings: dict) -> list[Image.Image]:
        names = ("prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height", "sampler",
                 "n", "schedule", "strength")
        GenerationConfig(**{k: job_settings[k] for k in names if k in job_settings}).validate()
        try:
            job = worker.submit(job_settings)
        except Busy:
            raise _HttpError(503, f"busy: {max_queue} requests already queued; retry later",
                             {"Retry-After": "5"}) from None
        await job.done
        if isinstance(job.error, Interrupted):
            raise _HttpError(409, str(job.error))
        if isinstance(job.error, SdonnxError):
            raise _HttpError(400, str(job.error))
        if job.error is not None:
            raise _HttpError(500, f"generation failed: {job.error}")
        return job.images

    @app.exception_handler(_HttpError)
    async def http_error(request: Request, e: _HttpError):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(SdonnxError)
    async def bad_input(request: Request, e: SdonnxError):
        return error(400, str(e))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("sdonnx.cli").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": pipe.name, "native_size": pipe.native_size,
                "size_multiple": pipe.size_multiple, "defaults": asdict(pipe.defaults),
                "running": worker.running is not None,
                "queued": worker.jobs.qsize(), "completed": worker.completed}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": pipe.name, "object": "model", "owned_by": "sdonnx",
                                            "created": 0}]}

    @app.post("/v1/images/generations")
    async def openai_generations(request: Request):
        job_settings = settings.openai(await body_of(request))
        images = await run(job_settings)
        return {"created": int(time.time()),
                "data": [{"b64_json": _b64_png(im), "revised_prompt": job_settings["prompt"],
                          "seed": im.info["seed"]} for im in images]}

    async def a1111(request: Request, img2img: bool):
        body = await body_of(request)
        job_settings = settings.a1111(body, img2img)
        images = await run(job_settings)
        seeds = [im.info["seed"] for im in images]
        info = {
            "prompt": job_settings["prompt"], "all_prompts": [job_settings["prompt"]] * len(images),
            "negative_prompt": job_settings["negative_prompt"],
            "all_negative_prompts": [job_settings["negative_prompt"]] * len(images),
            "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(images),
            "width": images[0].width, "height": images[0].height,
            "sampler_name": SAMPLERS[job_settings["sampler"]].label,
            "cfg_scale": job_settings["guidance"], "steps": job_settings["steps"],
            "batch_size": len(images), "sd_model_name": pipe.name,
            "denoising_strength": job_settings.get("strength"),
            "infotexts": [im.info["parameters"] for im in images], "version": "sdonnx 0.1.0",
        }
        parameters = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
        return {"images": [_b64_png(im) for im in images], "parameters": parameters,
                "info": json.dumps(info)}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await a1111(request, img2img=False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await a1111(request, img2img=True)

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        return worker.progress(not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        return {"interrupted": worker.stop_current()}

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": s.label, "aliases": [key], "options": {}} for key, s in SAMPLERS.items()]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        # The model's name only: no file-system path leaves the server.
        return [{"title": pipe.name, "model_name": pipe.name, "hash": None, "sha256": None,
                 "filename": pipe.name, "config": None}]

    return app


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a taken port fails at once."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    sock.listen(128)
    return sock


def serve(pipe: Pipeline, sock: socket.socket, api_key: str | None, max_queue: int) -> None:
    import uvicorn

    config = uvicorn.Config(create_app(pipe, api_key, max_queue), log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
