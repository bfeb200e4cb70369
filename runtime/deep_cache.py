"""DeepCache at run time: every N-th UNet evaluation runs whole and keeps the deep feature, the
ones between run the shallow branch on it.

Ma, Fang and Wang 2023, "DeepCache: Accelerating Diffusion Models for Free" (arXiv:2312.00858;
horseee/DeepCache's uniform schedule, cache branch 0). export/deep_cache.py writes the two
graphs and the plan; `DeepCacheUnet` holds both loaded, `StepCache` is one generation's state.
The reference counts scheduler steps; here each Denoiser evaluation counts (the same for the
one-evaluation samplers; Heun's two evaluations per step count as two). On an SD 1.5 int8 UNet
at 512x512 the shallow branch takes 16% of a full call (tests/benchmarks/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sdonnx.runtime import parts
from sdonnx.runtime.errors import InputError
from sdonnx.runtime.onnx_model import PartModel

# The shallow graph's contract: the UNet's inputs and the kept feature.
SHALLOW = parts.Part("unet", parts.UNET.inputs + (parts.DEEP_CACHE_FEATURE,), parts.UNET.output)


def read_plan(folder: Path) -> dict | None:
    """The DeepCache plan of the UNet part in `folder` when it is there, well formed, names
    graph files that are there, and was cut from the part's present graph
    (parts.graph_digest); else None. Never raises for a damaged plan."""
    path, model = folder / parts.DEEP_CACHE_PLAN, folder / parts.ONNX_FILE
    if not path.is_file() or not model.is_file():
        return None
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
        valid = (isinstance(plan, dict) and plan.get("format") == 1 and plan.get("kind") == "deep_cache"
                 and plan.get("full") == parts.DEEP_CACHE_FULL and plan.get("shallow") == parts.DEEP_CACHE_SHALLOW
                 and isinstance(plan.get("shallow_initializers"), list)
                 and all(isinstance(n, str) for n in plan["shallow_initializers"])
                 and (folder / parts.DEEP_CACHE_FULL).is_file() and (folder / parts.DEEP_CACHE_SHALLOW).is_file())
        if not valid or plan.get("graph") != parts.graph_digest(model):
            return None
    except (OSError, ValueError):
        return None
    return plan


class DeepCacheUnet(PartModel):
    """The UNet as DeepCache's two graphs: a PartModel with the whole UNet's contract (its
    `run` is the full graph, which also returns parts.DEEP_CACHE_FEATURE (B, C, H/8, W/8) in
    the UNet's float dtype: 320 channels for SD 1.5), and `run_shallow`, which takes that
    feature besides the UNet's inputs and returns the output (B, 4, H/8, W/8)."""

    def __init__(self, full: PartModel, shallow: PartModel):
        self.full, self.shallow = full, shallow
        self.part, self.path = parts.UNET, full.path
        self.input_types, self.input_shapes = full.input_types, full.input_shapes

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return self.full(**inputs)

    def run(self, inputs: dict[str, np.ndarray], precision: str | None = None) -> dict[str, np.ndarray]:
        return self.full.run(inputs, precision)

    def run_shallow(self, inputs: dict[str, np.ndarray], feature: np.ndarray,
                    precision: str | None = None) -> dict[str, np.ndarray]:
        taken = {name: value for name, value in inputs.items() if name in self.shallow.input_types}
        return self.shallow.run({**taken, parts.DEEP_CACHE_FEATURE: feature}, precision)

    def release_memory(self) -> None:
        for model in (self.full, self.shallow):
            if hasattr(model, "release_memory"):
                model.release_memory()


class StepCache:
    """One generation's DeepCache state: which evaluation this is, and the feature each UNet call
    of the last full evaluation kept (a low_memory evaluation makes one call per image).

    `interval` N >= 1: evaluations 0, N, 2N, ... run the full graph, the others the shallow
    branch on the feature of the same call of the last full one (N = 1: every evaluation full).
    Call `begin()` before each evaluation's UNet calls, then `run` for each call.
    """

    def __init__(self, interval: int):
        if not (isinstance(interval, int) and interval >= 1):
            raise InputError(f"cache interval must be a whole number >= 1 (1 = off), got {interval!r}")
        self.interval = interval
        self.evaluation, self.call = -1, 0
        self.features: dict[int, np.ndarray] = {}

    def begin(self) -> None:
        self.evaluation += 1
        self.call = 0

    @property
    def full(self) -> bool:
        """Whether the current evaluation runs the whole UNet."""
        return self.evaluation % self.interval == 0

    def run(self, unet: DeepCacheUnet, inputs: dict[str, np.ndarray], precision: str | None = None) -> dict[str, np.ndarray]:
        """The UNet's outputs for this call of the current evaluation (see the class)."""
        call, self.call = self.call, self.call + 1
        kept = self.features.get(call)
        if self.full or kept is None or len(kept) != len(inputs["sample"]):
            out = unet.run(inputs, precision)
            self.features[call] = out[parts.DEEP_CACHE_FEATURE]
            return out
        return unet.run_shallow(inputs, kept, precision)
