"""`sdonnx batch`: a file of jobs (JSON Lines) -> images, resumable, here or on a Ray cluster.

Each line of the jobs file is one JSON object, a job: {"prompt": "...", "seed": 7, "steps": 20,
"size": "512x512", ...} with `sdonnx generate`'s settings (JOB_FIELDS). Every line is read and
checked before anything runs; bad ones are reported with their line numbers.

A job draws `n` images (default 1), image i with seed + i, each as `sdonnx generate` draws it
with the same settings. Image files are named for their job: "NAME.png" (with n > 1,
"NAME-i.png") for a job with a "name", else "LLLLL-SEED.png" after its line number. A job
without a seed gets one derived from its name and settings (`derived_seed`), so that a re-run
asks for the same pictures.

Exactly once on the output: only the process that reads the jobs file writes. Every image goes
to a temporary name and is hard-linked into place (output.save_encoded), then its line is
appended to `results.jsonl` and flushed to disk. A re-run of the same command skips every image
that exists with its line; an image whose line was lost (the process died between the two)
gets its line back; a line whose image is gone is dropped and the image drawn again. An image
on disk that another job's settings made is never overwritten: the run is refused.

This module does not import Ray; cli/cluster.py runs the same `Drawer`s as Ray actors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from sdonnx.cli import output
from sdonnx.runtime.checks import check_number, is_int, parse_size
from sdonnx.runtime.errors import InputError

RESULTS = "results.jsonl"
LOCK = ".sdonnx-batch.lock"
JOB_CHUNK = "sdonnx-job"  # the PNG text chunk holding the image's job, for recovering its line
SCHEDULES = {"default": "default", "automatic": "default", "karras": "karras"}  # A1111's names too
MAX_IMAGES_PER_JOB = 64  # `sdonnx generate -n`'s bound
# A job's fields, and the other names (A1111's, the CLI's) that mean the same.
JOB_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "size", "sampler",
              "schedule", "eta", "n", "name")
ALIASES = {"negative": "negative_prompt", "cfg_scale": "guidance", "sampler_name": "sampler",
           "scheduler": "schedule", "batch_size": "n"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RAY_ADDRESS = re.compile(r"(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):\d{1,5}")


def check_ray_address(value: str) -> str:
    """`--ray`'s value: auto, local, or a cluster's HOST:PORT (ray://HOST:PORT for Ray Client);
    InputError for anything else, before Ray is imported."""
    if value in ("auto", "local") or RAY_ADDRESS.fullmatch(value):
        return value
    raise InputError(f"--ray takes auto, local, or the head node's HOST:PORT (such as 10.0.0.5:6379), got {value!r}")


@dataclass(frozen=True)
class Task:
    """One image to draw: `file` inside the output folder, from line `line` of the jobs file.

    `request` is the image's job as read (seed made concrete, unset fields None): results.jsonl
    records it and a re-run compares it. `settings` are Pipeline.generate's keyword arguments
    for this one image (n = 1; steps, guidance and sampler left to the model when unset)."""

    line: int
    file: str
    request: dict
    settings: dict


@dataclass(frozen=True)
class Drawn:
    """A drawn image: its PNG file's bytes (parameters inside) and its results.jsonl record."""

    file: str
    png: bytes
    record: dict


def derived_seed(name: str, job: dict) -> int:
    """A 32-bit seed (as A1111 draws them) fixed by a job's name and settings: a job without a
    seed draws the same picture on every run, and two identical lines draw different ones."""
    text = json.dumps([name, job], sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % (2**32 - 1)


def parse_job(text: str, line: int) -> list[Task]:
    """The images of one line of a jobs file; InputError naming what is wrong."""
    from sdonnx.runtime.pipeline import Defaults, GenerationConfig, find_sampler

    try:
        job = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(job, dict):
        raise InputError("a job is a JSON object such as {\"prompt\": \"a red circle\", \"seed\": 1}")
    given: dict = {}
    for key, value in job.items():
        name = ALIASES.get(key, key)
        if name not in JOB_FIELDS:
            raise InputError(f"unknown field {key!r}; a job takes: {', '.join(JOB_FIELDS)}")
        if name in given:
            raise InputError(f"{key!r} is given twice (as {name!r} and an alias)")
        given[name] = value
    if not isinstance(given.get("prompt"), str) or not given["prompt"].strip():
        raise InputError("\"prompt\" is required: the text of what to draw")
    if "size" in given:
        if "width" in given or "height" in given:
            raise InputError("give \"size\" or \"width\" and \"height\", not both")
        given["width"], given["height"] = parse_size(given.pop("size"), '"size"')
    for key in ("steps", "width", "height", "n"):
        if key in given and not is_int(given[key]):
            raise InputError(f"{key!r} must be a whole number, got {given[key]!r}")
    if isinstance(given.get("schedule"), str):
        if given["schedule"].strip().lower() not in SCHEDULES:
            raise InputError(f"unknown schedule {given['schedule']!r}; choose default (A1111's Automatic) or karras")
        given["schedule"] = SCHEDULES[given["schedule"].strip().lower()]
    if isinstance(given.get("sampler"), str):
        try:
            given["sampler"], karras = find_sampler(given["sampler"])
        except ValueError as e:
            raise InputError(str(e)) from None
        if karras and given.get("schedule", "karras") != "karras":
            raise InputError(f"sampler {job.get('sampler', job.get('sampler_name'))!r} names Karras sigmas but the "
                             f"schedule is {given['schedule']!r}; leave out one of them")
        if karras:
            given["schedule"] = "karras"
    n = given.pop("n", 1)
    if not 1 <= n <= MAX_IMAGES_PER_JOB:
        raise InputError(f"\"n\" (images of this job) must be 1 to {MAX_IMAGES_PER_JOB}, got {n}")
    name = given.pop("name", None)
    if name is not None and not (isinstance(name, str) and NAME.fullmatch(name)):
        raise InputError(f"\"name\" must be a file name of letters, digits, '.', '_' and '-' "
                         f"(at most 100, no folders), got {name!r}")
    seed = given.pop("seed", None)
    if seed is None or seed == -1:
        seed = derived_seed(name or f"{line:05d}", given)
    fallback = Defaults()  # the model's own defaults fill unset fields when the image is drawn
    try:
        GenerationConfig(given["prompt"], given.get("negative_prompt", ""), given.get("steps", fallback.steps),
                         given.get("guidance", fallback.guidance), seed, given.get("width"), given.get("height"),
                         given.get("sampler", fallback.sampler), n, given.get("schedule", "default"),
                         given.get("eta") if "sampler" in given else None).validate()
    except TypeError as e:
        raise InputError(f"a field has the wrong type: {e}") from None
    if given.get("eta") is not None:  # its sampler may be the model's default; its range is known now
        check_number("eta", given["eta"], 0, 1)
    if seed + n - 1 >= 2**63:
        raise InputError(f"seed {seed} + {n} images passes 2^63 - 1")
    tasks = []
    for i in range(n):
        request = {"prompt": given["prompt"], "negative_prompt": given.get("negative_prompt", ""),
                   "seed": seed + i, **{key: given.get(key) for key in
                                       ("steps", "guidance", "width", "height", "sampler", "schedule", "eta")}}
        stem = (name if n == 1 else f"{name}-{i}") if name else f"{line:05d}-{seed + i}"
        settings = {key: value for key, value in request.items() if value is not None}
        tasks.append(Task(line, f"{stem}.png", request, settings))
    return tasks


def read_jobs(path: Path) -> tuple[list[Task], list[str]]:
    """(every image of the jobs file, one message per bad line: "line N: what is wrong").

    Blank lines are skipped; two images of the same file name are refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"jobs file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder; give a jobs file (one JSON object per line)") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; a jobs file has one JSON object per line") from None
    tasks: list[Task] = []
    errors: list[str] = []
    owner: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            found = parse_job(line, number)
        except InputError as e:
            errors.append(f"line {number}: {e}")
            continue
        for task in found:
            if task.file in owner:
                errors.append(f"line {number}: {task.file} is also line {owner[task.file]}'s image; "
                              "give each job its own \"name\"")
                break
            owner[task.file] = number
        else:
            tasks += found
    if not tasks and not errors:
        raise InputError(f"{path} holds no jobs; write one JSON object per line, such as "
                         "{\"prompt\": \"a red circle\", \"seed\": 1}")
    return tasks, errors


class Results:
    """`results.jsonl` in the output folder: one JSON line per image written, appended and
    flushed to disk right after the image is in place."""

    def __init__(self, folder: Path):
        self.path = folder / RESULTS
        # One writer per folder: a second `sdonnx batch` into it would draw the same images.
        # (Windows has no flock; there the hard links alone keep images from being overwritten.)
        self._lock = open(folder / LOCK, "a")
        try:
            import fcntl

            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except BlockingIOError:
            self._lock.close()
            raise InputError(f"another sdonnx batch is writing into {folder}; wait for it, or choose another --out") \
                from None
        self.records: dict[str, dict] = {}
        self.torn = False
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").split("\n")
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    file = record["file"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    if number == len(lines):  # a last line cut short when the writer died
                        self.torn = True
                        continue
                    raise InputError(f"{self.path} line {number} is not a results line of sdonnx batch; "
                                     "choose another --out") from None
                self.records[file] = record

    def plan(self, tasks: list[Task], folder: Path) -> tuple[list[Task], list[Task], list[str]]:
        """(images to draw, images done, files whose line went with their image), or an
        InputError when an image on disk was made by other settings than its job asks now."""
        todo, done, stale = [], [], []
        for task in tasks:
            record = self.records.get(task.file)
            exists = (folder / task.file).exists()
            if exists and record is not None:
                if record.get("job") != task.request:
                    raise InputError(f"{folder / task.file} was drawn from other settings than line {task.line} "
                                     "asks now; it was not overwritten (choose another --out, or move it away)")
                done.append(task)
            elif exists:
                self.recover(task, folder)
                done.append(task)
            else:
                if record is not None:
                    stale.append(task.file)
                todo.append(task)
        if stale or self.torn:
            for file in stale:
                del self.records[file]
            self._rewrite()
        return todo, done, stale

    def recover(self, task: Task, folder: Path) -> None:
        """The line of an image that was placed but not recorded, from the job kept in the PNG
        (JOB_CHUNK); an InputError for a file that is not this job's image."""
        from PIL import Image

        path = folder / task.file
        try:
            with Image.open(path) as image:
                job, parameters = image.info.get(JOB_CHUNK), image.info.get("parameters")
            same = job is not None and json.loads(job) == task.request
        except (OSError, ValueError):
            same = False
        if not same:
            raise InputError(f"{path} exists but is not line {task.line}'s image; it was not overwritten "
                             "(choose another --out, or move it away)")
        self.append({"file": task.file, "line": task.line, "job": task.request, "parameters": parameters,
                     "recovered": True})

    def append(self, record: dict) -> None:
        """Add one image's line, on disk before this returns."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record["file"]] = record

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{RESULTS}.{secrets.token_hex(6)}.tmp")
        try:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records.values()),
                           encoding="utf-8")
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self.torn = False

    def write(self, drawn: Drawn, folder: Path) -> Path:
        """Place the image, then record it: after a crash the image exists with or without its
        line, never the line without its image."""
        path = output.save_encoded(drawn.png, folder / drawn.file)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # the image's name on disk before its line
        finally:
            os.close(directory)
        self.append(drawn.record)
        return path


class Drawer:
    """One loaded Pipeline drawing one image at a time: in this process for a local batch, or
    as a Ray actor (cli/cluster.py), where `load` runs on the worker's node."""

    def __init__(self):
        self.pipe = None
        self.where = f"{socket.gethostname()}:{os.getpid()}"

    def load(self, model: str | None, options: dict) -> dict:
        """Load the model folder `model` (None: the embedded model) with Pipeline.load's
        `options`; returns where it runs and what it loaded (for the run's report)."""
        from sdonnx.runtime import Pipeline

        self.pipe = Pipeline.load(model, **options)
        return {"worker": self.where, "provider": self.pipe.config.provider, "precision": self.pipe.config.precision,
                "model": self.pipe.name}

    def draw(self, task: Task) -> Drawn:
        """The image of `task` as `sdonnx generate` draws it, as PNG bytes with its record."""
        start = time.perf_counter()
        [image] = self.pipe.generate(**task.settings)
        png = output.encode(image, {JOB_CHUNK: json.dumps(task.request, ensure_ascii=False)})
        return Drawn(task.file, png, {
            "file": task.file, "line": task.line, "job": task.request, "seed": image.info["seed"],
            "width": image.width, "height": image.height, "parameters": image.info["parameters"],
            "model": self.pipe.name, "worker": self.where, "seconds": round(time.perf_counter() - start, 3)})


def check_sizes(tasks: list[Task], model: Path) -> list[str]:
    """One message per job whose size the model cannot draw (not a multiple of its UNet's)."""
    from sdonnx.runtime.pipeline import image_sizes

    _, multiple = image_sizes(model)
    bad = {}
    for task in tasks:
        width, height = task.request["width"], task.request["height"]
        if any(side is not None and side % multiple for side in (width, height)):
            bad[task.line] = (f"line {task.line}: {width}x{height} is not a size {model.name} draws: "
                              f"width and height must be multiples of {multiple}")
    return list(bad.values())
