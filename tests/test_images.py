"""Init images and masks become the RGB picture a person sees (issue 18): bit depth scaled,
EXIF orientation applied, transparency flattened (init images on white, masks on black)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sdonnx.runtime.errors import InputError
from sdonnx.runtime.images import MASK_BACKGROUND, load_image

ORIENTATION = 0x0112


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int = 64, height: int = 48) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_a_16_bit_grey_png_is_scaled_not_clipped_to_white(tmp_path):
    grey16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    loaded = np.asarray(load_image(tmp_path / "deep.png"))
    expected = np.round(grey16 / 257).astype(np.uint8)
    assert loaded.shape == (48, 64, 3)
    assert np.array_equal(loaded[..., 0], expected) and np.array_equal(loaded[..., 2], expected)
    # What PIL's plain convert("RGB") does, the bug: nearly all white.
    assert (np.asarray(Image.open(tmp_path / "deep.png").convert("RGB")) == 255).mean() > 0.9


def test_exif_orientation_is_applied(tmp_path):
    """A phone's portrait photo: 96x128 upright, stored rotated as 128x96 with orientation 6
    ("rotate 90 clockwise to display")."""
    upright = Image.fromarray(gradient(96, 128))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: 6 undoes it
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    stored.save(tmp_path / "phone.jpg", quality=100, subsampling=0, exif=exif.tobytes())
    assert Image.open(tmp_path / "phone.jpg").size == (128, 96)
    loaded = load_image(tmp_path / "phone.jpg")
    assert loaded.size == (96, 128)
    assert np.abs(np.asarray(loaded, np.int16) - np.asarray(upright, np.int16)).mean() < 3


def test_a_sideways_jpeg_gives_a_portrait_picture(tiny_pipeline, tmp_path):
    stored = Image.fromarray(gradient(128, 96))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    image = tiny_pipeline.generate("a cat", steps=2, seed=1, init_image=tmp_path / "phone.jpg", strength=0.5)[0]
    assert image.size == (96, 128)


def test_transparency_goes_on_white_for_init_images_and_black_for_masks():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:8, :, :] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent black
    png = encoded(Image.fromarray(rgba, "RGBA"))
    init = np.asarray(load_image(png))
    mask = np.asarray(load_image(png, "mask image", MASK_BACKGROUND))
    assert init[0, 0].tolist() == [255, 0, 0] and init[15, 0].tolist() == [255, 255, 255]
    assert mask[0, 0].tolist() == [255, 0, 0] and mask[15, 0].tolist() == [0, 0, 0]
    half = rgba.copy()
    half[:, :, 3] = 128
    assert np.asarray(load_image(encoded(Image.fromarray(half, "RGBA"))))[0, 0].tolist() == [255, 127, 127]


def test_palette_and_grey_alpha_images_are_flattened_too():
    la = Image.fromarray(np.stack([np.full((8, 8), 40, np.uint8), np.zeros((8, 8), np.uint8)], -1), "LA")
    assert np.asarray(load_image(encoded(la)))[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([10, 20, 30] * 256)
    assert np.asarray(load_image(encoded(palette, transparency=0)))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(encoded(palette)))[0, 0].tolist() == [10, 20, 30]


def test_bytes_that_are_not_an_image_name_what_was_expected():
    with pytest.raises(InputError, match="mask image data cannot be read as an image"):
        load_image(b"not an image", "mask image")


def test_a_folder_is_not_an_image(tmp_path):
    with pytest.raises(InputError, match="is a folder, not an image file"):
        load_image(tmp_path)
