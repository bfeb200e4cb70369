"""Tiled VAE decode and encode: any image size in bounded memory.

The VAE decoder's activations grow with the image (an SD 1.5 decode at 512x512 holds about
0.8 GB, at 2048x2048 about 16 times that), so large images are decoded in pieces, in one of
two ways:

- `StagedVae`, for parts that sdonnx exported (export/vae_stages.py cut them at their group
  norms): each stage runs over horizontal bands of the image with a few rows of overlap, the
  group norms get the statistics of the whole tensor (as AUTOMATIC1111's Tiled VAE extension
  does), so the result is the untiled decode up to float rounding. Tensors passed between
  stages over SPILL_BYTES wait in a temporary file, not in memory.
- `tiled`, for other folders and TAESD: overlapping tiles run through the whole network and
  their seams are blended linearly, as diffusers' `AutoencoderKL.enable_tiling()` does
  (`tiled_decode` / `_tiled_encode`): tiles of `tile` latent pixels start every
  tile x (1 - overlap), each tile's decoded edges are cross-faded over tile x overlap pixels
  with the tile above and the tile to the left, and each tile keeps its first
  tile x (1 - overlap) pixels. The result equals diffusers' tiled decode; it differs from the
  untiled decode because each tile's group norms and mid-block attention see that tile alone
  (tests/test_vae.py measures both).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from sdonnx.runtime import parts
from sdonnx.runtime.checks import is_int, shown
from sdonnx.runtime.errors import InputError, ModelFolderError
from sdonnx.runtime.memory import trim_heap

OVERLAP = 0.25  # diffusers' tile_overlap_factor
# Tile sides are whole multiples of this many latent pixels (32 image pixels): then a tile's
# stride (3/4 of it) and its blend (1/4) are whole latent pixels and the tiles add up to the
# image exactly; it is also the smallest tile.
TILE_STEP = 4


def _blend_rows(above: np.ndarray, tile: np.ndarray, extent: int) -> None:
    """Cross-fade the first `extent` rows of `tile` from the last ones of `above`, in place."""
    extent = min(above.shape[2], tile.shape[2], extent)
    if extent:
        weight = (np.arange(extent, dtype=np.float32) / extent)[:, None]
        tile[:, :, :extent, :] = above[:, :, -extent:, :] * (1 - weight) + tile[:, :, :extent, :] * weight


def _blend_columns(left: np.ndarray, tile: np.ndarray, extent: int) -> None:
    """Cross-fade the first `extent` columns of `tile` from the last ones of `left`, in place."""
    extent = min(left.shape[3], tile.shape[3], extent)
    if extent:
        weight = np.arange(extent, dtype=np.float32) / extent
        tile[:, :, :, :extent] = left[:, :, :, -extent:] * (1 - weight) + tile[:, :, :, :extent] * weight


def tiled(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile: int, scale: float,
          overlap: float = OVERLAP) -> np.ndarray:
    """fn applied to overlapping `tile` x `tile` windows of x (N, C, H, W), blended.

    `scale`: fn's output side per input side (8 for a decoder, 1/8 for an encoder).
    Returns (N, C_out, H * scale, W * scale) float32.
    """
    stride = int(tile * (1 - overlap))
    tile_out = int(tile * scale)
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    rows = [[fn(x[:, :, i:i + tile, j:j + tile]).astype(np.float32)
             for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, t in enumerate(row):
            if i > 0:
                _blend_rows(rows[i - 1][j], t, extent)
            if j > 0:
                _blend_columns(row[j - 1], t, extent)
            kept.append(t[:, :, :keep, :keep])
        out_rows.append(np.concatenate(kept, axis=3))
    return np.concatenate(out_rows, axis=2)


def check_tiles(value) -> int | str:
    """`vae_tiles` as given: "auto", "off", or a tile side in pixels (a multiple of
    TILE_STEP x 8 = 32); an InputError names what is wrong."""
    if value in ("auto", "off"):
        return value
    if isinstance(value, str) and value.isascii() and value.isdecimal():
        value = int(value)
    step = TILE_STEP * parts.VAE_SCALE
    if not is_int(value) or value % step or value < step:
        raise InputError(f"vae tiles must be auto, off, or a tile side in pixels (a multiple of {step}); "
                         f"got {shown(value)}")
    return int(value)


def tile_latent(tiles: int | str, default_tile: int, height: int, width: int,
                scale: int = parts.VAE_SCALE) -> int | None:
    """The tile side in latent pixels for a (height, width) latent, or None for one piece:
    "auto" tiles above `default_tile` (the VAE's training size, diffusers' rule), "off" never,
    a number of pixels (`scale` pixels per latent pixel) always when the latent is larger than
    one tile."""
    if tiles == "off":
        return None
    size = default_tile if tiles == "auto" else int(tiles) // scale
    return size if max(height, width) > size else None


# AUTOMATIC1111's "Approx cheap" preview (modules/sd_vae_approx.py, cheap_approximation):
# RGB in [-1, 1] as a linear map of SD 1.x/2.x's four scaled latent channels.
CHEAP_RGB = np.array([[0.298, 0.207, 0.208],
                      [0.187, 0.286, 0.173],
                      [-0.158, 0.189, 0.264],
                      [-0.184, -0.271, -0.473]], dtype=np.float32)


def cheap_rgb(latent: np.ndarray) -> np.ndarray:
    """A preview of scaled latents (4, h, w), float32, as 8-bit RGB (h, w, 3) at latent
    resolution (1/8 of the image's side): a 4x3 linear map, microseconds where a VAE decode
    takes seconds. Colours and layout only; no detail."""
    rgb = np.einsum("chw,cr->hwr", latent.astype(np.float32), CHEAP_RGB)
    return (np.clip((rgb + 1) / 2, 0, 1) * 255).round().astype(np.uint8)


# A tensor passed between stages larger than this (bytes) waits in a temporary file: the SD 1.5
# decoder's last blocks pass 128-256 MB tensors from stage to stage at 512x512, 2-4 GB at
# 2048x2048; reading them back costs a fraction of the convolutions' time.
SPILL_BYTES = 32 * 2**20


# A stage that mixes every position (the mid-block's self-attention) runs on the whole tensor up
# to this many latent pixels (a 1024x1024 image: 16384 positions); above it, over the bands
# with WIDE_HALO latent rows of context on each side (AUTOMATIC1111's Tiled VAE runs that
# attention per tile): the one place where pieces differ from one piece. At 2048x2048 one
# attention over all 65536 positions would take minutes, and 16 GB where the provider
# materializes its map.
WHOLE_LATENT_PIXELS = 128 * 128
WIDE_HALO = 16


class _Rows:
    """A (C, H, W) tensor written and read in whole rows: in memory, or, over SPILL_BYTES, in
    an unlinked temporary file (in $TMPDIR) read back with plain reads, so that its pages sit
    in the page cache rather than in the process's resident memory (where $TMPDIR is a tmpfs,
    they are in memory all the same)."""

    def __init__(self, channels: int, height: int, width: int, dtype: np.dtype):
        self.shape, self.dtype = (channels, height, width), np.dtype(dtype)
        nbytes = channels * height * width * self.dtype.itemsize
        self.array = np.empty(self.shape, self.dtype) if nbytes <= SPILL_BYTES else None
        self.file = tempfile.TemporaryFile(prefix="sdonnx-vae-") if self.array is None else None

    def _offset(self, channel: int, row: int) -> int:
        _, height, width = self.shape
        return (channel * height + row) * width * self.dtype.itemsize

    def write(self, row: int, block: np.ndarray) -> None:
        """Rows row .. row + len of block (C, h, W); an OSError names the folder when the
        temporary file cannot take them."""
        if self.array is not None:
            self.array[:, row:row + block.shape[1]] = block
            return
        block = np.ascontiguousarray(block, self.dtype)
        try:
            for c in range(self.shape[0]):
                self.file.seek(self._offset(c, row))
                self.file.write(memoryview(block[c]).cast("B"))
        except OSError as e:
            raise OSError(e.errno, f"the tiled VAE's temporary file in {tempfile.gettempdir()} cannot grow "
                                   f"({e.strerror}); set TMPDIR to a folder with room") from None

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start .. stop, (C, stop - start, W)."""
        if self.array is not None:
            return self.array[:, start:stop]
        out = np.empty((self.shape[0], stop - start, self.shape[2]), self.dtype)
        for c in range(self.shape[0]):
            self.file.seek(self._offset(c, start))
            self.file.readinto(memoryview(out[c]).cast("B"))
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.array = None


