"""Run each exported part in torch and in ONNX Runtime on the same inputs and compare."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdonnx.runtime import parts

# Allowed max abs difference, relative to the reference output's magnitude (at least 1).
# fp32 ONNX Runtime against fp32 torch differs by accumulation order only: about 1e-6 to 1e-4.
RELATIVE_TOLERANCE = 2e-3
# The largest latent side the check runs at (64 = 512 pixels); bounds time and memory.
MAX_CHECK_LATENT = 32


@dataclass(frozen=True)
class PartParity:
    part: str
    max_abs_diff: float
    reference_max: float
    tolerance: float
    input_shape: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def as_dict(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "reference_abs_max": self.reference_max,
            "tolerance": self.tolerance,
            "input_shape": list(self.input_shape),
        }


def _compare(part: str, reference: np.ndarray, ours: np.ndarray, shape) -> PartParity:
    ref_max = float(np.abs(reference).max())
    return PartParity(
        part,
        float(np.abs(reference.astype(np.float64) - ours.astype(np.float64)).max()),
        ref_max,
        RELATIVE_TOLERANCE * max(1.0, ref_max),
        tuple(shape),
    )


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session, **inputs) -> np.ndarray:
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in inputs.items() if k in names})[0]


def _free(model) -> None:
    """Drop a torch part's weights before the ONNX Runtime session of the same part opens, so
    the check never holds both (SD 1.5's UNet: 3.4 GB each)."""
    from sdonnx.export.torch_memory import release_weights

    release_weights(model)
    gc.collect()


def check_parts(source: Path, exported: Path, seed: int = 0) -> list[PartParity]:
    """Max abs difference per part, torch (source) against ONNX Runtime (exported); each part's
    torch outputs are computed and its weights freed before its ONNX Runtime session opens."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    rng = np.random.default_rng(seed)
    results = []
    with torch.inference_mode():
        model = CLIPTextModel.from_pretrained(source / "text_encoder").eval()
        vocab = model.config.vocab_size
        ids = rng.integers(0, vocab, size=(2, 77), dtype=np.int64)
        reference = model(torch.from_numpy(ids))[0].numpy()
        _free(model)
        session = _session(exported / parts.TEXT_ENCODER.onnx_path)
        ids_dtype = np.int32 if session.get_inputs()[0].type == "tensor(int32)" else np.int64
        results.append(_compare("text_encoder", reference, _run(session, input_ids=ids.astype(ids_dtype)), ids.shape))
        hidden = reference
        del session
        gc.collect()

        model = UNet2DConditionModel.from_pretrained(source / "unet").eval()
        side = min(int(model.config.sample_size), MAX_CHECK_LATENT)
        sample = rng.standard_normal((2, model.config.in_channels, side, side), dtype=np.float32)
        timestep = np.array(501.0, dtype=np.float32)
        extra = {}
        if model.config.time_cond_proj_dim:  # an LCM-distilled UNet's guidance embedding
            extra["timestep_cond"] = rng.standard_normal((2, model.config.time_cond_proj_dim), dtype=np.float32)
        reference = model(torch.from_numpy(sample), torch.from_numpy(timestep), torch.from_numpy(hidden),
                          **{k: torch.from_numpy(v) for k, v in extra.items()}).sample.numpy()
        _free(model)
        session = _session(exported / parts.UNET.onnx_path)
        ours = _run(session, sample=sample, timestep=timestep, encoder_hidden_states=hidden, **extra)
        results.append(_compare("unet", reference, ours, sample.shape))
        del session
        gc.collect()

        vae = AutoencoderKL.from_pretrained(source / "vae").eval()
        latent = rng.standard_normal((1, vae.config.latent_channels, side, side), dtype=np.float32)
        decoded = vae.decode(torch.from_numpy(latent)).sample.numpy()
        encoder_path = exported / parts.VAE_ENCODER.onnx_path
        image = rng.uniform(-1, 1, size=(1, 3, side * parts.VAE_SCALE, side * parts.VAE_SCALE)).astype(np.float32)
        moments = None
        if encoder_path.is_file():
            moments = vae.encoder(torch.from_numpy(image))
            moments = (vae.quant_conv(moments) if vae.config.use_quant_conv else moments).numpy()
        _free(vae)
        session = _session(exported / parts.VAE_DECODER.onnx_path)
        results.append(_compare("vae_decoder", decoded, _run(session, latent_sample=latent), latent.shape))
        del session
        gc.collect()
        if moments is not None:
            session = _session(encoder_path)
            results.append(_compare("vae_encoder", moments, _run(session, sample=image), image.shape))
            del session
            gc.collect()
    return results

