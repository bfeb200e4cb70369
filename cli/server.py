"""`sdonnx serve` (the `serve` extra): one loaded model behind OpenAI's images API, AUTOMATIC1111's /sdapi/v1 and a page.

One worker thread generates, one request at a time, from a bounded queue: a request that finds
the queue full gets 503 at once (with Retry-After), never a silent drop. Cancellation
(/sdapi/v1/interrupt) stops the running generation after its current step. Requests carry
images as base64 (or, for /v1/images/edits, as multipart files), never file-system paths;
bodies over the size limit get 413; with an API key, every endpoint wants it
(`Authorization: Bearer KEY`, or HTTP Basic with KEY as password, which is what a browser asks
for on the page). Request bodies are the pydantic models below, published at /docs and
/openapi.json; a request they refuse gets 400 with a one-line message naming the field.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib.util
import io
import json
import queue
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdonnx.runtime import adapters
from sdonnx.runtime.errors import InputError, SdonnxError, install_hint
from sdonnx.runtime.images import INIT_BACKGROUND, MASK_BACKGROUND, default_size, load_image
from sdonnx.runtime.checks import MAX_GUIDANCE
from sdonnx.runtime.pipeline import SAMPLERS, GenerationConfig, Pipeline, find_sampler, random_seed

MAX_BODY_BYTES = 16 * 2**20
MAX_QUEUE = 4
MAX_SIDE = 2048
# An upload is decoded before it is scaled to the generation size: a 16 MB PNG can hold 150
# megapixels (600 MB as RGB). Four times the largest generation is room enough.
MAX_UPLOAD_PIXELS = 4 * MAX_SIDE**2
MAX_BATCH = 8
MAX_ITER = 32  # A1111's batch count: each batch holds the worker; interrupt stops them all
MAX_STEPS = 150  # A1111's slider
SEED_LIMIT = 2**32 - 1
# A prompt is tokenized whole and encoded in 75-token windows, and every window lengthens the
# UNet's cross-attention context at every step: a 3 MB prompt held the worker for 22 s and
# 4 GB. 4000 characters (OpenAI's DALL-E 3 limit) is about 1000 CLIP tokens, 13 windows,
# far past the longest prompts A1111 users write.
MAX_PROMPT_CHARS = 4000
EDIT_STRENGTH = 0.75  # /v1/images/edits without a mask: img2img at A1111's and diffusers' default
A1111_SCHEDULERS = {"automatic": "default", "karras": "karras"}  # A1111's scheduler names sdonnx has


class Busy(Exception):
    """The queue is full."""


class Interrupted(Exception):
    """A generation stopped by /sdapi/v1/interrupt, after `step` of `total` steps."""

    def __init__(self, step: int, total: int):
        super().__init__(f"interrupted by /sdapi/v1/interrupt after step {step} of {total}")
        self.step, self.total = step, total


class _HttpError(HTTPException):
    """An answer other than 200: (status, message, extra headers). An HTTPException, so that
    FastAPI lets one raised while it reads a body (413) through to the handler."""


class ErrorMessage(BaseModel):
    message: str
    type: str = "invalid_request_error"


class ErrorBody(BaseModel):
    """Every answer other than 200: OpenAI's error shape, and "detail" as A1111 clients read it."""

    error: ErrorMessage
    detail: str


ERRORS = {400: {"model": ErrorBody, "description": "A bad request: one line naming the field"},
          401: {"model": ErrorBody, "description": "Missing or wrong API key (with --api-key)"},
          413: {"model": ErrorBody, "description": f"Body over MAX_BODY_BYTES ({MAX_BODY_BYTES // 2**20} MB)"}}
GENERATION_ERRORS = {409: {"model": ErrorBody, "description": "Stopped by /sdapi/v1/interrupt"},
                     503: {"model": ErrorBody, "description": "Queue full: retry after Retry-After seconds"}}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    # OpenAI's error shape; A1111 clients read "detail".
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"},
                         "detail": message}, status_code=status, headers=headers)


