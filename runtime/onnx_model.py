"""One thin wrapper per model part: check the inputs against the model's declaration, run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdonnx.runtime import providers
from sdonnx.runtime.errors import InputError, ModelFolderError
from sdonnx.runtime.parts import Part

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class OnnxModel:
    """An onnxruntime session for one part, called with numpy arrays by input name."""

    def __init__(self, path: Path, part: Part, provider: str = "cpu", threads: int | None = None):
        if not path.is_file():
            raise ModelFolderError(f"{part.name}: model file missing: {path}")
        try:
            self.session = ort.InferenceSession(
                str(path), providers.session_options(threads), providers=providers.PROVIDERS[provider]
            )
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ModelFolderError(f"{part.name}: cannot load {path}: {e}") from e
        self.part = part
        self.path = path
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = [name for name in part.inputs if name not in self.inputs]
        if missing:
            raise ModelFolderError(
                f"{path} is not a {part.name} model: it lacks the input(s) {', '.join(missing)} "
                f"(it has {', '.join(self.inputs)})"
            )

    def dtype(self, name: str) -> type:
        return _NUMPY_TYPES.get(self.inputs[name].type, np.float32)

    def shape(self, name: str) -> list:
        return self.inputs[name].shape

    def _check(self, name: str, value: np.ndarray) -> None:
        declared = self.inputs[name]
        if value.dtype != self.dtype(name):
            raise InputError(
                f"{self.part.name} input {name!r}: dtype {value.dtype} given, the model declares "
                f"{declared.type}"
            )
        if len(value.shape) != len(declared.shape):
            raise InputError(
                f"{self.part.name} input {name!r}: shape {value.shape} given, the model declares "
                f"{len(declared.shape)} dimensions {declared.shape}"
            )
        for axis, (got, want) in enumerate(zip(value.shape, declared.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                raise InputError(
                    f"{self.part.name} input {name!r}: size {got} on axis {axis}, the model "
                    f"declares {want} (shape {declared.shape})"
                )

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        unknown = set(inputs) - set(self.inputs)
        if unknown:
            raise InputError(f"{self.part.name}: unknown input(s) {', '.join(sorted(unknown))}")
        missing = [name for name in self.inputs if name not in inputs]
        if missing:
            raise InputError(f"{self.part.name}: missing input(s) {', '.join(missing)}")
        for name, value in inputs.items():
            self._check(name, value)
        return dict(zip(self.output_names, self.session.run(None, inputs)))
