"""Invisible watermark: the DWT "dwtDct" method of the invisible-watermark package, on numpy.

Stable Diffusion's reference txt2img scripts mark every image with invisible-watermark 0.2.0
(`WatermarkEncoder.encode(bgr, "dwtDct")`, github.com/ShieldMnt/invisible-watermark,
imwatermark/maxDct.py): the image's U channel (OpenCV's BGR->YUV) goes through one level of
the Haar wavelet transform; the approximation band is cut into 4x4 blocks, block k carries bit
k mod L of the message, and each block's largest coefficient (its DC term excluded) is moved
to (floor(|c| / 36) + 0.25 + 0.5 * bit) * 36, keeping its sign. Decoding reads
(|c| mod 36) > 18 from every block and averages the blocks of each bit. That package pulls
torch and OpenCV, so the same method is written here on numpy and PyWavelets (the `watermark`
extra); the package is the tests' reference in both directions.

Differences from the package, none of which a decoder sees: the wavelet's detail bands go
back as they came (the package's inverse transform passes them swapped, (v, h, d), which
transposes every 2x2 pixel block of the U channel); the edited U channel is rounded to 8 bits,
not truncated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdonnx.runtime.errors import InputError, SdonnxError, install_hint

SCALE = 36.0  # the package's default scale for the U channel (scales=[0, 36, 36]; V is never used)
BLOCK = 4  # side of a block of wavelet coefficients
MIN_PIXELS = 256 * 256  # the package refuses smaller images, both ways
# The messages Stable Diffusion's reference scripts embed (CompVis' scripts/txt2img.py for
# SD 1.x, Stability AI's for SD 2.x).
SD1_MESSAGE = "StableDiffusionV1"
SD2_MESSAGE = "SDV2"
KNOWN_MESSAGES = (SD1_MESSAGE, SD2_MESSAGE)
# Whether an image carries a mark at all: embedding leaves every block's peak at 0.25 or 0.75
# of the scale (mod the scale); the share of blocks whose peak lies within ON_GRID of either is
# 0.84-0.98 on marked images, 0.45-0.72 after JPEG at quality 90, and 0.02-0.09 on unmarked
# generated pictures, about 0.2 (2 x 2 x ON_GRID) on noise (measured on the embedded model's
# images and random ones, 2026-12-01). Block agreement alone cannot tell: on a smooth unmarked
# picture neighbouring blocks vote alike.
ON_GRID = 0.05
MIN_ON_GRID = 0.35
# A mark read at its own length has its bits' blocks agree 0.8-1 (JPEG-free); at a wrong length
# the blocks of a "bit" carry different bits and agree about 0.2-0.4.
MIN_AGREEMENT = 0.5

# OpenCV's 8-bit BGR<->YUV (cv::COLOR_BGR2YUV, COLOR_YUV2BGR; modules/imgproc color_yuv): ITU-R
# BT.601 luma, U = 0.492 (B - Y) and V = 0.877 (R - Y) offset by 128, in 14-bit fixed point,
# so that decoding reads the U values the package's OpenCV reads.
_SHIFT = 14
_R2Y, _G2Y, _B2Y, _B2U, _R2V = 4899, 9617, 1868, 8061, 14369
_U2B, _U2G, _V2G, _V2R = 33292, -6472, -9519, 18678


def _descale(x: np.ndarray) -> np.ndarray:
    return (x + (1 << (_SHIFT - 1))) >> _SHIFT


@dataclass(frozen=True)
class Decoded:
    """A decode's outcome: `bits` (L,) uint8; `confidence` in [0, 1], how fully each bit's
    blocks agree, averaged over the bits (1 on an untouched marked image); `on_grid` the share
    of blocks whose peak sits where embedding puts it (MIN_ON_GRID); `text` the bits as UTF-8
    when they are, else None."""

    bits: np.ndarray
    confidence: float
    on_grid: float

    @property
    def found(self) -> bool:
        return self.on_grid >= MIN_ON_GRID

    @property
    def text(self) -> str | None:
        if len(self.bits) % 8:
            return None
        try:
            return np.packbits(self.bits).tobytes().decode("utf-8")
        except UnicodeDecodeError:
            return None


def require() -> None:
    """SdonnxError with the install command unless PyWavelets is installed."""
    _pywt()


def _pywt():
    try:
        import pywt
    except ImportError:
        raise SdonnxError(f"the invisible watermark needs PyWavelets: {install_hint('watermark')}") from None
    return pywt


def message_bits(message: str | bytes) -> np.ndarray:
    """A message's bits (8 per byte of its UTF-8, most significant first), as the package's
    `set_watermark("bytes", ...)` makes them: (8 * bytes,) uint8. InputError for an empty one."""
    data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    if not data:
        raise InputError("the watermark text is empty; give some text or leave it out for the default")
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))


def _u_channel(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, U, V (int64) of an (H, W, 3) uint8 RGB image, as OpenCV's BGR2YUV computes them."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    y = _descale(r * _R2Y + g * _G2Y + b * _B2Y)
    u = _descale((b - y) * _B2U + (128 << _SHIFT))
    v = _descale((r - y) * _R2V + (128 << _SHIFT))
    return tuple(np.clip(c, 0, 255) for c in (y, u, v))


def _to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB from 8-bit Y, U, V, as OpenCV's YUV2BGR computes it."""
    u, v = u.astype(np.int64) - 128, v.astype(np.int64) - 128
    rgb = np.stack([y + _descale(v * _V2R), y + _descale(u * _U2G + v * _V2G), y + _descale(u * _U2B)], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _blocks(band: np.ndarray) -> np.ndarray:
    """The band's whole 4x4 blocks, row by row: (rows * cols, 16), a view where possible."""
    rows, cols = band.shape[0] // BLOCK, band.shape[1] // BLOCK
    cut = band[: rows * BLOCK, : cols * BLOCK]
    return cut.reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3).reshape(rows * cols, BLOCK * BLOCK)


