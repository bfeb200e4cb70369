"""The UNet run as stages loaded one at a time: low_memory's way below the UNet's weights.

export/unet_stages.py cuts a UNet into stages of a few hundred MB of weights each and proves
that, chained, they compute the whole UNet's output. `StagedUnet` runs them: for every UNet
evaluation each stage is opened, run over all rows of the batch (one image at a time where the
plan allows it) and closed before the next opens, so that memory holds one stage's weights, the
activations of one image, and the tensors passed between stages (at 512x512 the skip
connections of an SD 1.5 UNet: about 30 MB per image). The same idea as OnnxStream's
(vitoplantamura/OnnxStream), which streams weights operator by operator; here the unit is a
stage and each step pays for opening all of them again (measured in tests/benchmarks/README.md
"Memory").
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Callable

import numpy as np

from sdonnx.runtime import parts
from sdonnx.runtime.memory import trim_heap
from sdonnx.runtime.onnx_model import PartModel


def read_plan(folder: Path) -> dict | None:
    """The stage plan of the UNet part in `folder` when it is there, readable and cut from the
    part's present weights (parts.weights_digest: once per file version and process); else None
    (the whole UNet is loaded)."""
    path = folder / parts.UNET_STAGES
    model = folder / parts.ONNX_FILE
    if not path.is_file() or not model.is_file():
        return None
    try:
        plan = json.loads(path.read_text())
        usable = (plan.get("format") == 1 and plan.get("kind") == "unet" and plan.get("stages")
                  and all((folder / stage["file"]).is_file() for stage in plan["stages"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not usable or plan.get("weights") != parts.weights_digest(model):
        return None
    return plan


class StagedUnet(PartModel):
    """A UNet (PartModel: the same inputs and output as the whole part) whose call runs its
    stages in turn, each opened by `open_stage(path, part)` for its turn and released after.

    `max_rows`: the most rows (images) one stage call takes (None: all); stages whose passed
    tensors all carry the batch first (plan "rows") run the batch in slices of this many, the
    others whole. Inputs: those of the UNet (sample (B, C, H, W) float32, timestep, context
    (B, 77, d) float32, ...), dtypes as the plan declares; output (B, 4, H, W). Raises
    InputError (runtime/errors.py) for inputs the UNet does not declare, ModelFolderError when a
    stage cannot be loaded.
    """

    def __init__(self, folder: Path, plan: dict, open_stage: Callable[[Path, parts.Part], PartModel],
                 max_rows: int | None = None):
        self.part, self.path, self.plan = parts.UNET, folder / parts.ONNX_FILE, plan
        self.open_stage, self.max_rows = open_stage, max_rows
        self.input_types = {name: np.dtype(spec["dtype"]).type for name, spec in plan["inputs"].items()}
        self.input_shapes = {name: list(spec["shape"]) for name, spec in plan["inputs"].items()}
        self._check_contract()
        self.batch_major = set(plan.get("batch_major", ()))
        stages = plan["stages"]
        # After which stage each passed tensor is read no more (then it is dropped).
        self.last_read = {name: k for k, stage in enumerate(stages) for name in stage["inputs"]}

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        self._check_inputs(inputs)
        batch = len(inputs[self.part.inputs[0]])
        values = dict(inputs)
        output = self.plan["output"]
        for k, stage in enumerate(self.plan["stages"]):
            rows = self.max_rows if self.max_rows and stage.get("rows") else batch
            model = self.open_stage(self.path.parent / stage["file"],
                                    parts.Part(f"unet {stage['file']}", tuple(stage["inputs"]), stage["outputs"][0]))
            try:
                pieces = [model(**{name: values[name][start:start + rows] if name in self.batch_major else values[name]
                                   for name in stage["inputs"]})
                          for start in range(0, batch, rows)]
            finally:
                del model
                gc.collect()
                trim_heap()
            for name in stage["outputs"]:
                values[name] = pieces[0][name] if len(pieces) == 1 else np.concatenate([p[name] for p in pieces])
            del pieces
            for name in [n for n in values if n != output and self.last_read.get(n, -1) <= k]:
                del values[name]
        return {output: values[output]}