class _GroupNorm:
    """torch.nn.GroupNorm with the statistics of the whole tensor, gathered band by band as
    its input is written: each band's mean and sum of squared deviations, combined in float64
    (Chan, Golub and LeVeque's pairwise update), so a mean far from zero loses nothing."""

    def __init__(self, spec: dict, arrays):
        self.input, self.groups, self.epsilon = spec["input"], spec["groups"], spec["epsilon"]
        self.scale, self.bias, self.weight, self.shift = (
            arrays[f"{spec['index']}.{k}"].astype(np.float64) for k in ("scale", "bias", "weight", "shift"))
        self.count, self.mean, self.m2 = 0, np.zeros(self.groups), np.zeros(self.groups)
        self._affine = None

    def gather(self, block: np.ndarray) -> None:
        """Add the rows of block (C, h, W) to the statistics."""
        grouped = block.reshape(self.groups, -1)
        n = grouped.shape[1]
        mean = grouped.mean(axis=1, dtype=np.float64)
        deviations = grouped - mean[:, None].astype(grouped.dtype)
        m2 = np.einsum("gi,gi->g", deviations, deviations, dtype=np.float64)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    def __call__(self, block: np.ndarray) -> np.ndarray:
        """The normalized block (C, h, W), float32: one multiply-add per element, the group's
        statistics and both affine maps folded into a scale and an offset per channel."""
        if self._affine is None:
            inverse = self.scale / np.sqrt(self.m2 / self.count + self.epsilon)
            per_group = len(self.weight) // self.groups
            a = np.repeat(inverse, per_group) * self.weight
            b = np.repeat(self.bias - self.mean * inverse, per_group) * self.weight + self.shift
            self._affine = (a.astype(np.float32)[:, None, None], b.astype(np.float32)[:, None, None])
        a, b = self._affine
        out = np.multiply(block, a, dtype=np.float32)
        out += b
        return out