def _b64_png(image: Image.Image) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def decode_image(value: str, what: str, background: tuple[int, int, int] = INIT_BACKGROUND) -> Image.Image:
    """A base64 image (plain, or a data: URL as browsers make them) as the runtime reads images."""
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what}: not valid base64") from None
    return load_image(data, what, background, max_pixels=MAX_UPLOAD_PIXELS)


def openai_mask(data: bytes) -> Image.Image:
    """OpenAI's edit mask (transparent where to edit) as sdonnx's (white = repaint)."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > MAX_UPLOAD_PIXELS:
                raise InputError(f"mask is {opened.width}x{opened.height}, over {MAX_UPLOAD_PIXELS:,} pixels")
            alpha = np.asarray(ImageOps.exif_transpose(opened).convert("RGBA"))[..., 3]
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"mask cannot be read as an image ({e})") from None
    if not (alpha == 0).any():
        raise InputError("mask: no transparent pixel; OpenAI's masks are transparent (alpha 0) where to edit")
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")


def _known_sampler(name: str | None) -> str | None:
    if name:
        find_sampler(name)
    return name


def _known_scheduler(name: str | None) -> str | None:
    if name and name.strip().lower() not in A1111_SCHEDULERS:
        raise ValueError(f"sdonnx has no scheduler {name!r}; it has Automatic and Karras")
    return name


def _sides(size: str) -> tuple[int, int]:
    """(width, height) of OpenAI's "WIDTHxHEIGHT"; ValueError when it is not that."""
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected WIDTHxHEIGHT such as 512x512, got {size!r}") from None
    return width, height


def _size(value: str | None) -> str | None:
    if value is None or value == "auto":
        return value
    width, height = _sides(value)
    if not (8 <= width <= MAX_SIDE and 8 <= height <= MAX_SIDE):
        raise ValueError(f"{value} is outside 8..{MAX_SIDE} per side")
    return value


def _b64_json_only(value: str | None) -> str | None:
    if value not in (None, "b64_json"):
        raise ValueError("only b64_json is served (no URLs: nothing is stored)")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("required: describe the picture")
    return value


def _not_done(what: str, *off) -> AfterValidator:
    """A field whose other values change the picture in a way sdonnx does not implement."""
    def check(value):
        if value is not None and value not in off:
            raise ValueError(f"sdonnx does not do {what}; send {json.dumps(off[0])} or leave it out")
        return value

    return AfterValidator(check)


Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS,
                              description=f"At most {MAX_PROMPT_CHARS} characters (MAX_PROMPT_CHARS).")]
SamplerName = Annotated[str, Field(max_length=100), AfterValidator(_known_sampler)]


class _Request(BaseModel):
    # NaN and Infinity parse as JSON numbers in Python; no setting takes them.
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")


