"""A model part run by the OpenVINO runtime, which reads the exported ONNX file directly.

Compiled for the CPU with an inference precision (fp32, or bf16 on CPUs that compute it) and a
cache directory of compiled models, so a second start skips compilation. With `static_shapes`
each new set of input shapes (width, height, batch) is compiled once with those shapes fixed,
which lets OpenVINO plan memory and pick kernels for them; the last MAX_COMPILED of them per
precision are kept (a server asked for ever new sizes would otherwise hold one compiled model per size:
65 MB each for the embedded model, far more at SD 1.5 size).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sdonnx.runtime.errors import ModelFolderError, raise_if_out_of_memory
from sdonnx.runtime.memory import releasing_file_pages
from sdonnx.runtime.onnx_model import PartModel
from sdonnx.runtime.parts import Part, model_files

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
MAX_COMPILED = 4



@contextmanager
def cache_lock(cache_dir: str | None):
    """Hold the OpenVINO cache folder's lock while compiling: two processes compiling the same
    model into one cache (two `sdonnx batch --ray` workers on a node, two servers) made
    OpenVINO fail with "filesystem error: cannot set permissions ... .blob" as one replaced
    the file the other was writing. The second now waits, then reads what the first wrote."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one process per cache folder there
        fcntl = None
    if cache_dir is None or fcntl is None:
        yield
        return
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(cache_dir) / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

class OpenVinoModel(PartModel):
    def __init__(self, path: Path, part: Part, precision: str = "fp32", threads: int | None = None,
                 cache_root: Path | None = None, static_shapes: bool = True,
                 overrides: dict[str, np.ndarray] | None = None):
        import openvino as ov

        if not path.is_file():
            raise ModelFolderError(f"{part.name}: model file missing: {path}")
        self.core = ov.Core()
        self.part, self.path, self.precision = part, path, precision
        self.overrides = overrides or {}
        model = self.read()
        self.config = {"PERFORMANCE_HINT": "LATENCY"}
        # The size-optimized cache reads the weights back from the model file, not the
        # replaced constants: no cache for a patched model.
        if cache_root and not self.overrides:
            # OPTIMIZE_SIZE: the cache holds the compiled graph without the weights, which are
            # read from the model file. For an SD 1.5 UNet (fp32, this CPU) a full blob meant
            # writing 3.3 GB on the first start (compile 11-19 s instead of 6) and importing it
            # took as long as compiling again (5-11 s against 6); the small cache (3 MB) costs
            # nothing to write.
            self.config.update(CACHE_DIR=str(cache_root / "openvino"), CACHE_MODE="OPTIMIZE_SIZE")
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
            # OpenVINO pins its threads to the first cores; two processes of one thread each
            # (`sdonnx batch --ray --workers 2 --threads 1` on 2 cores) then share core 0 and
            # each runs at half speed (0.56 s against 0.27 s an image here). Fewer threads than
            # cores: leave the placement to the OS.
            if threads < (os.cpu_count() or 1):
                self.config["ENABLE_CPU_PINNING"] = False
        self.static_shapes = static_shapes
        self.input_types = {i.get_any_name(): i.get_element_type().to_dtype().type for i in model.inputs}
        self.input_shapes = {
            i.get_any_name(): [d.get_length() if d.is_static else None for d in i.get_partial_shape()]
            for i in model.inputs
        }
        self.output_names = [o.get_any_name() for o in model.outputs]
        self._check_contract()
        self._compiled: OrderedDict[tuple, object] = OrderedDict()

    def read(self):
        """The model as read from its file. Not kept between compilations: an ONNX file with
        its weights inside (a text encoder, a VAE) is read into memory whole, and holding it
        beside the compiled copy doubled those parts (0.65 GB at SD 1.5 size); reading it again
        for a new image size takes well under the compilation's time."""
        try:
            model = self.core.read_model(str(self.path))
        except Exception as e:  # OpenVINO raises its own untyped errors
            raise ModelFolderError(f"{self.part.name}: OpenVINO cannot read {self.path}: {e}") from e
        if self.overrides:
            self._replace_constants(model)
        return model

    def _replace_constants(self, model) -> None:
        """The `overrides` (initializer name -> array) as new Constant nodes in place of the
        ones the ONNX reader made from those initializers (it names them after them)."""
        import openvino as ov

        constants = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
        missing = [name for name in self.overrides if name not in constants]
        if missing:
            raise ModelFolderError(f"{self.part.name}: OpenVINO's reading of {self.path} has no constant "
                                   f"{missing[0]} to patch; use --provider cpu for LoRAs on this folder")
        for name, value in self.overrides.items():
            new = ov.op.Constant(value, shared_memory=True)  # the array itself, not a copy (kept in overrides)
            new.set_friendly_name(name)
            old = constants[name]
            for target in list(old.output(0).get_target_inputs()):
                target.replace_source_output(new.output(0))
        model.validate_nodes_and_infer_types()

    def compiled(self, inputs: dict[str, np.ndarray], precision: str | None = None):
        """The compiled model for these input shapes (one for all when shapes are dynamic) and
        precision (default: the one loaded with), the least recently used dropped past MAX_COMPILED."""
        precision = precision or self.precision
        shapes = tuple((name, value.shape) for name, value in sorted(inputs.items())) if self.static_shapes else ()
        key = (precision, shapes)
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        model = self.read()
        if self.static_shapes:
            model.reshape({name: list(value.shape) for name, value in inputs.items()})
        config = {**self.config, "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]}
        # The compiled model holds its own copy of the weights: the file's pages are dropped
        # as compiling reads them (memory.py).
        with releasing_file_pages(model_files(self.path)), cache_lock(config.get("CACHE_DIR")):
            self._compiled[key] = self.core.compile_model(model, "CPU", config)
        # Per precision: a bf16 run that moves some evaluations to fp32 (precision.py) holds
        # both for the same shapes, and must not push out the sizes in use.
        same = [k for k in self._compiled if k[0] == precision]
        for old in same[: max(len(same) - MAX_COMPILED, 0)]:
            del self._compiled[old]
        return self._compiled[key]

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return self.run(inputs)

    def release_memory(self) -> None:
        """Free the intermediate buffers the compiled models keep between calls (0.96 GB after
        an SD 1.5 VAE decode at 512x512); the next call allocates them again."""
        for compiled in self._compiled.values():
            compiled.release_memory()

    def run(self, inputs: dict[str, np.ndarray], precision: str | None = None) -> dict[str, np.ndarray]:
        """Outputs by name; `precision` "fp32" or "bf16" overrides the loaded one for this call."""
        self._check_inputs(inputs)
        try:
            result = self.compiled(inputs, precision).create_infer_request().infer(inputs)
        except Exception as e:  # OpenVINO's own error types, from compiling or running
            raise_if_out_of_memory(e, self.part.name, inputs)
            raise
        return {name: np.asarray(result[i]) for i, name in enumerate(self.output_names)}
