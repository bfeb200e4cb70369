"""runtime/watermark.py against the invisible-watermark package (imwatermark), both ways."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdonnx.runtime import watermark
from sdonnx.runtime.errors import InputError

cv2 = pytest.importorskip("cv2")
imwatermark = pytest.importorskip("imwatermark")

# 20 sizes from 256x256 up, odd ones among them (the method works on the part a multiple of 4).
SIZES = [(256 + 41 * i, 256 + 29 * ((7 * i) % 11)) for i in range(20)]


def textured(width: int, height: int, seed: int) -> np.ndarray:
    """An (H, W, 3) uint8 RGB picture of random colour texture. Whether the dwtDct method
    reads its own mark depends on the picture (each 4x4 block's largest coefficient must stay
    the largest after it moves); on such texture the package reads its own almost always."""
    return np.random.default_rng(seed).integers(40, 216, (height, width, 3)).astype(np.uint8)


def readable(width: int, height: int, message: str, seed: int) -> np.ndarray:
    """A textured picture on which the package reads back its own mark of `message` (with
    7.5 blocks per bit, SD 1.x's 136-bit text at 256x256 fails it on some pictures, whoever
    embeds: the method's limit, not an implementation's)."""
    for attempt in range(seed * 100, seed * 100 + 100):
        rgb = textured(width, height, attempt)
        if package_decode(package_embed(rgb, message), 8 * len(message)) == message.encode():
            return rgb
    raise AssertionError(f"no picture of {width}x{height} carries {message!r} for the package itself")


def package_embed(rgb: np.ndarray, message: str) -> np.ndarray:
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark("bytes", message.encode())
    return encoder.encode(np.ascontiguousarray(rgb[:, :, ::-1]), "dwtDct")[:, :, ::-1]


def package_decode(rgb: np.ndarray, bits: int) -> bytes:
    return imwatermark.WatermarkDecoder("bytes", bits).decode(np.ascontiguousarray(rgb[:, :, ::-1]), "dwtDct")


def package_bits(rgb: np.ndarray, bits: int) -> np.ndarray:
    decoder = imwatermark.WatermarkDecoder("bits", bits)
    return np.array(decoder.decode(np.ascontiguousarray(rgb[:, :, ::-1]), "dwtDct"), dtype=np.uint8)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    data = io.BytesIO()
    image.save(data, "JPEG", quality=quality)
    return Image.open(io.BytesIO(data.getvalue())).convert("RGB")


def test_colour_conversion_is_opencvs():
    rgb = np.random.default_rng(0).integers(0, 256, (97, 131, 3)).astype(np.uint8)
    y, u, v = watermark._u_channel(rgb)
    expected = cv2.cvtColor(np.ascontiguousarray(rgb[:, :, ::-1]), cv2.COLOR_BGR2YUV)
    assert np.array_equal(np.stack([y, u, v], axis=-1), expected)
    back = cv2.cvtColor(expected, cv2.COLOR_YUV2BGR)[:, :, ::-1]
    assert np.array_equal(watermark._to_rgb(*(expected[..., i] for i in range(3))), back)


@pytest.mark.parametrize("message", [watermark.SD1_MESSAGE, watermark.SD2_MESSAGE])
def test_package_reads_what_sdonnx_embeds(message):
    for i, (width, height) in enumerate(SIZES):
        marked = np.asarray(watermark.embed(Image.fromarray(readable(width, height, message, i)), message))
        assert marked.shape == (height, width, 3)
        assert package_decode(marked, 8 * len(message)) == message.encode(), (width, height)


@pytest.mark.parametrize("message", [watermark.SD1_MESSAGE, watermark.SD2_MESSAGE])
def test_sdonnx_reads_what_the_package_embeds(message):
    for i, (width, height) in enumerate(SIZES):
        marked = Image.fromarray(package_embed(readable(width, height, message, 100 + i), message))
        found = watermark.find(marked)
        assert found.text == message, (width, height)
        assert np.array_equal(found.bits, watermark.message_bits(message))


def test_decoders_agree_bit_for_bit_also_on_damaged_and_unmarked_images():
    """The same bits as the package's decoder wherever it reads, right or wrong: marked,
    JPEG-damaged and unmarked pictures, smooth and textured."""
    for i, (width, height) in enumerate(SIZES[:8]):
        plain = Image.fromarray(textured(width, height, 200 + i))
        smooth = plain.resize((width // 16, height // 16)).resize((width, height), Image.BICUBIC)
        for image in (plain, smooth, watermark.embed(plain), jpeg(watermark.embed(plain), 90),
                      jpeg(watermark.embed(smooth, "SDV2"), 75)):
            for bits in (32, 136):
                ours = watermark.decode(image, bits).bits
                assert np.array_equal(ours, package_bits(np.asarray(image), bits))


def test_negative_controls():
    """The checks can fail: an unmarked picture decodes to other bits and is refused; a
    mark read at the wrong length is not the message; another text is another mark."""
    rgb = textured(300, 280, 7)
    assert package_decode(rgb, 136) != watermark.SD1_MESSAGE.encode()
    with pytest.raises(InputError, match="no invisible watermark found"):
        watermark.find(Image.fromarray(rgb))
    marked = watermark.embed(Image.fromarray(rgb), "SDV3")
    assert package_decode(np.asarray(marked), 32) == b"SDV3"
    assert watermark.decode(marked, 40).text != "SDV3\0"
    with pytest.raises(InputError, match="not one of Stable Diffusion's texts"):
        watermark.find(marked)
    assert watermark.find(marked, 32).text == "SDV3"
    with pytest.raises(InputError, match="read as 40 bits its blocks agree only .* the length is probably not"):
        watermark.find(marked, 40)
    assert watermark.reads_back(marked, "SDV3") and not watermark.reads_back(marked, "SDV4")


def test_embed_keeps_size_alpha_and_changes_little():
    rgba = Image.fromarray(textured(301, 258, 9)).convert("RGBA")
    rgba.putalpha(128)
    marked = watermark.embed(rgba, "SDV2")
    assert marked.mode == "RGBA" and marked.size == rgba.size
    assert np.array_equal(np.asarray(marked)[..., 3], np.asarray(rgba)[..., 3])
    error = np.asarray(marked.convert("RGB"), np.float64) - np.asarray(rgba.convert("RGB"), np.float64)
    assert 10 * np.log10(255**2 / np.mean(error**2)) > 35


def test_refusals():
    small = Image.fromarray(textured(255, 256, 0))
    with pytest.raises(InputError, match="at least 65,536 pixels"):
        watermark.embed(small)
    with pytest.raises(InputError, match="at least 65,536 pixels"):
        watermark.find(small)
    with pytest.raises(InputError, match="at least 65,536 pixels"):
        watermark.find(Image.new("RGB", (32, 32)))  # too small for any known text's length
    image = Image.fromarray(textured(256, 256, 0))
    with pytest.raises(InputError, match="takes 1032 bits.*holds 1024; shorten the text to 128 bytes"):
        watermark.embed(image, "x" * 129)
    with pytest.raises(InputError, match="empty"):
        watermark.embed(image, "")
    with pytest.raises(InputError, match="--length must be from 1 to 1024"):
        watermark.decode(image, 1025)


def test_generate_with_and_without_watermark():
    """Off, the picture is the one generate() always made, byte for byte; on, it carries SD
    1.x's text (the embedded model is 1.x-shaped) and is otherwise close to it."""
    from sdonnx.runtime import Pipeline

    pipe = Pipeline.load(provider="cpu")
    settings = dict(steps=3, seed=5, width=256, height=256)
    plain = pipe.generate("a red house by a lake", **settings)[0]
    assert pipe.generate("a red house by a lake", watermark=False, **settings)[0].tobytes() == plain.tobytes()
    marked = pipe.generate("a red house by a lake", watermark=True, **settings)[0]
    assert pipe.watermark_message == watermark.SD1_MESSAGE
    assert marked.tobytes() != plain.tobytes()
    assert watermark.find(marked).text == watermark.SD1_MESSAGE
    assert package_decode(np.asarray(marked), 136) == watermark.SD1_MESSAGE.encode()
    assert marked.info["parameters"] == plain.info["parameters"]
    with pytest.raises(InputError, match="at least 65,536 pixels"):
        pipe.generate("a red house", watermark=True, steps=1, width=128, height=128)


