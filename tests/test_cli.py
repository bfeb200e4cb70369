"""The command line: PNG output with A1111 parameters, no overwrites, clear errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def sdonnx(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sdonnx.cli.app", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_generate_writes_pngs_with_parameters(tiny_onnx, tmp_path):
    proc = sdonnx("generate", "a red circle", "--model", tiny_onnx, "--negative", "blurry",
                  "--steps", 3, "--guidance", 5, "--seed", 42, "--size", "64x48", "--sampler", "plms",
                  "-n", 2, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {tmp_path / '00000-42.png'}" in proc.stdout
    image = Image.open(tmp_path / "00001-43.png")
    assert image.size == (64, 48)
    assert image.text["parameters"] == (
        "a red circle\nNegative prompt: blurry\n"
        "Steps: 3, Sampler: PLMS, CFG scale: 5, Seed: 43, Size: 64x48, Model: onnx, Version: sdonnx 0.1.0"
    )


def test_same_seed_same_image_and_never_overwrites(tiny_onnx, tmp_path):
    args = ("generate", "a cat", "--model", tiny_onnx, "--steps", 2, "--size", "64x64", "--seed", 7,
            "--out", tmp_path)
    assert sdonnx(*args).returncode == 0
    assert sdonnx(*args).returncode == 0
    first, second = Image.open(tmp_path / "00000-7.png"), Image.open(tmp_path / "00001-7.png")
    assert first.tobytes() == second.tobytes()


def test_batch_image_equals_single_run_with_its_seed(tiny_pipeline):
    batch = tiny_pipeline.generate("a cat", steps=2, width=64, height=64, seed=10, n=3)
    alone = tiny_pipeline.generate("a cat", steps=2, width=64, height=64, seed=12)
    assert batch[2].tobytes() == alone[0].tobytes()
    assert batch[0].tobytes() != batch[1].tobytes()


def test_explicit_file_is_not_overwritten(tiny_onnx, tmp_path):
    target = tmp_path / "mine.png"
    target.write_bytes(b"precious")
    proc = sdonnx("generate", "a cat", "--model", tiny_onnx, "--steps", 1, "--size", "64x64",
                  "--out", target)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["mine.png"], "temporary file left behind"


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}"], "model folder not found"),
    (["--size", "65x64"], "width must be a positive multiple of 8 up to"),
    (["--size", "64x60"], "height must be a positive multiple of 8 up to"),
    (["--size", "big"], "--size must look like 512x512"),
    (["--steps", "0"], "steps must be a whole number from 1 to 1000, got 0"),
    (["--sampler", "nope"], "unknown sampler 'nope'; choose one of: euler, "),
    (["--schedule", "nope"], "unknown schedule 'nope'; choose one of: default, karras"),
    (["--eta", "0.5"], "eta applies to the euler_a, ddim, dpmpp_2m_sde samplers, not euler"),
    (["--init-image", "{png}", "--strength", "1.5"], "strength must be a finite number from 0 to 1, got 1.5"),
    (["--strength", "0.5"], "--strength needs --init-image"),
    (["--init-image", "{missing}"], "init image not found"),
    (["--init-image", "{text}"], "cannot be read as an image"),
    (["--mask", "{png}"], "--mask needs --init-image"),
    (["--init-image", "{png}", "--mask", "{png}"], "mask_image needs an inpainting model"),
    (["--guidance", "inf"], "guidance must be a finite number from 0 to 100, got inf"),
    (["--guidance", "nan"], "guidance must be a finite number from 0 to 100, got nan"),
    (["--sampler", "ddim", "--eta", "nan"], "eta must be a finite number from 0 to 1, got nan"),
    (["--threads", "-1", "--provider", "openvino"], "Invalid value for '--threads'"),
    (["--seed", "-2"], "or -1 for a random one; got -2"),
    (["--out", "x.gif"], "sdonnx writes .png, .jpg, .jpeg, .webp files"),
    (["--provider", "tpu"], "unknown provider 'tpu'"),
    (["--provider", "cuda"], "onnxruntime-gpu"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--provider", "cpu", "--precision", "bf16"], "'cpu' cannot run in bf16"),
    (["-n", "0"], "Invalid value for '-n'"),
    (["--n-iter", "0"], "Invalid value for '--n-iter'"),
    (["--out", "/proc/forbidden"], "cannot create output folder"),
])
def test_bad_input_gets_clear_error(tiny_onnx, tmp_path, args, message):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "in.png")
    (tmp_path / "notes.png").write_text("not an image")
    args = [a.format(missing=tmp_path / "missing", png=tmp_path / "in.png", text=tmp_path / "notes.png")
            for a in args]
    if "--model" not in args:
        args = ["--model", str(tiny_onnx), *args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    proc = sdonnx("generate", "a cat", "--size", "64x64", "--steps", "1", *args)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unwritable_output_file_location(tiny_onnx, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = sdonnx("generate", "a cat", "--model", tiny_onnx, "--size", "64x64", "--steps", "1",
                  "--out", blocker / "sub" / "x.png")
    assert proc.returncode == 2 and "cannot create output folder" in proc.stderr


@pytest.mark.parametrize("remove", ["unet/model.onnx", "tokenizer/vocab.json", "scheduler/scheduler_config.json"])
def test_incomplete_model_folder_names_missing_file(tiny_onnx, tmp_path, remove):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_onnx, model)
    (model / remove).unlink()
    proc = sdonnx("generate", "a cat", "--model", model, "--size", "64x64", "--out", tmp_path)
    assert proc.returncode == 2
    assert f"missing: {remove}" in proc.stderr


def test_info_lists_parts(tiny_onnx):
    proc = sdonnx("info", tiny_onnx)
    assert proc.returncode == 0, proc.stderr
    for part in ("text_encoder: fp32", "unet: fp32", "vae_decoder: fp32", "vae_encoder: fp32"):
        assert part in proc.stdout
    assert "in  sample: tensor(float) ['batch_size', 4, 'height', 'width']" in proc.stdout
    assert "parity vs torch" in proc.stdout and "total:" in proc.stdout
    assert proc.stdout.count("stages, the one-piece picture") == 2  # VAE decoder and encoder


def test_info_says_when_tiles_are_blended(tiny_onnx, tmp_path):
    """A folder whose VAE has no stages (optimum's, an older sdonnx's) or stale ones."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny_onnx, folder)
    (folder / "vae_encoder" / "stages.json").unlink()
    data = folder / "vae_decoder" / "model.onnx_data"
    weights = data.read_bytes()
    data.write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))  # one bit of the last weight
    out = sdonnx("info", folder).stdout
    assert "tiles: blended, as diffusers' enable_tiling() (no stages" in out
    assert "tiles: blended (its stages were cut from other weights: export again)" in out