class A1111Request(_Request):
    """The fields /sdapi/v1/txt2img and /sdapi/v1/img2img share, with AUTOMATIC1111's names.

    Unset steps, cfg_scale and sampler take the model's recommended settings (sdonnx.json
    "defaults", else 20, 7.5, Euler); unset width and height its native size. n_iter batches
    of batch_size run one after another; image j of the request uses seed + j, as in A1111.
    eta is used by the samplers that take it (DDIM, Euler a, DPM++ 2M SDE) and, as in A1111,
    ignored by the others. Fields A1111 has that change nothing here (save_images,
    do_not_save_*, override_settings_restore_afterwards, hr_* without enable_hr, ...) and
    unknown fields are ignored; a field asking for something that would change the picture
    and that sdonnx does not do (styles, variation seeds, face restoration, tiling, s_churn,
    scripts ...) gets 400. override_settings follow /sdapi/v1/options.
    """

    prompt: Prompt = ""
    negative_prompt: Prompt = ""
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Default: the model's.")
    cfg_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description="Default: the model's.")
    seed: int = Field(-1, ge=-1, le=SEED_LIMIT, description="-1: a random seed (reported in info).")
    sampler_name: SamplerName | None = Field(None, description="A1111's label (Euler a, DPM++ 2M Karras ...).")
    sampler_index: SamplerName | None = Field(None, description="A1111's older name for sampler_name.")
    scheduler: Annotated[str | None, Field(max_length=100), AfterValidator(_known_scheduler)] = Field(
        None, description="Automatic (the model's schedule) or Karras.")
    width: int | None = Field(None, ge=8, le=MAX_SIDE, description="Default: the model's native size.")
    height: int | None = Field(None, ge=8, le=MAX_SIDE)
    batch_size: int = Field(1, ge=1, le=MAX_BATCH, description="Images per batch, generated together.")
    n_iter: int = Field(1, ge=1, le=MAX_ITER, description="Batches, generated one after another.")
    eta: float | None = Field(None, ge=0, le=1, description="Noise share for DDIM, Euler a, DPM++ 2M SDE.")
    send_images: bool = Field(True, description="False: answer without the images.")
    override_settings: dict[str, Any] = Field({}, description="As POST /sdapi/v1/options.")
    styles: Annotated[list[str], _not_done("saved styles (put their text in the prompt)", [])] = []
    subseed: int = Field(-1, description="Unused: variation seeds are not done.")
    subseed_strength: Annotated[float, _not_done("variation seeds (subseed_strength)", 0)] = 0
    seed_resize_from_h: Annotated[int, _not_done("seed resizing", -1, 0)] = -1
    seed_resize_from_w: Annotated[int, _not_done("seed resizing", -1, 0)] = -1
    restore_faces: Annotated[bool | None, _not_done("face restoration", False)] = None
    tiling: Annotated[bool | None, _not_done("tiling", False)] = None
    s_churn: Annotated[float | None, _not_done("s_churn", 0)] = None
    s_noise: Annotated[float | None, _not_done("s_noise", 1)] = None
    s_min_uncond: Annotated[float | None, _not_done("s_min_uncond", 0)] = None
    refiner_checkpoint: Annotated[str | None, _not_done("refiners", "")] = None
    script_name: Annotated[str | None, _not_done("scripts", "")] = None
    alwayson_scripts: Annotated[dict[str, Any], _not_done("scripts (alwayson_scripts)", {})] = {}

    def sampler_and_schedule(self, default: str) -> tuple[str, str]:
        name = self.sampler_name or self.sampler_index
        sampler, karras = find_sampler(name) if name else (default, False)
        if (self.scheduler or "").strip().lower() == "karras":
            karras = True
        return sampler, "karras" if karras else "default"


class Txt2ImgRequest(A1111Request):
    """POST /sdapi/v1/txt2img. Hires fix (enable_hr) is not done: 400."""

    enable_hr: Annotated[bool, _not_done("hires fix (enable_hr)", False)] = False


class Img2ImgRequest(A1111Request):
    """POST /sdapi/v1/img2img: one init image; with a mask (white = repaint), an inpainting model.

    resize_mode 0 (A1111's default) stretches the init image to width x height, 1 scales it to
    cover and crops the centre; 2 and 3 get 400. Without width and height the init image's own
    size, rounded down to what the model takes, is used. sdonnx inpaints as diffusers does: the
    whole picture, with the mask as it is (no blur), from the original image under the noise
    (A1111's "original" fill); A1111's other choices get 400 when a mask is sent (it defaults
    to inpaint_full_res true, mask_blur 4, inpainting_fill 0: send false, 0, 1).
    """

    init_images: list[str] = Field(min_length=1, max_length=1, description="One base64 image.")
    denoising_strength: float = Field(0.75, ge=0, le=1)
    mask: Annotated[str | None, AfterValidator(lambda v: v or None)] = Field(
        None, description="A base64 image, white = repaint (inpainting models); empty: none.")
    resize_mode: Annotated[int, _not_done("resize modes 2 and 3 (fill, latent upscale)", 0, 1)] = 0
    inpainting_mask_invert: Literal[0, 1] = Field(0, description="1: black = repaint.")
    inpaint_full_res: bool | None = Field(None, description="Only false: the whole picture is inpainted.")
    mask_blur: int | None = Field(None, description="Only 0: the mask is used as it is.")
    inpainting_fill: int | None = Field(None, description="Only 1 (original).")
    initial_noise_multiplier: Annotated[float | None, _not_done("initial_noise_multiplier", 1)] = None

    @model_validator(mode="after")
    def _inpainting_as_sdonnx_does(self) -> "Img2ImgRequest":
        if self.mask is not None:
            for name, off, what in (("inpaint_full_res", False, "inpainting only the masked area"),
                                    ("mask_blur", 0, "mask blur"),
                                    ("inpainting_fill", 1, "inpainting fills other than 1 (original)")):
                if getattr(self, name) not in (None, off):
                    raise ValueError(f"{name}: sdonnx does not do {what}; send {json.dumps(off)} or leave it out")
        return self


