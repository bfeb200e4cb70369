"""The `sdonnx` command line: export once, generate fast, inspect a model folder."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from sdonnx.cli import output
from sdonnx.runtime.errors import InputError, SdonnxError, install_hint
from sdonnx.runtime.checks import MAX_THREADS, check_number, check_size, parse_size
from sdonnx.runtime.pipeline import SAMPLERS, SCHEDULES
from sdonnx.runtime.providers import CHOICES as PROVIDER_CHOICES

try:  # typer 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

app = typer.Typer(
    help="Export Stable Diffusion to ONNX once, then generate images fast without torch.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEFAULT_OUT = Path("outputs")
# Bounds of the command line's counts: past them a run is a typo, not a plan.
MAX_BATCH = 64
MAX_BATCHES = 100_000
SHIP_MODEL_HELP = ("With --ray: send the model folder to the nodes through Ray's object store (default: every node "
                   "reads --model's path, which must hold the same folder).")


def count_of(n: int, noun: str) -> str:
    """The count and its noun: "1 image", "2 images"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def folder_option(option: str, value: str | None) -> Path | None:
    """A folder option's value as a path; InputError for an empty one (a missing folder is
    fine: it just holds nothing)."""
    if value is None:
        return None
    if not value.strip():
        raise InputError(f"{option} is empty; give a folder, or leave the option out for the default")
    return Path(value).expanduser()


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What to draw."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="ONNX model folder (default: the embedded model)."),
    negative: str = typer.Option("", "--negative", help="Negative prompt: what to steer away from."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (default: the model's, else 20)."),
    guidance: Optional[float] = typer.Option(
        None, "--guidance", "-g", help="Classifier-free guidance scale; <= 1 disables it (default: the model's, else 7.5)."),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Seed; -1 or omitted: a random one, as in AUTOMATIC1111. Image i uses seed + i."),
    size: Optional[str] = typer.Option(
        None, "--size", help="WIDTHxHEIGHT in pixels (default: the model's native size); multiples of 64 for SD 1.x "
                             "and 2.x, of 32 for the embedded model (`sdonnx info MODEL` says)."),
    sampler: Optional[str] = typer.Option(
        None, "--sampler", help=f"One of: {', '.join(SAMPLERS)} (default: the model's, else euler)."),
    schedule: str = typer.Option("default", "--schedule",
                                 help=f"Noise schedule: {' or '.join(SCHEDULES)} (Karras et al. 2022 sigmas)."),
    eta: Optional[float] = typer.Option(
        None, "--eta", help="Share of fresh noise per step, 0 to 1, for ddim (default 0), euler_a and dpmpp_2m_sde (default 1)."),
    init_image: Optional[Path] = typer.Option(
        None, "--init-image", help="Start from this image (img2img; default size: the image's own)."),
    strength: Optional[float] = typer.Option(
        None, "--strength", help="With --init-image: how much to change it, 0 to 1 (default 0.75)."),
    mask: Optional[Path] = typer.Option(
        None, "--mask", help="With --init-image and an inpainting model: repaint where the mask is white."),
    depth_map: Optional[Path] = typer.Option(
        None, "--depth-map", help="With --init-image and a depth-to-image model: follow this depth map (an image of the "
                                  "init image's size, brighter = nearer) instead of the one the model estimates."),
    n: int = typer.Option(1, "-n", min=1, max=MAX_BATCH, help="Images per batch."),
    n_iter: int = typer.Option(1, "--n-iter", min=1, max=MAX_BATCHES,
                               help="Batches to run; image j of the run uses seed + j."),
    grid: bool = typer.Option(False, "--grid", help="Also save one grid of all images, a batch per row."),
    out: str = typer.Option(str(DEFAULT_OUT), "--out", "-o",
                             help="Output folder, or a file name ending in .png, .jpg or .webp (parameters in EXIF)."),
    provider: str = typer.Option("auto", "--provider", help=f"One of: {', '.join(PROVIDER_CHOICES)}."),
    precision: str = typer.Option("auto", "--precision",
                                  help="fp32, bf16 (openvino) or auto: bf16 where the provider and CPU do it."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS,
                                          help="CPU threads (default: all physical cores)."),
    low_memory: bool = typer.Option(
        False, "--low-memory", help="Load each part only while it runs, one image at a time; on cpu the UNet as the stages the export cut it into (a few hundred MB of weights each; not with LoRAs), so the peak is one stage's or the VAE's, not the sum (--provider auto then picks cpu over openvino)."),
    vae_tiles: str = typer.Option(
        "auto", "--vae-tiles", help="VAE in pieces of about this side (the one-piece picture on folders sdonnx exported): auto (256-pixel pieces where the VAE has stages and the provider is cpu, else one piece up to the VAE's size, 512 pixels for SD 1.x), off, or a side in pixels (multiple of 32)."),
    lora: Optional[list[str]] = typer.Option(
        None, "--lora", help="A LoRA to apply: FILE[:SCALE], or a name in --lora-dir (repeatable; SCALE default 1)."),
    lora_dir: Optional[str] = typer.Option(
        None, "--lora-dir", help="Where <lora:NAME:SCALE> in a prompt is looked up "
                                 "(default $SDONNX_LORA_DIR, else ~/.local/share/sdonnx/loras)."),
    embeddings_dir: Optional[str] = typer.Option(
        None, "--embeddings-dir", help="Textual-inversion embeddings, used where the prompt names them "
                                       "(default $SDONNX_EMBEDDINGS_DIR, else ~/.local/share/sdonnx/embeddings)."),
    decoder: str = typer.Option(
        "full", "--decoder", help="full (the VAE) or tiny (TAESD: far faster, softer; `sdonnx export --tiny-vae`)."),
    cache_interval: int = typer.Option(
        1, "--cache-interval", min=1, max=20,
        help="DeepCache: run the whole UNet every N-th step and only its shallow branch between (1 = off; 3 takes an SD 1.5 image's UNet time down 1.5-2.3x and changes the picture: see the README's \"step caching\" figures)."),
    safety_checker: bool = typer.Option(
        False, "--safety-checker", help="Run the model's safety checker (a filter, not a guarantee) and black out the "
                                        "images it flags; the folder needs one (exported from a source that has it)."),
    watermark: bool = typer.Option(
        False, "--watermark", help="Embed Stable Diffusion's invisible watermark (DWT, as the invisible-watermark package; "
                                   "the reference scripts' text for the model's family; images of at least 256x256)."),
    watermark_text: Optional[str] = typer.Option(
        None, "--watermark-text", help="Embed this text as the invisible watermark instead (implies --watermark); "
                                       "`sdonnx watermark decode IMAGE --length BITS` reads it."),
    preview: Optional[str] = typer.Option(
        None, "--preview", help="Write a cheap preview of the current estimate to this image file while sampling "
                                "(TAESD when the model has it, else a linear latent-to-RGB map)."),
    preview_every: int = typer.Option(1, "--preview-every", min=1, max=10_000, help="Steps between previews."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print load and per-step times."),
) -> None:
    """Generate images from a prompt and write them as PNGs with their parameters.

    Prompts take AUTOMATIC1111's syntax: (word:1.3), ((word)), \\[word], BREAK, <lora:NAME:SCALE>."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sdonnx.runtime import GenerationConfig, Pipeline, adapters
    from sdonnx.runtime.pipeline import Defaults
    from sdonnx.runtime.grid import image_grid
    from sdonnx.runtime.images import MASK_BACKGROUND, load_image

    out = output.out_path(out)
    width, height = parse_size(size) if size is not None else (None, None)
    # Validated here so that a random seed is drawn once and batches continue from it.
    # The model's own defaults (Pipeline.defaults) fill what is not given, after loading.
    fallback = Defaults()
    seed = GenerationConfig(prompt, negative, fallback.steps if steps is None else steps,
                            fallback.guidance if guidance is None else guidance, seed, width, height,
                            fallback.sampler if sampler is None else sampler, n, schedule=schedule,
                            eta=eta if sampler else None, strength=strength, vae_tiles=vae_tiles,
                            decoder=decoder, cache_interval=cache_interval).validate().seed
    preview_file = output.preview_path(preview) if preview is not None else None
    if preview_file is not None and Path(out).suffix and preview_file.resolve() == Path(out).expanduser().resolve():
        raise InputError(f"--preview {preview} is also --out: name another file for the preview")
    if preview_file is not None and safety_checker:
        raise InputError("--preview shows each picture before the safety checker sees it; leave out --preview "
                         "or --safety-checker")
    if eta is not None:  # its sampler may be the model's default, known after loading; its range is known now
        check_number("eta", eta, 0, 1)
    if init_image is None and (strength is not None or mask is not None or depth_map is not None):
        given = "--strength" if strength is not None else "--mask" if mask is not None else "--depth-map"
        raise InputError(f"{given} needs --init-image")
    mark = watermark_text if watermark_text is not None else watermark
    if isinstance(mark, str):
        from sdonnx.runtime.watermark import message_bits

        message_bits(mark)  # an empty text, before the model loads
    paths = output.output_paths(out, n * n_iter)
    output.refuse_existing([*(paths or []), *([output.grid_path(out)] if grid and paths else [])])
    # Read once, before the model loads, so a bad file fails fast.
    image_options = {}
    if init_image is not None:
        image_options["init_image"] = load_image(init_image)
    if strength is not None:
        image_options["strength"] = strength
    if mask is not None:
        image_options["mask_image"] = load_image(mask, "mask image", MASK_BACKGROUND)
    if depth_map is not None:
        from sdonnx.runtime.depth import load_depth_map

        load_depth_map(depth_map)  # a bad file fails before the model loads
        image_options["depth_map"] = depth_map
    # LoRA files are found (or refused) before the model loads.
    lora_dir, embeddings_dir = folder_option("--lora-dir", lora_dir), folder_option("--embeddings-dir", embeddings_dir)
    loras = [adapters.parse_lora_option(spec) for spec in lora or []]
    lora_dir = adapters.default_dir("loras", lora_dir)
    loras = [(adapters.locate_lora(name, lora_dir), scale) for name, scale in loras]
    folder = output.prepare_folder(out)
    start = time.perf_counter()
    pipe = Pipeline.load(model, provider=provider, threads=threads, precision=precision, low_memory=low_memory,
                         lora_dir=lora_dir, embeddings_dir=embeddings_dir)
    if verbose:
        cached = ", ".join(f"{part} {use}" for part, use in pipe.cache_use.items())
        typer.echo(f"loaded {pipe.config.path} on {pipe.config.provider} ({pipe.config.precision}) "
                   f"in {time.perf_counter() - start:.2f} s" + (f" (optimized-graph cache: {cached})" if cached else ""))
    step_times: list[float] = []
    run: list = []
    for batch in range(n_iter):
        # On stderr, so that stdout holds only the lines naming what was written.
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=not verbose, console=Console(stderr=True),
                      disable=not sys.stderr.isatty()) as progress:
            task = progress.add_task(f"batch {batch + 1}/{n_iter}" if n_iter > 1 else "sampling", total=None)
            last = time.perf_counter()

            def on_step(step: int, total: int) -> None:
                nonlocal last
                now = time.perf_counter()
                step_times.append(now - last)
                last = now
                progress.update(task, completed=step, total=total)

            def show(step: int, total: int, denoised) -> None:
                if preview_file is not None and (step % preview_every == 0 or step == total):
                    output.write_preview(pipe.preview(denoised), preview_file)

            images = pipe.generate(prompt, negative_prompt=negative, steps=steps, guidance=guidance,
                                   seed=seed + batch * n, width=width, height=height, sampler=sampler,
                                   n=n, callback=on_step, schedule=schedule, eta=eta, vae_tiles=vae_tiles,
                                   loras=loras, decoder=decoder, on_step=show, cache_interval=cache_interval,
                                   watermark=mark, safety_checker=safety_checker, **image_options)
        for i, image in enumerate(images):
            image_seed = image.info["seed"]
            written = output.save_image(image, paths[batch * n + i] if paths else None, folder, image_seed)
            typer.echo(f"wrote {written} (seed {image_seed})")
            if isinstance(mark, str) or mark is True:
                from sdonnx.runtime import watermark as watermark_module

                text = pipe.watermark_text(mark)
                if written.suffix.lower() != ".png" or not watermark_module.reads_back(image, text):
                    typer.secho(f"warning: the invisible watermark in {written} will not read back "
                                + ("(JPEG and WebP erase it)" if written.suffix.lower() != ".png" else
                                   "(the method fails on some pictures)"), err=True, fg=typer.colors.YELLOW)
            if image.info.get("nsfw_content_detected"):
                typer.secho(f"the safety checker flagged {written} (seed {image_seed}): it was blacked out",
                            err=True, fg=typer.colors.YELLOW)
        if grid:
            run += images
    if verbose and step_times:
        typer.echo(f"{len(step_times)} steps, {sum(step_times) / len(step_times):.3f} s per step")
    if grid:
        sheet = image_grid(run, columns=n)
        # As in the web UI, a grid carries its first image's parameters.
        sheet.info["parameters"] = run[0].info["parameters"]
        written = output.save_image(sheet, output.grid_path(out), folder, seed, suffix="-grid")
        typer.echo(f"wrote {written} (grid of {len(run)} images)")


@app.command()
def upscale(
    image: Path = typer.Argument(..., help="The image to enlarge 4x (PNG, JPEG, WebP ...)."),
    model: Path = typer.Option(..., "--model", "-m", help="An x4 upscaler folder (sdonnx export of "
                                                          "stabilityai/stable-diffusion-x4-upscaler or alike)."),
    prompt: str = typer.Option("", "--prompt", "-p", help="What the picture shows (guides the detail drawn)."),
    negative: str = typer.Option("", "--negative", help="Negative prompt."),
    noise_level: int = typer.Option(20, "--noise-level", min=0, max=1000,
                                    help="Noise added to the input, 0 to the model's max_noise_level (350 for SD's "
                                         "x4 upscaler): higher lets the model redraw more of the input's detail."),
    steps: int = typer.Option(20, "--steps", help="Sampler steps (diffusers defaults to 75)."),
    guidance: float = typer.Option(9.0, "--guidance", "-g", help="Classifier-free guidance scale; <= 1 disables it."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed; -1 or omitted: a random one."),
    sampler: str = typer.Option("ddim", "--sampler", help=f"One of: {', '.join(SAMPLERS)}."),
    tile: str = typer.Option("128", "--tile", help="UNet tile side in input pixels (multiple of 8), or off: "
                                                   "larger inputs run in overlapping tiles of this side, blended."),
    vae_tiles: str = typer.Option("auto", "--vae-tiles", help="VAE in pieces: auto, off, or a side in pixels."),
    out: str = typer.Option(str(DEFAULT_OUT), "--out", "-o", help="Output folder, or a file name ending in .png, .jpg "
                                                                   "or .webp (never overwritten)."),
    provider: str = typer.Option("auto", "--provider", help=f"One of: {', '.join(PROVIDER_CHOICES)}."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS,
                                          help="CPU threads (default: all physical cores)."),
    precision: str = typer.Option("auto", "--precision",
                                  help="fp32, bf16 (openvino) or auto: bf16 where the provider and CPU do it."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print load, per-step and decode times."),
) -> None:
    """Enlarge an image 4x with Stable Diffusion's x4 upscaler, in tiles when it is large."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sdonnx.runtime import Pipeline
    from sdonnx.runtime.images import load_image
    from sdonnx.runtime.pipeline import check_model_folder
    from sdonnx.runtime.upscale import UpscaleConfig, check_upscaler

    if tile != "off" and not (tile.isascii() and tile.isdecimal()):
        raise InputError(f"--tile must be a side in input pixels (a multiple of 8) or off, got {tile!r}")
    tile_side = None if tile == "off" else int(tile)
    seed = UpscaleConfig(prompt, negative, noise_level, steps, guidance, seed, sampler, tile_side,
                         vae_tiles).validate(1000).seed
    from sdonnx.runtime import providers

    providers.resolve_precision(providers.resolve(provider), precision)  # before the folder is looked at
    out = output.out_path(out)
    paths = output.output_paths(out, 1)
    output.refuse_existing(paths)
    check_model_folder(model)
    check_upscaler(model)
    picture = load_image(image, "image")
    folder = output.prepare_folder(out)
    start = time.perf_counter()
    pipe = Pipeline.load(model, provider=provider, threads=threads, precision=precision)
    times = [time.perf_counter()]
    if verbose:
        typer.echo(f"loaded {pipe.config.path} on {pipe.config.provider} in {times[0] - start:.1f} s")

    def on_step(step: int, total: int) -> None:
        times.append(time.perf_counter())
        progress.update(task, completed=step, total=total)
        if verbose:
            typer.echo(f"step {step}/{total}: {times[-1] - times[-2]:.1f} s")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True, console=Console(stderr=True), disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(f"upscaling {picture.width}x{picture.height}", total=None)
        result = pipe.upscale(picture, prompt, negative, noise_level, steps, guidance, seed, sampler, tile_side,
                              vae_tiles, callback=on_step)
    if verbose:
        typer.echo(f"VAE decode {time.perf_counter() - times[-1]:.1f} s, total {time.perf_counter() - start:.1f} s")
    written = output.save_image(result, paths[0] if paths else None, folder, seed, suffix="-x4")
    typer.echo(f"wrote {written} ({result.width}x{result.height}, seed {seed})")


@app.command()
def batch(
    jobs: Path = typer.Argument(..., help="A JSON Lines file: one job per line, such as {\"prompt\": \"a red circle\", "
                                          "\"seed\": 1, \"steps\": 20, \"size\": \"512x512\"} (fields: prompt, "
                                          "negative_prompt, seed, steps, guidance, size or width and height, sampler, "
                                          "schedule, eta, n, name)."),
    out: str = typer.Option(..., "--out", "-o", help="Folder for the images and results.jsonl; running the same "
                                                      "command again draws only what is missing."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="ONNX model folder (default: the embedded model)."),
    ray_address: Optional[str] = typer.Option(
        None, "--ray", help="Run on a Ray cluster (needs the ray extra of sdonnx): auto (the cluster this machine joined, "
                            "or $RAY_ADDRESS), local (start one here for this run), or the head's HOST:PORT."),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, max=10_000, help="With --ray: workers, each holding the model "
                                                   "(default: as many as the nodes have room for at --threads CPUs each)."),
    ship_model: bool = typer.Option(False, "--ship-model", help=SHIP_MODEL_HELP),
    provider: str = typer.Option("auto", "--provider", help=f"One of: {', '.join(PROVIDER_CHOICES)}."),
    precision: str = typer.Option("auto", "--precision",
                                  help="fp32, bf16 (openvino) or auto: bf16 where the provider and CPU do it."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS,
                                          help="CPU threads per worker (default: all physical cores here; 1 per "
                                               "worker with --ray)."),
    lora_dir: Optional[str] = typer.Option(
        None, "--lora-dir", help="Where <lora:NAME:SCALE> in a prompt is looked up (on every node with --ray; "
                                 "default $SDONNX_LORA_DIR, else ~/.local/share/sdonnx/loras)."),
    embeddings_dir: Optional[str] = typer.Option(
        None, "--embeddings-dir", help="Textual-inversion embeddings (on every node with --ray; default "
                                       "$SDONNX_EMBEDDINGS_DIR, else ~/.local/share/sdonnx/embeddings)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Name every image written, and where it was drawn."),
) -> None:
    """Draw every image of a jobs file into a folder, here or on a Ray cluster; resumable.

    Each image is what `sdonnx generate` draws with its job's settings, written as
    NAME.png (a job's "name") or LINE-SEED.png, with one line in OUT/results.jsonl."""
    import importlib.util

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sdonnx.cli import batch as batch_
    from sdonnx.runtime import providers
    from sdonnx.runtime.pipeline import check_model_folder, default_model_path

    out = output.out_path(out)
    if output.image_suffix(out) is not None:
        raise InputError(f"--out {out}: a batch writes many images; give a folder")
    if ray_address is None and (workers is not None or ship_model):
        raise InputError(f"{'--workers' if workers is not None else '--ship-model'} needs --ray "
                         "(without it one worker runs in this process; --ray local starts a cluster on this machine)")
    if ray_address is not None:
        batch_.check_ray_address(ray_address)
    providers.resolve_precision(providers.resolve(provider), precision)
    lora_dir, embeddings_dir = folder_option("--lora-dir", lora_dir), folder_option("--embeddings-dir", embeddings_dir)
    if ray_address is not None and importlib.util.find_spec("ray") is None:
        raise InputError(f"--ray needs Ray: {install_hint('ray')}")
    tasks, errors = batch_.read_jobs(jobs)
    folder_path = (model or default_model_path()).expanduser()
    check_model_folder(folder_path)
    errors += batch_.check_sizes(tasks, folder_path)
    errors.sort(key=lambda message: int(message.split()[1].rstrip(":")))  # "line N: ..."
    if errors:
        for message in errors[:20]:
            typer.secho(f"{jobs}: {message}", err=True, fg=typer.colors.RED)
        more = " (the first 20 shown)" if len(errors) > 20 else ""
        raise InputError(f"{count_of(len(errors), 'bad line')} in {jobs}{more}; nothing was drawn")
    folder = output.prepare_folder(out)
    results = batch_.Results(folder)
    todo, done, stale = results.plan(tasks, folder)
    if stale:
        typer.secho(f"{count_of(len(stale), 'image')} listed in {results.path} gone; drawn again", err=True,
                    fg=typer.colors.YELLOW)
    if not todo:
        typer.echo(f"all {count_of(len(tasks), 'image')} of {jobs} in {folder} already; nothing to draw")
        return
    options = {"provider": provider, "precision": precision, "lora_dir": lora_dir, "embeddings_dir": embeddings_dir}
    failed: list[str] = []
    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True, console=Console(stderr=True), disable=not sys.stderr.isatty()) as progress:
        bar = progress.add_task("loading", total=len(todo))

        def drawn(image: batch_.Drawn) -> None:
            path = results.write(image, folder)
            progress.update(bar, advance=1, description="drawing")
            if verbose:
                typer.echo(f"wrote {path} (line {image.record['line']}, seed {image.record['seed']}, "
                           f"{image.record['seconds']:.2f} s on {image.record['worker']})")

        def refused(task: batch_.Task, reason: str) -> None:
            failed.append(f"line {task.line} ({task.file}): {reason}")
            progress.update(bar, advance=1)

        def note(message: str) -> None:
            progress.console.print(f"[yellow]{message}[/yellow]")

        if ray_address is None:
            drawer = batch_.Drawer()
            loaded = drawer.load(str(folder_path), {**options, "threads": threads})
            if verbose:
                typer.echo(f"loaded {loaded['model']} on {loaded['provider']} ({loaded['precision']})")
            progress.update(bar, description="drawing")
            for task in todo:
                try:
                    image = drawer.draw(task)
                except SdonnxError as e:
                    refused(task, str(e))
                except Exception as e:  # as a Ray worker's: the job fails, the batch goes on
                    refused(task, f"{type(e).__name__}: {e}")
                else:
                    drawn(image)
            used = "1 worker here"
        else:
            from sdonnx.cli import cluster

            cluster.connect(ray_address, verbose)
            count = cluster.run_batch(todo, folder_path.resolve(), workers=workers, threads=threads or 1,
                                      ship_model=ship_model, options=options, on_drawn=drawn, on_failed=refused,
                                      on_note=note)
            used = count_of(count, "Ray worker")
    seconds = time.perf_counter() - start
    written = len(todo) - len(failed)
    typer.echo(f"drew {count_of(written, 'image')} in {seconds:.1f} s with {used} into {folder}"
               + (f" ({count_of(len(done), 'image')} there already)" if done else "") + f"; one line each in {results.path}")
    if failed:
        for message in failed[:20]:
            typer.secho(message, err=True, fg=typer.colors.RED)
        raise InputError(f"{count_of(len(failed), 'image')} not drawn; fix the jobs and run the same command again")