def sdonnx(*args):
    return subprocess.run([sys.executable, "-m", "sdonnx.cli.app", *map(str, args)], capture_output=True, text=True)


def test_cli_watermark_round_trip(tmp_path):
    marked = tmp_path / "marked.png"
    run = sdonnx("generate", "a harbour at dusk", "--steps", "2", "--size", "256x256", "--seed", "1",
                 "--watermark-text", "sdonnx test", "-o", marked)
    assert run.returncode == 0, run.stderr
    run = sdonnx("watermark", "decode", marked, "--length", "88")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("'sdonnx test' (88 bits")
    plain = tmp_path / "plain.png"
    assert sdonnx("generate", "a harbour at dusk", "--steps", "2", "--size", "256x256", "--seed", "1",
                  "-o", plain).returncode == 0
    run = sdonnx("watermark", "decode", plain)
    assert run.returncode == 2 and run.stderr.startswith("error: no invisible watermark found")
    again = tmp_path / "again.png"
    run = sdonnx("watermark", "embed", plain, again)
    assert run.returncode == 0, run.stderr
    assert "'StableDiffusionV1'" in sdonnx("watermark", "decode", again).stdout
    run = sdonnx("watermark", "embed", plain, again)
    assert run.returncode == 2 and "already exists" in run.stderr
    run = sdonnx("watermark", "embed", plain, tmp_path / "marked.jpg")
    assert run.returncode == 2 and "write the marked image as .png" in run.stderr
    run = sdonnx("generate", "a harbour at dusk", "--steps", "2", "--size", "256x256", "--seed", "1", "--watermark",
                 "-o", tmp_path / "marked-lossy.jpg")
    assert run.returncode == 0 and "JPEG and WebP erase it" in run.stderr
    rgba = Image.open(plain).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(tmp_path / "rgba.png")
    assert sdonnx("watermark", "embed", tmp_path / "rgba.png", tmp_path / "rgba-marked.png").returncode == 0
    marked_rgba = Image.open(tmp_path / "rgba-marked.png")
    assert marked_rgba.mode == "RGBA" and np.asarray(marked_rgba)[..., 3].min() == 200
    run = sdonnx("generate", "x", "--steps", "1", "--size", "256x256", "--watermark-text", "y" * 200,
                 "-o", tmp_path / "long.png")
    assert run.returncode == 2 and "shorten the text" in run.stderr
    assert not (tmp_path / "long.png").exists()


def test_server_marks_every_image(tmp_path):
    pytest.importorskip("fastapi")
    from serving import Server

    server = Server("--provider", "cpu", "--watermark-text", "served")
    try:
        reply = server.post("/sdapi/v1/txt2img", {"prompt": "a lighthouse", "steps": 2, "width": 256, "height": 256, "seed": 3})
        assert reply.status == 200, reply.text
        import base64

        image = Image.open(io.BytesIO(base64.b64decode(reply.body["images"][0])))
        assert watermark.find(image, 48).text == "served"
        small = server.post("/sdapi/v1/txt2img", {"prompt": "a lighthouse", "steps": 1, "width": 128, "height": 128})
        assert small.status == 400 and "256x256" in small.message
    finally:
        server.stop()