class StagedVae:
    """A VAE part (decoder or encoder) run stage by stage over bands of rows, equal to running
    it whole (export/vae_stages.py explains the stages; AUTOMATIC1111's Tiled VAE extension,
    pkuliyi2015/multidiffusion-upscaler-for-automatic1111, is where the idea comes from).

    `open_stage(stage)`: the model (PartModel, runtime/onnx_model.py) of one entry of
    plan["stages"]; each is opened when its turn comes and closed after it, so that one stage's
    weights are in memory at a time (opening all 30 of SD 1.5's takes 0.4 s on onnxruntime).
    Call with x (1, C, H, W) (latents for a decoder, pixels for an encoder) and `band_rows`,
    the rows of each band in latent pixels; returns the part's output (1, C', H', W') as its
    model gives it; equal to the whole part's up to float rounding, except that above
    WHOLE_LATENT_PIXELS the mid-block attention sees a band of the image. InputError for a
    batch of more than one image or sides that are not whole latent pixels. Memory: one
    stage's weights and one band's activations, plus the tensors passed between stages (in a
    temporary file over SPILL_BYTES each)."""

    def __init__(self, plan: dict, open_stage: Callable[[dict], object]):
        self.plan, self.open_stage = plan, open_stage

    @staticmethod
    def read_plan(folder: Path) -> dict | None:
        """The stage plan of a part folder, or None when it has none or the part's files have
        changed since it was written (then tiles are blended); "arrays" holds the group norms'
        parameters. ModelFolderError for a plan that cannot be read."""
        file = folder / parts.VAE_STAGES
        if not file.is_file():
            return None
        plan = parts.read_json(file)
        try:
            stages = plan["stages"]
            if plan.get("format") != 1 or not all((folder / s["file"]).is_file() for s in stages):
                raise KeyError("stages")
            with np.load(folder / parts.VAE_STAGE_NORMS) as arrays:
                plan["arrays"] = {name: arrays[name] for name in arrays.files}
        except (KeyError, TypeError, OSError, ValueError):
            raise ModelFolderError(f"{file} is not a stage plan sdonnx can read; export the model again") from None
        model = folder / parts.ONNX_FILE
        return plan if model.is_file() and parts.weights_digest(model) == plan.get("weights") else None

    def __call__(self, x: np.ndarray, band_rows: int) -> np.ndarray:
        plan, factors = self.plan, self.plan["factors"]
        step = factors[plan["input"]]
        if x.shape[0] != 1:
            raise InputError(f"tiled VAE decodes and encodes take one image at a time, got a batch of {x.shape[0]}")
        if x.shape[2] % step or x.shape[3] % step:
            raise InputError(f"a tiled VAE needs sides that are multiples of {step} pixels, got "
                             f"{x.shape[3]}x{x.shape[2]}; resize the image or use vae_tiles=\"off\"")
        rows = x.shape[2] // step
        norms = {y: _GroupNorm(spec, plan["arrays"]) for y, spec in plan["norms"].items()}
        gathering = {norm.input: norm for norm in norms.values()}
        stages = plan["stages"]
        last = {}  # tensor -> the last stage that reads it (a norm's input: where its output is read)
        for k, stage in enumerate(stages):
            for name in stage["inputs"]:
                last[norms[name].input if name in norms else name] = k
        stores = {plan["input"]: _Rows(*x.shape[1:], x.dtype)}
        stores[plan["input"]].write(0, x[0])

        def read(name: str, start: int, stop: int, dtype) -> np.ndarray:
            source = norms[name].input if name in norms else name
            f = factors[source]
            block = stores[source].read(start * f, stop * f)
            return (norms[name](block) if name in norms else block).astype(dtype, copy=False)[None]

        def write(name: str, row: int, block: np.ndarray) -> None:
            if name not in stores:
                stores[name] = _Rows(block.shape[0], rows * factors[name], block.shape[2], block.dtype)
            stores[name].write(row * factors[name], block)
            if name in gathering:
                gathering[name].gather(block)

        for k, stage in enumerate(stages):
            model = self.open_stage(stage)
            halo = stage["halo"]
            if halo is None and rows * x.shape[3] // step > WHOLE_LATENT_PIXELS:
                halo = WIDE_HALO
            bands = [(0, rows)] if halo is None else [(a, min(rows, a + band_rows)) for a in range(0, rows, band_rows)]
            for a, b in bands:
                start, stop = (a, b) if halo is None else (max(0, a - halo), min(rows, b + halo))
                outputs = model.run({n: read(n, start, stop, model.dtype(n)) for n in stage["inputs"]})
                for name in stage["outputs"]:
                    f = factors[name]
                    write(name, a, outputs[name][0][:, (a - start) * f:(b - start) * f])
                del outputs
            del model  # (freed here: nothing else refers to it)
            for name in [n for n in stores if last.get(n, -1) <= k and n != plan["output"]]:
                stores.pop(name).close()
            trim_heap()
        result = stores[plan["output"]]
        out = result.read(0, result.shape[1])[None]
        result.close()
        return out