class ImagesRequest(_Request):
    """POST /v1/images/generations, OpenAI's names, plus sdonnx's own settings.

    model is accepted and ignored (one model per server); response_format can only be b64_json.
    steps, guidance and sampler default to the model's; eta for a sampler without it gets 400.
    """

    prompt: Annotated[Prompt, AfterValidator(_not_blank)]
    n: int = Field(1, ge=1, le=MAX_BATCH)
    size: Annotated[str | None, Field(max_length=20), AfterValidator(_size)] = Field(
        None, description="WIDTHxHEIGHT in the model's multiples, or auto; default: its native size.")
    response_format: Annotated[str | None, AfterValidator(_b64_json_only)] = Field(
        "b64_json", json_schema_extra={"enum": ["b64_json"]})
    model: str | None = Field(None, max_length=200, description="Ignored: the server has one model.")
    negative_prompt: Prompt = ""
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE)
    seed: int = Field(-1, ge=-1, le=SEED_LIMIT, description="-1: a random seed (reported per image).")
    sampler: SamplerName | None = Field(None, description="euler, euler_a, ... or A1111's label.")
    schedule: Literal["default", "karras"] = "default"
    eta: float | None = Field(None, ge=0, le=1, description="Only for ddim, euler_a, dpmpp_2m_sde.")


class EditRequest(ImagesRequest):
    """POST /v1/images/edits (multipart/form-data, as OpenAI's API and the openai package send it).

    With a mask (OpenAI's convention: its transparent pixels are where to edit) an inpainting
    model repaints it; without one, img2img at `strength` (default EDIT_STRENGTH, 0.75).
    Without size, the image's own size, rounded down to what the model takes.
    """

    image: UploadFile = Field(description="The picture to edit (PNG, JPEG, WebP ...).")
    mask: UploadFile | None = Field(None, description="Transparent (alpha 0) where to edit; same size.")
    strength: float | None = Field(None, ge=0, le=1, description=f"Default: {EDIT_STRENGTH} without a mask, "
                                                                 "1 (the masked area from noise) with one.")