@app.command()
def export(
    source: Path = typer.Argument(..., help="A single-file checkpoint (.safetensors, .ckpt) or a diffusers folder; "
                                            "with --tiny-vae alone, an exported folder to add TAESD to."),
    out: Optional[Path] = typer.Argument(None, help="Folder to write the ONNX models to."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    opset: Optional[int] = typer.Option(None, "--opset", min=7, max=30, help="ONNX opset (default: optimum's)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare every part with torch."),
    default_steps: Optional[int] = typer.Option(
        None, "--default-steps", help="Steps this model should run when none are asked (recorded in sdonnx.json)."),
    default_guidance: Optional[float] = typer.Option(
        None, "--default-guidance", help="Its recommended guidance scale (e.g. 0-1 for Turbo/LCM models)."),
    default_sampler: Optional[str] = typer.Option(None, "--default-sampler", help="Its recommended sampler."),
    config: Optional[Path] = typer.Option(
        None, "--config", help="Single file: a diffusers folder of configs for an architecture sdonnx does not bundle."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="Single file: a VAE file to use instead of the one inside."),
    extract_ema: bool = typer.Option(False, "--extract-ema", help="Single file: export the EMA copy of the UNet."),
    prediction_type: Optional[str] = typer.Option(
        None, "--prediction-type", help="SD 2.x single file: epsilon (2.x-base) or v_prediction (2.1, the default; "
                                        "a .yaml of the same name beside the file also says)."),
    image_size: Optional[int] = typer.Option(
        None, "--image-size", min=64, max=4096, help="SD 2.x single file: its native size in pixels (512 or 768)."),
    variant: Optional[str] = typer.Option(
        None, "--variant", help="Diffusers folder: read these weights (fp16: model.fp16.safetensors ...); "
                                "default: the plain ones, or fp16 when a folder has only those."),
    tiny_vae: Optional[str] = typer.Option(
        None, "--tiny-vae", help="Also export TAESD (a diffusers AutoencoderTiny folder, or taesd_decoder.pth with "
                                 "taesd_encoder.pth beside it) as tiny_vae_decoder/encoder; "
                                 "`sdonnx export FOLDER --tiny-vae TAESD` adds it to an exported FOLDER."),
) -> None:
    """Export a checkpoint to a folder of ONNX models, checked against torch."""
    from sdonnx.export.exporter import ExportConfig, export as run_export

    taesd = folder_option("--tiny-vae", tiny_vae)
    if taesd is not None and not taesd.exists():
        raise InputError(f"TAESD source not found: {taesd}")
    if taesd is not None:
        from sdonnx.export.exporter import check_export_extra
        from sdonnx.export.tiny_vae import load_tiny_vae

        check_export_extra()
        load_tiny_vae(taesd)  # a source that is not TAESD is refused before the model's export
    if out is None:
        if taesd is None:
            raise InputError("missing OUT: give the folder to export to (`sdonnx export SOURCE OUT`)")
        from sdonnx.export.tiny_vae import add_tiny_vae
        from sdonnx.runtime.pipeline import check_model_folder

        check_model_folder(source)
        start = time.perf_counter()
        typer.echo(f"adding TAESD from {taesd} to {source}")
        add_tiny_vae(taesd, source, log=typer.echo)
        typer.echo(f"wrote TAESD into {source} in {time.perf_counter() - start:.1f} s")
        return
    given = {"steps": default_steps, "guidance": default_guidance, "sampler": default_sampler}
    defaults = {name: value for name, value in given.items() if value is not None}
    result = run_export(ExportConfig(source, out, force=force, opset=opset, check=check, defaults=defaults,
                                     config=config, vae=vae, extract_ema=extract_ema, variant=variant,
                                     prediction_type=prediction_type, image_size=image_size), log=typer.echo)
    if taesd is not None:
        from sdonnx.export.tiny_vae import add_tiny_vae

        typer.echo(f"adding TAESD from {taesd}")
        add_tiny_vae(taesd, result.out, log=typer.echo)
    typer.echo(f"wrote {result.out} in {result.seconds:.1f} s")


@app.command()
def quantize(
    source: Path = typer.Argument(..., help="An ONNX model folder (from sdonnx export)."),
    out: Path = typer.Argument(..., help="Folder to write the quantized model to."),
    mode: str = typer.Option("int8", "--mode", help="int8 (onnxruntime: UNet weights+activations, others weights), "
                             "int8-openvino (NNCF, OpenVINO IR for --provider openvino) or fp16 (weights)."),
    min_psnr: Optional[float] = typer.Option(
        None, "--min-psnr", help="A part whose images fall below this PSNR stays float (default: int8 22, fp16 35)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    check_prompts: int = typer.Option(2, "--check-prompts", help="Prompts the check generates (seed = index)."),
    check_steps: int = typer.Option(10, "--check-steps", help="Sampler steps per check image."),
    calibration_prompts: int = typer.Option(6, "--calibration-prompts", help="int8: prompts whose trajectories calibrate."),
    size: Optional[int] = typer.Option(None, "--size", help="Check and calibration image side (default: native, at most 256)."),
) -> None:
    """Quantize a model folder, check its pictures against the float model, keep bad parts float."""
    from sdonnx.export.exporter import check_export_extra

    check_export_extra()  # onnx and onnxruntime's quantization tools come with the export stage
    from sdonnx.export.quantize import QuantizeConfig
    from sdonnx.export.quantize import quantize as run_quantize

    result = run_quantize(QuantizeConfig(source, out, mode, force, min_psnr, check_prompts, check_steps,
                                         calibration_prompts, check_steps, size), log=typer.echo)
    typer.echo(f"wrote {result.out} in {result.seconds:.1f} s: PSNR {result.psnr:.1f} dB, "
               f"SSIM {result.ssim:.3f} against the float model")


@app.command()
def bench(
    model: Optional[Path] = typer.Argument(None, help="An ONNX model folder (default: the embedded model)."),
    size: Optional[str] = typer.Option(None, "--size", help="WIDTHxHEIGHT (default: the model's native size)."),
    repeats: int = typer.Option(3, "--repeats", min=1, max=1000, help="Timed calls per part after the first (median)."),
    provider: Optional[list[str]] = typer.Option(None, "--provider", help="Only these providers (repeatable)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS,
                                          help="CPU threads (default: all physical cores)."),
) -> None:
    """Time text encoding, a UNet step, VAE decoding, load time and peak RSS per provider."""
    from sdonnx.runtime import bench as benchmark
    from sdonnx.runtime.pipeline import check_model_folder, default_model_path

    width, height = parse_size(size) if size is not None else (None, None)
    check_size(width, height)
    for name in provider or []:
        if name not in PROVIDER_CHOICES:
            raise InputError(f"unknown provider {name!r}; choose one of: {', '.join(PROVIDER_CHOICES)}")
    folder = model or default_model_path()
    check_model_folder(folder)
    typer.echo(benchmark.table(benchmark.run(folder, width, height, repeats, provider, threads)))


@app.command()
def serve(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="ONNX model folder (default: the embedded model)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(7860, "--port", min=0, max=65535, help="TCP port (0: any free port, printed at start)."),
    provider: str = typer.Option("auto", "--provider", help=f"One of: {', '.join(PROVIDER_CHOICES)}."),
    precision: str = typer.Option("auto", "--precision", help="fp32, bf16 or auto (bf16 where the CPU has it)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS,
                                          help="CPU threads (default: all physical cores)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="SDONNX_API_KEY",
        help="Require this key on every endpoint (Authorization: Bearer KEY; the page asks for it as a password)."),
    queue: int = typer.Option(4, "--queue", min=1, max=10_000,
                              help="Requests that may wait behind the running one; more get 503."),
    low_memory: bool = typer.Option(
        False, "--low-memory", help="Load each part only while a request runs it (slower requests, lower peak)."),
    cache_interval: int = typer.Option(
        1, "--cache-interval", min=1, max=20,
        help="DeepCache: run the whole UNet every N-th step of every request and only its shallow branch between (1 = off; 3 takes an SD 1.5 image's UNet time down 1.5-2.3x and changes the picture: see the README's \"step caching\" figures)."),
    safety_checker: bool = typer.Option(
        False, "--safety-checker", help="Run the model's safety checker on every image (a filter, not a guarantee): "
                                        "flagged ones are blacked out and reported (nsfw_content_detected)."),
    watermark: bool = typer.Option(
        False, "--watermark", help="Every image carries Stable Diffusion's invisible watermark (the reference "
                                   "scripts' text for the model's family); requests under 256x256 are refused."),
    watermark_text: Optional[str] = typer.Option(
        None, "--watermark-text", help="Every image carries this text as its invisible watermark (implies --watermark)."),
    lora_dir: Optional[str] = typer.Option(
        None, "--lora-dir", help="Where <lora:NAME:SCALE> in a request's prompt is looked up "
                                 "(default $SDONNX_LORA_DIR, else ~/.local/share/sdonnx/loras)."),
    embeddings_dir: Optional[str] = typer.Option(
        None, "--embeddings-dir", help="Textual-inversion embeddings, used where a prompt names them "
                                       "(default $SDONNX_EMBEDDINGS_DIR, else ~/.local/share/sdonnx/embeddings)."),
    ray_address: Optional[str] = typer.Option(
        None, "--ray", help="Serve from a Ray cluster through Ray Serve (needs the ray extra of sdonnx): auto (the "
                            "cluster this machine joined, or $RAY_ADDRESS), local (start one here), or HOST:PORT. "
                            "The API and page are the same; --queue then counts per replica."),
    replicas: Optional[int] = typer.Option(
        None, "--replicas", min=1, max=10_000, help="With --ray: replicas, each holding the model and generating one "
                                                    "request at a time (default: as many as the nodes have room for)."),
    ship_model: bool = typer.Option(False, "--ship-model", help=SHIP_MODEL_HELP),
) -> None:
    """Serve one model: OpenAI's images API, AUTOMATIC1111's /sdapi/v1, and a web page at /."""
    import importlib.util

    modules = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}
    missing = [package for module, package in modules.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise InputError(f"sdonnx serve needs {' and '.join(missing)}: {install_hint('serve')}")
    from sdonnx.cli import server
    from sdonnx.runtime import Pipeline

    if api_key is not None and not api_key.strip():
        raise InputError("--api-key is empty; give a key or leave the option out")
    if not host.strip():
        raise InputError("--host is empty; give an address such as 127.0.0.1 (this machine) or 0.0.0.0 (the network)")
    lora_dir, embeddings_dir = folder_option("--lora-dir", lora_dir), folder_option("--embeddings-dir", embeddings_dir)
    if ray_address is None and (replicas is not None or ship_model):
        raise InputError(f"{'--replicas' if replicas is not None else '--ship-model'} needs --ray")
    mark = watermark_text if watermark_text is not None else watermark
    if ray_address is not None:
        return _serve_on_ray(ray_address, model, host, port, provider, precision, threads, api_key, queue, low_memory,
                             cache_interval, safety_checker, mark, lora_dir, embeddings_dir, replicas, ship_model)
    sock = server.bind(host, port)
    try:
        pipe = Pipeline.load(model, provider=provider, threads=threads, precision=precision, low_memory=low_memory,
                             lora_dir=lora_dir, embeddings_dir=embeddings_dir)
        if cache_interval > 1:
            pipe.use_deep_cache()  # (a folder that cannot is refused before the server says it serves)
        if safety_checker and not pipe.has_safety_checker:
            raise InputError(f"--safety-checker: {pipe.name} has no safety checker; export it from a diffusers folder "
                             "that has safety_checker/ and feature_extractor/")
        pipe.watermark_text(mark)  # (create_app checks it again, after the server says it serves)
    except BaseException:
        sock.close()
        raise
    where = sock.getsockname()
    url = f"http://{'[' + where[0] + ']' if ':' in where[0] else where[0]}:{where[1]}/"
    typer.echo(f"serving {pipe.name} ({pipe.config.provider}, {pipe.config.precision}) on {url}"
               + (" with an API key" if api_key else "") + "; Ctrl-C stops")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        typer.secho("warning: listening beyond this machine without --api-key: anyone who can reach "
                    "the port can generate", err=True, fg=typer.colors.YELLOW)
    server.serve(pipe, sock, api_key, queue, cache_interval, mark, safety_checker)


def _serve_on_ray(address: str, model: Path | None, host: str, port: int, provider: str, precision: str,
                  threads: int | None, api_key: str | None, queue: int, low_memory: bool, cache_interval: int,
                  safety_checker: bool, mark: bool | str, lora_dir: Path | None, embeddings_dir: Path | None,
                  replicas: int | None, ship_model: bool) -> None:
    """`sdonnx serve --ray`: the same app, one per replica, behind Ray Serve's proxy (cli/cluster.py)."""
    import importlib.util

    from sdonnx.runtime import providers
    from sdonnx.runtime.pipeline import check_model_folder, default_model_path

    from sdonnx.cli.batch import check_ray_address

    check_ray_address(address)
    if importlib.util.find_spec("ray") is None:
        raise InputError(f"--ray needs Ray Serve: {install_hint('ray')}")
    providers.resolve_precision(providers.resolve(provider), precision)
    if isinstance(mark, str):
        from sdonnx.runtime.watermark import message_bits

        message_bits(mark)
    folder = (model or default_model_path()).expanduser().resolve()
    check_model_folder(folder)
    from sdonnx.cli import cluster

    cluster.connect(address)
    url, count = cluster.serve_app(
        folder, host=host, port=port, replicas=replicas, threads=threads or 1, queue=queue, ship_model=ship_model,
        options={"provider": provider, "precision": precision, "low_memory": low_memory, "lora_dir": lora_dir,
                 "embeddings_dir": embeddings_dir},
        app_options={"api_key": api_key, "cache_interval": cache_interval, "watermark": mark,
                     "safety_checker": safety_checker})
    typer.echo(f"serving {folder.name} on {url} from {count} Ray Serve replica{'s' if count > 1 else ''}"
               + (" with an API key" if api_key else "") + "; Ctrl-C stops")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        typer.secho("warning: listening beyond this machine without --api-key: anyone who can reach "
                    "the port can generate", err=True, fg=typer.colors.YELLOW)
    cluster.wait_serving()


watermark_app = typer.Typer(help="Stable Diffusion's invisible watermark (DWT, as the invisible-watermark package).",
                            no_args_is_help=True)
app.add_typer(watermark_app, name="watermark")


@watermark_app.command("decode")
def watermark_decode(
    image: Path = typer.Argument(..., help="An image (PNG, JPEG, WebP ...) of at least 256x256."),
    length: Optional[int] = typer.Option(
        None, "--length", min=1, help="Bits of the mark (8 per byte of text; default: try the lengths of "
                                       "Stable Diffusion's 'StableDiffusionV1' and 'SDV2')."),
) -> None:
    """Read an invisible watermark: its text (or bits) and how fully its blocks agree."""
    from sdonnx.runtime import watermark
    from sdonnx.runtime.images import load_image

    found = watermark.find(load_image(image, "image"), length)
    shown_bits = "".join(map(str, found.bits))
    what = repr(found.text) if found.text is not None else f"bits {shown_bits}"
    typer.echo(f"{what} ({len(found.bits)} bits, blocks agree {found.confidence:.0%})")


@watermark_app.command("embed")
def watermark_embed(
    image: Path = typer.Argument(..., help="An image of at least 256x256."),
    out: Path = typer.Argument(..., help="The PNG to write (never overwritten; JPEG would erase the mark)."),
    text: str = typer.Option("StableDiffusionV1", "--text",
                             help="The text to embed (default: Stable Diffusion 1.x scripts' text)."),
) -> None:
    """Embed an invisible watermark into an existing image."""
    from sdonnx.runtime import watermark
    from sdonnx.runtime.images import load_image

    output.refuse_existing([out])
    if output.image_suffix(out) != ".png":
        raise InputError(f"{out}: write the marked image as .png (JPEG and lossy WebP erase the mark: "
                         "tests/benchmarks/results/watermark.md)")
    from PIL import Image, ImageOps

    load_image(image, "image")  # a missing or unreadable file: one line
    with Image.open(image) as opened:  # read again keeping its transparency, which load_image flattens
        picture = ImageOps.exif_transpose(opened)
        picture.load()
    marked = watermark.embed(picture, text)
    written = output.save_image(marked, out, out.parent, 0)
    typer.echo(f"wrote {written} ({8 * len(text.encode())} bits)")
    if not watermark.reads_back(marked, text):
        typer.secho(f"warning: the mark in {written} does not read back exactly: the method fails on some pictures "
                    "(too few blocks per bit, or blocks without a clear largest coefficient)", err=True,
                    fg=typer.colors.YELLOW)


@app.command()
def info(model: Optional[Path] = typer.Argument(None, help="An ONNX model folder (default: the embedded model).")) -> None:
    """Show a model folder's parts, their inputs, precision, sizes and size on disk."""
    from sdonnx.runtime.info import describe
    from sdonnx.runtime.pipeline import default_model_path

    typer.echo(describe(model or default_model_path()))


def _terminate(signum, frame):
    # Turn SIGTERM into an exception so temporary files and folders are cleaned up.
    raise KeyboardInterrupt


def _fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit: what is wrong and what to do, never a traceback."""
    typer.secho(f"error: {' '.join(message.split())}", err=True, fg=typer.colors.RED)
    sys.exit(code)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        # Outside standalone mode typer returns an exit code instead of exiting: 130 when it
        # caught a KeyboardInterrupt (Ctrl-C, or SIGTERM through _terminate).
        code = app(standalone_mode=False)
        if code == 130:
            typer.secho("interrupted", err=True)
        if isinstance(code, int) and code:
            sys.exit(code)
    except NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help())
        sys.exit(2)
    except UsageError as e:
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        _fail(e.format_message() + where)
    except ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except SdonnxError as e:
        _fail(str(e))
    except (KeyboardInterrupt, typer.Abort):
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        _fail("out of memory; try a smaller --size or -n, or --precision/--provider that needs less")
    except OSError as e:
        # The user's environment (a full disk, a file that vanished, a permission): say which.
        where = f" ({e.filename})" if e.filename else ""
        _fail(f"{e.strerror or e}{where}", 1)


if __name__ == "__main__":
    main()