def test_export_command_errors(tiny_source, tiny_onnx, tmp_path):
    proc = sdonnx("export", tiny_source, tiny_onnx)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--force" in proc.stderr
    proc = sdonnx("export", tmp_path / "nothing", tmp_path / "out")
    assert proc.returncode == 2 and "source not found" in proc.stderr


def test_n_iter_continues_seeds_and_grid_has_a_batch_per_row(tiny_onnx, tiny_pipeline, tmp_path):
    import re

    proc = sdonnx("generate", "a cat", "--model", tiny_onnx, "--steps", 1, "--size", "64x48", "-n", 2,
                  "--n-iter", 2, "--grid", "--provider", "cpu", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    files = sorted(tmp_path.iterdir())
    assert len(files) == 5
    *image_files, grid_file = files
    seeds = [int(re.search(r"Seed: (\d+)", Image.open(f).text["parameters"])[1]) for f in image_files]
    first = seeds[0]
    assert seeds == [first, first + 1, first + 2, first + 3]
    assert [f.name for f in image_files] == [f"{i:05d}-{first + i}.png" for i in range(4)]
    assert grid_file.name == f"00004-{first}-grid.png"
    # The second batch really was drawn with the continued seeds.
    alone = tiny_pipeline.generate("a cat", steps=1, width=64, height=48, seed=first + 2)[0]
    assert Image.open(image_files[2]).tobytes() == alone.tobytes()
    grid = Image.open(grid_file)
    assert grid.size == (2 * 64, 2 * 48)
    for i, f in enumerate(image_files):
        row, col = divmod(i, 2)
        tile = grid.convert("RGB").crop((col * 64, row * 48, (col + 1) * 64, (row + 1) * 48))
        assert tile.tobytes() == Image.open(f).convert("RGB").tobytes()


def test_grid_beside_explicit_file_is_not_overwritten(tiny_onnx, tmp_path):
    target = tmp_path / "run.png"
    args = ("generate", "a cat", "--model", tiny_onnx, "--steps", 1, "--size", "64x64", "-n", 2,
            "--grid", "--out", target)
    proc = sdonnx(*args)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-0.png", "run-1.png", "run-grid.png"]
    assert Image.open(tmp_path / "run-grid.png").size == (128, 64)
    (tmp_path / "run-0.png").unlink()
    (tmp_path / "run-1.png").unlink()
    grid = (tmp_path / "run-grid.png").read_bytes()
    proc = sdonnx(*args)
    assert proc.returncode == 2 and "run-grid.png already exists" in proc.stderr
    assert (tmp_path / "run-grid.png").read_bytes() == grid


def test_img2img_from_png_file(tiny_onnx, tiny_pipeline, tmp_path):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    init.save(tmp_path / "in.png")
    args = ("generate", "a cat", "--model", tiny_onnx, "--steps", 4, "--seed", 5, "--provider", "cpu")
    proc = sdonnx(*args, "--init-image", tmp_path / "in.png", "--strength", 0.5, "--out", tmp_path / "img.png")
    assert proc.returncode == 0, proc.stderr
    proc = sdonnx(*args, "--size", "64x48", "--out", tmp_path / "txt.png")
    assert proc.returncode == 0, proc.stderr
    img2img, txt2img = Image.open(tmp_path / "img.png"), Image.open(tmp_path / "txt.png")
    assert img2img.size == (64, 48), "the size defaults to the init image's"
    assert "Denoising strength: 0.5" in img2img.text["parameters"]
    assert "Denoising strength" not in txt2img.text["parameters"]
    assert img2img.tobytes() != txt2img.tobytes()
    alone = tiny_pipeline.generate("a cat", steps=4, seed=5, init_image=init, strength=0.5)[0]
    assert img2img.tobytes() == alone.tobytes()


@pytest.mark.parametrize("args, field", [
    (["--schedule", "karras"], "Schedule type: Karras"),
    (["--eta", "0.5", "--sampler", "ddim"], "Eta DDIM: 0.5"),
    (["--eta", "0.5", "--sampler", "euler_a"], "Eta: 0.5"),
])
def test_sampler_options_reach_parameters(tiny_onnx, tmp_path, args, field):
    proc = sdonnx("generate", "a cat", "--model", tiny_onnx, "--steps", 2, "--size", "64x64", "--seed", 1,
                  *args, "--out", tmp_path / "x.png")
    assert proc.returncode == 0, proc.stderr
    assert field in Image.open(tmp_path / "x.png").text["parameters"]


def test_sampler_help_lists_every_sampler():
    from sdonnx.runtime.pipeline import SAMPLERS

    proc = sdonnx("generate", "--help")
    assert proc.returncode == 0, proc.stderr
    help_text = " ".join(proc.stdout.split())
    assert all(name in help_text for name in SAMPLERS)


def test_inpainting_with_mask(inpaint_pipeline, tmp_path):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    init.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    proc = sdonnx("generate", "a cat", "--model", inpaint_pipeline.config.path, "--steps", 2, "--seed", 3,
                  "--init-image", tmp_path / "in.png", "--mask", tmp_path / "mask.png", "--provider", "cpu",
                  "--out", tmp_path / "x.png")
    assert proc.returncode == 0, proc.stderr
    alone = inpaint_pipeline.generate("a cat", steps=2, seed=3, init_image=init, mask_image=mask)[0]
    assert Image.open(tmp_path / "x.png").tobytes() == alone.tobytes()


def test_verbose_reports_provider_and_precision(tiny_onnx, tmp_path):
    proc = sdonnx("generate", "a cat", "--model", tiny_onnx, "--steps", 2, "--provider", "cpu", "-v",
                  "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "on cpu (fp32)" in proc.stdout and "s per step" in proc.stdout


def test_bench_prints_a_table_per_provider(tiny_onnx):
    proc = sdonnx("bench", tiny_onnx, "--provider", "cpu", "--repeats", 1, "--size", "64x48", "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "CFG pair at 64x48" in lines[0]
    row = next(line for line in lines if line.startswith("| cpu | fp32 |"))
    cells = [float(c) for c in row.strip("|").split("|")[2:]]
    assert len(cells) == 6 and all(c > 0 for c in cells)


@pytest.mark.parametrize("args, message", [
    (["--provider", "tpu"], "unknown provider 'tpu'"),
    (["--repeats", "0"], "Invalid value for '--repeats'"),
    (["--threads", "0"], "Invalid value for '--threads'"),
    (["--size", "0x64"], "width must be a positive multiple of 8"),
    (["{missing}"], "model folder not found"),
])
def test_bench_bad_input(tiny_onnx, tmp_path, args, message):
    args = [a.format(missing=tmp_path / "missing") for a in args]
    if not any("missing" in a for a in args):
        args = [str(tiny_onnx), *args]
    proc = sdonnx("bench", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_an_existing_output_file_is_refused_before_the_model_loads(tiny_onnx, tmp_path):
    """Issue 18: the refusal came after the whole generation. A model folder that cannot load
    shows the order: the output is checked first."""
    (tmp_path / "mine.png").write_bytes(b"precious")
    proc = sdonnx("generate", "a cat", "--model", tmp_path / "missing", "--out", tmp_path / "mine.png")
    assert proc.returncode == 2 and "mine.png already exists" in proc.stderr, proc.stderr
    proc = sdonnx("generate", "a cat", "--model", tmp_path / "missing", "-n", 2, "--grid",
                  "--out", tmp_path / "run.jpg")
    assert "model folder not found" in proc.stderr
    (tmp_path / "run-grid.jpg").write_bytes(b"precious")
    proc = sdonnx("generate", "a cat", "--model", tmp_path / "missing", "-n", 2, "--grid",
                  "--out", tmp_path / "run.jpg")
    assert proc.returncode == 2 and "run-grid.jpg already exists" in proc.stderr, proc.stderr


@pytest.mark.parametrize("name, kind", [("x.jpg", "JPEG"), ("x.JPEG", "JPEG"), ("x.webp", "WEBP")])
def test_out_suffix_chooses_the_format_and_exif_keeps_the_parameters(tiny_onnx, tmp_path, name, kind):
    """As AUTOMATIC1111 writes JPEG and WebP: the parameters in the EXIF UserComment, in
    piexif's Unicode form (an 8-byte "UNICODE" prefix, then UTF-16 big-endian)."""
    proc = sdonnx("generate", "a cat", "--model", tiny_onnx, "--steps", 1, "--size", "64x48", "--seed", 4,
                  "--out", tmp_path / name)
    assert proc.returncode == 0, proc.stderr
    image = Image.open(tmp_path / name)
    assert image.format == kind and image.size == (64, 48)
    comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment[:8] == b"UNICODE\0"
    assert comment[8:].decode("utf-16-be").startswith("a cat\nSteps: 1, Sampler: Euler, CFG scale: 7.5, Seed: 4")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name], "a folder or temporary file was left"


def test_output_files_follow_the_umask(tiny_onnx, tmp_path):
    import os

    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        out = tmp_path / f"u{umask:o}.png"
        proc = subprocess.run(["sh", "-c", f'umask {umask:o} && exec "$@"', "sh", sys.executable, "-m",
                               "sdonnx.cli.app", "generate", "a cat", "--model", str(tiny_onnx), "--steps", "1",
                               "--size", "64x64", "--out", str(out)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert os.stat(out).st_mode & 0o777 == mode


def test_a_full_disk_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    """ENOSPC while the PNG is written: a one-line error, and neither the image nor a
    temporary file remains."""
    import errno

    from sdonnx.cli import output
    from sdonnx.runtime.errors import InputError

    image = Image.new("RGB", (64, 64), "red")
    image.info["parameters"] = "a cat"

    def full(self, file, *args, **kwargs):
        file.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(InputError, match="no space left on the device of .*; nothing was written"):
        output.save_image(image, tmp_path / "x.png", tmp_path, seed=1)
    assert list(tmp_path.iterdir()) == []


def test_a_really_full_disk_is_one_line_and_leaves_nothing(tiny_onnx, tmp_path):
    """End to end on a 64 KB tmpfs filled to its last page (needs root)."""
    import os

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        os.close(fd)
        os.truncate(disk / "filler", os.path.getsize(disk / "filler") - 4096)  # one page: less than the PNG
        proc = sdonnx("generate", "a cat", "--model", tiny_onnx, "--steps", 1, "--size", "64x64", "--seed", 1,
                      "--out", disk / "x.png")
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "no space left" in proc.stderr and "Traceback" not in proc.stderr
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    finally:
        subprocess.run(["umount", str(disk)])


def test_an_unwritable_output_folder_is_one_line(tiny_onnx, tmp_path):
    import os

    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o500)
    if os.access(folder, os.W_OK):  # root ignores permissions: a read-only bind would be needed
        folder = "/proc/sys"
    proc = sdonnx("generate", "a cat", "--model", tiny_onnx, "--steps", 1, "--out", folder)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "cannot" in proc.stderr and "Traceback" not in proc.stderr


def test_seed_minus_one_is_random_as_in_the_server(tiny_onnx, tmp_path):
    import re

    seeds = []
    for i in range(2):
        proc = sdonnx("generate", "a cat", "--model", tiny_onnx, "--steps", 1, "--size", "64x64", "--seed", -1,
                      "--out", tmp_path / f"{i}.png")
        assert proc.returncode == 0, proc.stderr
        seeds.append(int(re.search(r"Seed: (\d+)", Image.open(tmp_path / f"{i}.png").text["parameters"])[1]))
    assert seeds[0] != seeds[1]


def test_help_states_the_size_multiple_the_models_need():
    import typer

    from sdonnx.cli.app import app

    command = typer.main.get_command(app).commands["generate"]
    help_text = " ".join(p.help for p in command.params if p.param_type_name == "option")
    assert "multiples of 64 for SD 1.x and 2.x, of 32 for the embedded model" in help_text
    from sdonnx.runtime.pipeline import default_model_path, image_sizes

    assert image_sizes(default_model_path()) == (128, 32)  # what the help says of the embedded model
    assert "multiples of 32 pixels" in sdonnx("info").stdout
    assert "-1 or omitted: a random one" in help_text


def test_a_broken_scheduler_config_is_one_line_for_every_command(tiny_onnx, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_onnx, model)
    (model / "scheduler" / "scheduler_config.json").write_text('{"beta_start": 0.00085,')
    for args in (["info", model], ["generate", "a cat", "--model", model, "--out", tmp_path / "o"]):
        proc = sdonnx(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "scheduler_config.json is not valid JSON (line 1" in proc.stderr
    (model / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": "many"}')
    proc = sdonnx("info", model)
    assert proc.returncode == 2 and "num_train_timesteps 'many' is not a valid value" in proc.stderr, proc.stderr


def test_an_inpainting_model_without_a_mask_says_a_mask_is_needed(inpaint_pipeline, tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "in.png")
    proc = sdonnx("generate", "a cat", "--model", inpaint_pipeline.config.path, "--steps", 1,
                  "--init-image", tmp_path / "in.png", "--out", tmp_path / "o")
    assert proc.returncode == 2, proc.stderr
    assert "is an inpainting model: it needs an init image and a mask" in proc.stderr


def test_export_of_a_truncated_safetensors_file_names_it(tiny_source, tmp_path):
    import os
    import shutil

    source = tmp_path / "source"
    shutil.copytree(tiny_source, source)
    weights = source / "unet" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    proc = sdonnx("export", source, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert f"{weights} is truncated or damaged" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    (source / "unet" / "config.json").write_text("{")
    proc = sdonnx("export", source, tmp_path / "out")
    assert proc.returncode == 2 and "unet/config.json is not valid JSON" in proc.stderr, proc.stderr