@dataclass
class Job:
    """One request's generation settings, run `runs` times (A1111's n_iter) with consecutive
    seeds; the worker fills `images` or `error`, then settles `done`, a future of the request's
    event loop, so a waiting request holds no thread."""

    settings: dict
    done: asyncio.Future
    runs: int = 1
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
    made there after the next step (at most one per step, whatever the polling rate; TAESD or
    a linear map, never the full VAE), so no execution provider is ever entered from two threads.
    """

    def __init__(self, pipe: Pipeline, max_queue: int = MAX_QUEUE, options: dict | None = None):
        # The server's own generate() options, the same for every request (cache_interval,
        # watermark, safety_checker).
        self.pipe, self.options = pipe, options or {}
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.lock = threading.Lock()
        self.step = self.total = 0
        self.batch = 0  # of the running job's n_iter
        self.started = 0.0
        self.preview: str | None = None
        self.preview_wanted = threading.Event()
        self.running: Job | None = None
        self.interrupt = threading.Event()
        self.completed = 0
        self.thread = threading.Thread(target=self._loop, name="sdonnx-worker", daemon=True)
        self.thread.start()

    def submit(self, settings: dict, runs: int = 1) -> Job:
        """Queue a generation; called on the event loop that will await `job.done`."""
        job = Job(settings, asyncio.get_running_loop().create_future(), runs)
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
                self.batch = 0
                self.started = time.monotonic()
                self.interrupt.clear()
            try:
                for batch in range(job.runs):
                    with self.lock:
                        self.batch, self.step = batch, 0
                    seed = job.settings["seed"] + batch * job.settings["n"]
                    job.images += self.pipe.generate(**{**job.settings, "seed": seed}, on_step=self._on_step,
                                                     **self.options)
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
        # At most one preview per step, only when a poll asked for one since the last, and
        # never the full VAE: TAESD or the linear latent-to-RGB map (Pipeline.preview).
        # With the safety checker no preview is made: it would show the picture before the
        # checker sees it.
        if self.preview_wanted.is_set() and step < total and not self.options.get("safety_checker"):
            self.preview_wanted.clear()
            try:
                preview = _b64_png(self.pipe.preview(denoised))
            except Exception:  # a preview that cannot be made never stops the generation
                preview = None
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
            running, step, total, image, batch = self.running, self.step, self.total, self.preview, self.batch
            elapsed = time.monotonic() - self.started
        if preview and running:
            self.preview_wanted.set()
        fraction = (batch + step / total) / running.runs if running and total else 0.0
        return {
            "progress": fraction,
            "eta_relative": elapsed / fraction - elapsed if fraction > 0 else 0.0,
            "state": {"job_count": self.jobs.qsize() + (1 if running else 0), "sampling_step": step,
                      "sampling_steps": total, "interrupted": self.interrupt.is_set(),
                      "job": "generating" if running else "", "job_no": batch if running else 0},
            "current_image": image if preview and running else None,
            "textinfo": f"step {step} of {total}" if running else None,
        }


def _random_seed(seed: int) -> int:
    """A concrete seed for -1, drawn as the runtime draws it, so n_iter batches can continue it."""
    return random_seed() if seed == -1 else seed


def _checked_size(pipe: Pipeline, width: int, height: int) -> tuple[int, int]:
    """The size to generate, whether asked for or taken from an init image: the model's
    multiples, at most MAX_SIDE per side (what one worker can hold without running out)."""
    m = pipe.size_multiple
    if not (8 <= width <= MAX_SIDE and 8 <= height <= MAX_SIDE):
        raise InputError(f"{width}x{height} is outside 8..{MAX_SIDE} pixels per side (an init image's own size "
                         f"counts when no size is given: send width and height)")
    if width % m or height % m:
        raise InputError(f"width and height must be multiples of {m} for this model; got {width}x{height}")
    return width, height


def _needs_right_model(pipe: Pipeline, mask: bool, field_name: str) -> None:
    """Refused before queueing, with the API's field names, what Pipeline.generate would refuse."""
    if mask and not pipe.is_inpainting:
        raise InputError(f"{field_name}: a mask needs an inpainting model; {pipe.name} is not one "
                         f"(leave the mask out for img2img)")
    if not mask and pipe.is_inpainting:
        raise InputError(f"{pipe.name} is an inpainting model: send a {field_name} (white = repaint)")


def a1111_options(pipe: Pipeline) -> dict:
    """A1111's settings that change pictures, at the values sdonnx generates with."""
    return {"sd_model_checkpoint": pipe.name, "sd_checkpoint_hash": None, "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0, "eta_ancestral": 1.0, "eta_noise_seed_delta": 0,
            "s_churn": 0.0, "s_tmin": 0.0, "s_noise": 1.0, "s_min_uncond": 0.0,
            "img2img_background_color": "#ffffff", "samples_format": "png"}


def check_options(pipe: Pipeline, options: dict, where: str) -> None:
    """Setting an option GET /sdapi/v1/options reports to another value is 400 (one model per
    server, fixed settings); other keys (saving, UI, extensions) change no picture and are ignored."""
    fixed = a1111_options(pipe)
    for key, value in options.items():
        if key not in fixed or value == fixed[key]:
            continue
        if key == "sd_model_checkpoint":
            raise InputError(f"{where}: sd_model_checkpoint {str(value)[:100]!r}: this server serves one "
                             f"model, {pipe.name!r}; start another `sdonnx serve --model` for another")
        raise InputError(f"{where}: {key} is fixed at {fixed[key]!r} in sdonnx, got {str(value)[:100]!r}")


def _settings(pipe: Pipeline, prompt: str, negative_prompt: str, steps: int | None, guidance: float | None,
              seed: int, sampler: str, schedule: str, n: int) -> dict:
    """Pipeline.generate's common keyword arguments, the model's defaults where unset."""
    return {"prompt": prompt, "negative_prompt": negative_prompt,
            "steps": pipe.defaults.steps if steps is None else steps,
            "guidance": pipe.defaults.guidance if guidance is None else guidance,
            "seed": _random_seed(seed), "sampler": sampler, "schedule": schedule, "n": n}


