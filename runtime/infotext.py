"""Generation parameters as AUTOMATIC1111's web UI writes them into a PNG's `parameters` text.

    a red circle
    Negative prompt: blurry
    Steps: 20, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: tiny

Other tools (the web UI's "PNG info", ComfyUI importers, civitai) read this format back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdonnx.runtime.pipeline import GenerationConfig


def _quote(value: str) -> str:
    # The web UI quotes values that contain its separators.
    return f'"{value}"' if any(c in value for c in ',:\n"') else value


def infotext(config: "GenerationConfig", *, seed: int, sampler_label: str, model: str,
             extra: dict[str, str] | None = None) -> str:
    """The `parameters` text; `extra` fields ("Lora hashes", "TI hashes") go after the model."""
    fields = {
        "Steps": config.steps,
        "Sampler": sampler_label,
        "CFG scale": f"{config.guidance:g}",
        "Seed": seed,
        "Size": f"{config.width}x{config.height}",
        **({"Schedule type": "Karras"} if config.schedule == "karras" else {}),
        **({"Eta DDIM" if config.sampler == "ddim" else "Eta": f"{config.eta:g}"} if config.eta is not None else {}),
        **({"Denoising strength": f"{config.strength:g}"} if config.strength is not None else {}),
        "Model": _quote(model),
        **{k: _quote(v) for k, v in (extra or {}).items()},
        "Version": "sdonnx 0.1.0",
    }
    lines = [config.prompt]
    if config.negative_prompt:
        lines.append(f"Negative prompt: {config.negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)
