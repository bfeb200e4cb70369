"""The UNet run as stages loaded one at a time: low_memory's way below the UNet's weights.

export/unet_stages.py cuts a UNet into stages of a few hundred MB of weights each and verifies
that they compute the whole UNet's output. `StagedUnet` runs them: for every UNet evaluation
each stage is opened, run over the images of the batch (one at a time where the plan allows
it) and released before the next opens, so that memory holds one stage's weights, the
activations of one image, and the tensors passed between stages (at 512x512 the skip
connections of an SD 1.5 UNet: about 30 MB per image). The same idea as OnnxStream's
(vitoplantamura/OnnxStream), which streams weights operator by operator; here the unit is a
stage and each step pays for opening all of them again (measured in tests/benchmarks/README.md
"Memory").
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from sdonnx.runtime import parts
from sdonnx.runtime.errors import InputError
from sdonnx.runtime.memory import trim_heap
from sdonnx.runtime.onnx_model import PartModel

_FILE_NAME = r"stage_\d\d\.onnx"


def _valid(plan, folder: Path) -> bool:
    """Whether `plan` has the shape export/unet_stages.py writes, with every stage file there."""
    def names(value) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(n, str) for n in value)

    if not (isinstance(plan, dict) and plan.get("format") == 1 and plan.get("kind") == "unet"
            and isinstance(plan.get("output"), str) and isinstance(plan.get("graph"), str)
            and isinstance(plan.get("batch_major"), list) and isinstance(plan.get("inputs"), dict)
            and isinstance(plan.get("stages"), list) and plan["stages"]):
        return False
    for spec in plan["inputs"].values():
        if not (isinstance(spec, dict) and isinstance(spec.get("shape"), list)
                and spec.get("dtype") in ("float32", "float16", "int64", "int32")):
            return False
    return all(isinstance(stage, dict) and isinstance(stage.get("file"), str)
               and re.fullmatch(_FILE_NAME, stage["file"]) and (folder / stage["file"]).is_file()
               and names(stage.get("inputs")) and names(stage.get("outputs"))
               and isinstance(stage.get("splits_batch"), bool) for stage in plan["stages"])


def read_plan(folder: Path) -> dict | None:
    """The stage plan of the UNet part in `folder` when it is there, well formed, and cut from
    the part's present graph (parts.graph_digest); else None, and the whole UNet is loaded.
    Never raises for a damaged plan."""
    path = folder / parts.UNET_STAGES
    model = folder / parts.ONNX_FILE
    if not path.is_file() or not model.is_file():
        return None
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
        if not _valid(plan, folder) or plan["graph"] != parts.graph_digest(model):
            return None
    except (OSError, ValueError):
        return None
    return plan


class StagedUnet(PartModel):
    """A UNet (PartModel: the same inputs and output as the whole part) whose call runs its
    stages in turn, each opened by `open_stage(path, part)` for its turn and released after.

    Inputs: those the plan declares for the UNet, as the pipeline gives them: sample (B, C, H/8,
    W/8) float32 (C = 4, or 9 for an inpainting UNet), timestep (a scalar or (B,), float32 or
    int64 as declared), encoder_hidden_states (B, 77*k, d) float32, and timestep_cond (B, d) for an
    LCM-distilled UNet. Output {plan["output"]: (B, 4, H/8, W/8)}. `max_batch`: the most images
    one stage call takes (None: all); a stage the plan marks "splits_batch" (everything it
    reads and writes has the batch first, or does not depend on it) runs the batch in slices of
    that many, the others whole. A batch-first input of another length than the sample's is
    passed whole (as the whole UNet would broadcast it). Raises InputError (runtime/errors.py)
    for inputs the UNet does not declare or of the wrong dtype or rank, ModelFolderError when a
    stage cannot be loaded.
    """

    def __init__(self, folder: Path, plan: dict, open_stage: Callable[[Path, parts.Part], PartModel],
                 max_batch: int | None = None):
        self.part, self.path, self.plan = parts.UNET, folder / parts.ONNX_FILE, plan
        self.open_stage, self.max_batch = open_stage, max_batch
        self.input_types = {name: np.dtype(spec["dtype"]).type for name, spec in plan["inputs"].items()}
        self.input_shapes = {name: list(spec["shape"]) for name, spec in plan["inputs"].items()}
        self._check_contract()
        self.batch_major = set(plan["batch_major"])
        # After which stage each boundary tensor is read no more (then it is dropped).
        self.last_read = {name: k for k, stage in enumerate(plan["stages"]) for name in stage["inputs"]}

    @property
    def splits_batch(self) -> bool:
        """Whether every stage runs one image at a time under max_batch=1 (else some run all)."""
        return all(stage["splits_batch"] for stage in self.plan["stages"])

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        self._check_inputs(inputs)
        batch = len(inputs[self.part.inputs[0]])
        if batch == 0:
            raise InputError("unet: a batch of no images")
        values = dict(inputs)
        output = self.plan["output"]
        for k, stage in enumerate(self.plan["stages"]):
            rows = self.max_batch if self.max_batch and stage["splits_batch"] else batch
            model = self.open_stage(self.path.parent / stage["file"],
                                    parts.Part(f"unet {stage['file']}", tuple(stage["inputs"]), stage["outputs"][0]))
            try:
                pieces = [model(**{name: self._rows(name, values[name], batch, start, rows)
                                   for name in stage["inputs"]})
                          for start in range(0, batch, rows)]
            finally:
                del model  # (a session holds no reference cycles: freed here, its heap trimmed)
                trim_heap()
            for name in stage["outputs"]:
                split = len(pieces) > 1 and name in self.batch_major
                values[name] = np.concatenate([p[name] for p in pieces]) if split else pieces[0][name]
            del pieces
            for name in [n for n in values if n != output and self.last_read.get(n, -1) <= k]:
                del values[name]
        return {output: values[output]}

    def _rows(self, name: str, value: np.ndarray, batch: int, start: int, rows: int) -> np.ndarray:
        """Rows start..start+rows of a batch-first tensor of the whole batch; others whole."""
        if rows >= batch or name not in self.batch_major or np.ndim(value) == 0 or len(value) != batch:
            return value
        return value[start:start + rows]