def a1111_settings(pipe: Pipeline, request: A1111Request) -> dict:
    """Pipeline.generate keyword arguments for an A1111 request."""
    check_options(pipe, request.override_settings, "override_settings")
    sampler, schedule = request.sampler_and_schedule(pipe.defaults.sampler)
    settings = _settings(pipe, request.prompt, request.negative_prompt, request.steps, request.cfg_scale,
                         request.seed, sampler, schedule, request.batch_size)
    if request.eta is not None and "eta" in SAMPLERS[sampler].options:  # A1111 ignores it elsewhere
        settings["eta"] = request.eta
    if not isinstance(request, Img2ImgRequest) and pipe.is_inpainting:
        raise InputError(f"{pipe.name} is an inpainting model: use /sdapi/v1/img2img with a mask")
    width, height = request.width, request.height
    if isinstance(request, Img2ImgRequest):
        _needs_right_model(pipe, request.mask is not None, "mask")
        init = decode_image(request.init_images[0], "init_images[0]")
        mask = None if request.mask is None else decode_image(request.mask, "mask", MASK_BACKGROUND)
        if mask is not None and request.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        own_width, own_height = default_size(init, pipe.size_multiple)
        width, height = width or own_width, height or own_height
        if request.resize_mode == 0:  # A1111's "Just resize"; the runtime's own fit is mode 1
            init = init.resize((width, height), Image.Resampling.LANCZOS)
            mask = None if mask is None else mask.resize((width, height), Image.Resampling.LANCZOS)
        settings.update(init_image=init, strength=request.denoising_strength)
        if mask is not None:
            settings["mask_image"] = mask
    settings["width"], settings["height"] = _checked_size(pipe, width or pipe.native_size,
                                                          height or pipe.native_size)
    return settings


def openai_settings(pipe: Pipeline, request: ImagesRequest) -> dict:
    """Pipeline.generate keyword arguments for an OpenAI request (without its images)."""
    sampler, karras = find_sampler(request.sampler) if request.sampler else (pipe.defaults.sampler, False)
    settings = _settings(pipe, request.prompt, request.negative_prompt, request.steps, request.guidance,
                         request.seed, sampler, "karras" if karras else request.schedule, request.n)
    if request.eta is not None:
        settings["eta"] = request.eta
    if request.size not in (None, "auto"):
        settings["width"], settings["height"] = _checked_size(pipe, *_sides(request.size))
    elif not isinstance(request, EditRequest):
        settings["width"] = settings["height"] = pipe.native_size
    return settings


def validation_message(errors: list[dict]) -> str:
    """pydantic's first complaint as one line naming the field: "cfg_scale: Input should be ..."."""
    error = errors[0]
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "json_invalid":
        return f"malformed JSON: {ctx.get('error', error['msg'])}"
    place = ""
    for part in error["loc"][1:]:  # after "body" or "query"
        place += f"[{part}]" if isinstance(part, int) else f"{'.' if place else ''}{part}"
    if kind == "value_error":
        text = str(ctx.get("error", error["msg"]))
    elif kind == "missing":
        text = "required"
    elif kind == "string_too_long":
        text = f"at most {ctx['max_length']} characters, got {len(error['input'])}"
    else:
        text = error["msg"]
        value = error.get("input")
        if isinstance(value, (int, float, str)) and len(repr(value)) <= 40:
            text += f", got {value!r}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if place:
        return f"{place}: {text}{more}"
    if kind in ("missing", "model_attributes_type", "dict_type", "model_type"):
        return "the body must be a JSON object (Content-Type: application/json)"
    return f"{text}{more}"  # a check across fields names them itself


def authorized(header: str, api_key: str | None) -> bool:
    if api_key is None:
        return True
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