def _peaks(blocks: np.ndarray) -> np.ndarray:
    """Index in each block of the largest |coefficient| after the first (the package's rule)."""
    return np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1


def _check_size(width: int, height: int) -> None:
    if width * height < MIN_PIXELS:
        raise InputError(f"the image is {width}x{height}: the invisible watermark needs at least "
                         f"{MIN_PIXELS:,} pixels (256x256), as the invisible-watermark package does")


def capacity(width: int, height: int) -> int:
    """The bits an image of `width` x `height` pixels holds once: its count of 4x4 blocks of
    Haar coefficients, about width * height / 64."""
    return ((height // 4 * 4) // 2 // BLOCK) * ((width // 4 * 4) // 2 // BLOCK)


def check_fits(message: str | bytes, width: int, height: int) -> np.ndarray:
    """The message's bits, or InputError when a `width` x `height` image cannot carry them
    (under 256x256, or more bits than blocks: capacity); also checks PyWavelets is installed,
    so that a generation can be refused before it samples."""
    require()
    bits = message_bits(message)
    _check_size(width, height)
    if len(bits) > (room := capacity(width, height)):
        raise InputError(f"the watermark text takes {len(bits)} bits, and a {width}x{height} image "
                         f"holds {room}; shorten the text to {room // 8} bytes or less")
    return bits


def embed(image: Image.Image, message: str | bytes = SD1_MESSAGE) -> Image.Image:
    """`image` (any mode, at least 256x256) as RGB with `message` embedded by the dwtDct method
    (module docstring); the package's `WatermarkDecoder("bytes", 8 * len(message))` reads it
    back. The image's alpha, if any, is kept. Raises InputError for an image under 256x256 or
    a message with more bits than the image has blocks (capacity)."""
    bits = check_fits(message, image.width, image.height)
    pywt = _pywt()
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
    y, u, v = _u_channel(rgb)
    approx, details = pywt.dwt2(u[:height, :width], "haar")
    blocks = _blocks(approx).copy()
    peaks = _peaks(blocks)
    rows = np.arange(len(blocks))
    value = blocks[rows, peaks]
    wanted = bits[rows % len(bits)]
    blocks[rows, peaks] = np.sign(value + (value == 0)) * (np.abs(value) // SCALE + 0.25 + 0.5 * wanted) * SCALE
    n_rows, n_cols = approx.shape[0] // BLOCK, approx.shape[1] // BLOCK
    approx[: n_rows * BLOCK, : n_cols * BLOCK] = blocks.reshape(n_rows, n_cols, BLOCK, BLOCK).transpose(
        0, 2, 1, 3).reshape(n_rows * BLOCK, n_cols * BLOCK)
    u[:height, :width] = np.clip(np.round(pywt.idwt2((approx, details), "haar")), 0, 255)
    out = rgb.copy()
    out[:height, :width] = _to_rgb(y[:height, :width], u[:height, :width], v[:height, :width])
    marked = Image.fromarray(out)
    if alpha is not None:
        marked.putalpha(alpha)
    marked.info = dict(image.info)
    return marked


def reads_back(image: Image.Image, message: str | bytes) -> bool:
    """Whether `image` decodes to exactly `message`'s bits: the dwtDct method fails on some
    pictures (a block whose largest coefficient is barely the largest), whoever embeds."""
    bits = message_bits(message)
    return np.array_equal(decode(image, len(bits)).bits, bits)


def decode(image: Image.Image, length: int) -> Decoded:
    """Read a `length`-bit dwtDct watermark from `image` (at least 256x256): each bit is 1
    where the mean of its blocks' votes exceeds 127/255, as the package decides. InputError
    for a small image or a length the image cannot hold."""
    pywt = _pywt()
    _check_size(image.width, image.height)
    if not 1 <= length <= (room := capacity(image.width, image.height)):
        raise InputError(f"--length must be from 1 to {room} bits for a {image.width}x{image.height} image, "
                         f"got {length}")
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
    _, u, _ = _u_channel(rgb[:height, :width])
    approx, _ = pywt.dwt2(u, "haar")
    blocks = _blocks(approx)
    value = np.abs(blocks[np.arange(len(blocks)), _peaks(blocks)])
    residue = value % SCALE / SCALE
    votes = (residue > 0.5).astype(np.float64)
    on_grid = float(np.mean(np.minimum(np.abs(residue - 0.25), np.abs(residue - 0.75)) < ON_GRID))
    which = np.arange(len(blocks)) % length
    means = np.bincount(which, votes, minlength=length) / np.bincount(which, minlength=length)
    bits = (means * 255 > 127).astype(np.uint8)
    return Decoded(bits, float(np.mean(np.abs(means - 0.5) * 2)), on_grid)


def find(image: Image.Image, length: int | None = None) -> Decoded:
    """The watermark of `image`: of `length` bits, or when None the length of the messages
    Stable Diffusion's scripts embed (KNOWN_MESSAGES) whose bits agree best. Raises InputError
    when the image carries no mark (Decoded.found), naming the share measured."""
    _check_size(image.width, image.height)
    lengths = [length] if length is not None else [
        n for n in sorted({8 * len(m.encode()) for m in KNOWN_MESSAGES}, reverse=True)
        if n <= capacity(image.width, image.height)]
    best = max((decode(image, n) for n in lengths), key=lambda d: d.confidence)
    if not best.found:
        raise InputError(f"no invisible watermark found in this {image.width}x{image.height} image: "
                         f"{best.on_grid:.0%} of its blocks are where a mark puts them, a marked image has "
                         f"{MIN_ON_GRID:.0%} or more (JPEG, resizing and crops off the top or left erase a mark)")
    if length is not None and best.confidence < MIN_AGREEMENT:
        raise InputError(f"this image carries an invisible watermark, but read as {length} bits its blocks agree "
                         f"only {best.confidence:.0%} (a mark read at its own length: {MIN_AGREEMENT:.0%} or more); "
                         "the length is probably not the mark's")
    if length is None and best.text not in KNOWN_MESSAGES:
        raise InputError(f"this image carries an invisible watermark ({best.on_grid:.0%} of its blocks where a mark "
                         "puts them) but not one of Stable Diffusion's texts; give its --length in bits "
                         "(8 per byte of text)")
    return best