class Guard:
    """ASGI middleware in front of every endpoint, /docs included: the API key, then the body
    size limit, at once from Content-Length, and while the body is read when it has none
    (chunked): FastAPI reads bodies itself, through `receive`."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        too_large = f"request body over {self.max_body // 2**20} MB"
        if not authorized(request.headers.get("authorization", ""), self.api_key):
            response = error_response(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                      {"WWW-Authenticate": 'Basic realm="sdonnx"'})
            return await response(scope, receive, send)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await error_response(413, too_large)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise _HttpError(413, too_large)
            return message

        await self.app(scope, counted, send)


def create_app(pipe: Pipeline, api_key: str | None = None, max_queue: int = MAX_QUEUE,
               max_body: int = MAX_BODY_BYTES, cache_interval: int = 1, watermark: bool | str = False,
               safety_checker: bool = False):
    """The ASGI app serving `pipe`; `cache_interval` > 1: every request runs DeepCache
    (Pipeline.generate), the folder checked here (InputError when it cannot); `watermark`
    True or a text: every image carries the invisible watermark (Pipeline.generate), and a
    request for an image under 256x256 gets 400; `safety_checker`: every image is checked,
    flagged ones blacked out, and answers carry `nsfw_content_detected` (a bool per image in
    OpenAI's data items, a list in A1111's info), as diffusers names it."""
    if safety_checker and not pipe.has_safety_checker:
        raise InputError(f"{pipe.name} has no safety checker to serve with")
    if cache_interval > 1:
        pipe.use_deep_cache()
    pipe.watermark_text(watermark)  # an empty text, or PyWavelets missing
    if not importlib.util.find_spec("python_multipart"):
        raise InputError(f"sdonnx serve needs python-multipart (for /v1/images/edits): {install_hint('serve')}")
    app = FastAPI(title="sdonnx", version="0.1.0", redoc_url=None,
                  description="One Stable Diffusion model behind OpenAI's images API and AUTOMATIC1111's "
                              "/sdapi/v1. Errors: 400 with a one-line message, 413 body over "
                              f"{max_body // 2**20} MB, 503 queue full (Retry-After), 409 interrupted.",
                  responses=ERRORS)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    worker = Worker(pipe, max_queue, {"cache_interval": cache_interval, "watermark": watermark,
                                      "safety_checker": safety_checker})
    app.state.worker = worker

    async def run(settings: dict, runs: int = 1) -> list[Image.Image]:
        names = ("prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height", "sampler",
                 "n", "schedule", "eta", "strength")
        GenerationConfig(**{k: settings[k] for k in names if k in settings}).validate()
        try:
            job = worker.submit(settings, runs)
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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return error_response(400, validation_message(list(e.errors())))

    @app.exception_handler(SdonnxError)
    async def bad_input(request: Request, e: SdonnxError):
        return error_response(400, str(e))

    @app.exception_handler(Exception)
    async def fault(request: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
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

    def checked(image: Image.Image) -> dict:
        return {"nsfw_content_detected": image.info["nsfw_content_detected"]} if safety_checker else {}

    def openai_answer(settings: dict, images: list[Image.Image]) -> dict:
        return {"created": int(time.time()),
                "data": [{"b64_json": _b64_png(im), "revised_prompt": settings["prompt"],
                          "seed": im.info["seed"], **checked(im)} for im in images]}

    @app.post("/v1/images/generations", responses=GENERATION_ERRORS)
    async def openai_generations(request: ImagesRequest):
        if pipe.is_inpainting:
            raise InputError(f"{pipe.name} is an inpainting model: use /v1/images/edits with a mask")
        settings = openai_settings(pipe, request)
        return openai_answer(settings, await run(settings))

    @app.post("/v1/images/edits", responses=GENERATION_ERRORS)
    async def openai_edits(request: Annotated[EditRequest, File()]):  # File: multipart/form-data
        settings = openai_settings(pipe, request)
        _needs_right_model(pipe, request.mask is not None, "mask")
        settings["init_image"] = load_image(await request.image.read(), "image", max_pixels=MAX_UPLOAD_PIXELS)
        if request.mask is not None:
            settings["mask_image"] = openai_mask(await request.mask.read())
        if "width" not in settings:
            own = default_size(settings["init_image"], pipe.size_multiple)
            settings["width"], settings["height"] = _checked_size(pipe, *own)
        default = EDIT_STRENGTH if request.mask is None else 1.0
        settings["strength"] = default if request.strength is None else request.strength
        return openai_answer(settings, await run(settings))

    async def a1111(request: A1111Request) -> dict:
        settings = a1111_settings(pipe, request)
        images = await run(settings, request.n_iter)
        seeds = [im.info["seed"] for im in images]
        info = {
            "prompt": settings["prompt"], "all_prompts": [settings["prompt"]] * len(images),
            "negative_prompt": settings["negative_prompt"],
            "all_negative_prompts": [settings["negative_prompt"]] * len(images),
            "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(images),
            "width": images[0].width, "height": images[0].height,
            "sampler_name": SAMPLERS[settings["sampler"]].label,
            "scheduler": "Karras" if settings["schedule"] == "karras" else "Automatic",
            "cfg_scale": settings["guidance"], "steps": settings["steps"], "eta": settings.get("eta"),
            "batch_size": request.batch_size, "n_iter": request.n_iter, "sd_model_name": pipe.name,
            "denoising_strength": settings.get("strength"),
            "infotexts": [im.info["parameters"] for im in images], "version": "sdonnx 0.1.0",
            **({"nsfw_content_detected": [im.info["nsfw_content_detected"] for im in images]}
               if safety_checker else {}),
        }
        parameters = request.model_dump(exclude={"init_images", "mask"})
        return {"images": [_b64_png(im) for im in images] if request.send_images else [],
                "parameters": parameters, "info": json.dumps(info)}

    @app.post("/sdapi/v1/txt2img", responses=GENERATION_ERRORS)
    async def txt2img(request: Txt2ImgRequest):
        return await a1111(request)

    @app.post("/sdapi/v1/img2img", responses=GENERATION_ERRORS)
    async def img2img(request: Img2ImgRequest):
        return await a1111(request)

    @app.get("/sdapi/v1/options")
    async def get_options():
        """A1111's settings that change pictures, fixed in sdonnx; sd_model_checkpoint names the model."""
        return a1111_options(pipe)

    @app.post("/sdapi/v1/options")
    async def set_options(options: dict[str, Any]):
        """Accepts the values GET reports (the same model name included) and ignores other keys;
        another value of a reported setting, another model above all, gets 400."""
        check_options(pipe, options, "options")
        return a1111_options(pipe)

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        return worker.progress(not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        return {"interrupted": worker.stop_current()}

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": s.label, "aliases": [key], "options": {}} for key, s in SAMPLERS.items()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False},
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                 "need_inner_model": False}]

    @app.get("/sdapi/v1/loras")
    async def loras():
        # AUTOMATIC1111's list of the LoRA folder; file names only, no paths leave the server.
        return [{"name": name, "alias": name, "path": path.name, "metadata": {}}
                for name, path in sorted(adapters.find_files(pipe.config.lora_dir).items())]

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        return None  # the folder is read at every request

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        loaded, skipped = {}, {}
        for name, path in sorted(adapters.find_files(pipe.config.embeddings_dir, adapters.EMBEDDING_SUFFIXES).items()):
            try:
                e = pipe.adapters.read(path, adapters.read_embedding)
            except SdonnxError as error:
                skipped[name] = {"error": str(error)}
                continue
            loaded[name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                            "shape": int(e.vectors.shape[1]), "vectors": int(e.vectors.shape[0])}
        return {"loaded": loaded, "skipped": skipped}

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        # The model's name only: no file-system path leaves the server.
        return [{"title": pipe.name, "model_name": pipe.name, "hash": None, "sha256": None,
                 "filename": pipe.name, "config": None}]

    def openapi() -> dict:
        # Validation errors are answered 400 (ERRORS), never FastAPI's 422.
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi
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


def serve(pipe: Pipeline, sock: socket.socket, api_key: str | None, max_queue: int, cache_interval: int = 1,
          watermark: bool | str = False, safety_checker: bool = False) -> None:
    import uvicorn

    config = uvicorn.Config(create_app(pipe, api_key, max_queue, cache_interval=cache_interval, watermark=watermark,
                                       safety_checker=safety_checker),
                            log_level="warning",
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
