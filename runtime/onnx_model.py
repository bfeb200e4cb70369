"""One thin wrapper per model part: check the inputs against the model's declaration, run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdonnx.runtime import providers
from sdonnx.runtime.cache import OPTIMIZED_FILE, OptimizedGraphs
from sdonnx.runtime.errors import InputError, ModelFolderError, ProviderError, raise_if_out_of_memory
from sdonnx.runtime.parts import Part

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class PartModel:
    """What the pipeline needs of a loaded part: input names, dtypes, shapes, and a call."""

    part: Part
    path: Path
    input_types: dict[str, type]  # numpy dtype per input name
    input_shapes: dict[str, list]  # ints for fixed axes, names or None for dynamic ones

    def _check_contract(self) -> None:
        missing = [name for name in self.part.inputs if name not in self.input_types]
        if missing:
            raise ModelFolderError(
                f"{self.path} is not a {self.part.name} model: it lacks the input(s) {', '.join(missing)} "
                f"(it has {', '.join(self.input_types)})"
            )

    def run(self, inputs: dict[str, np.ndarray], precision: str | None = None) -> dict[str, np.ndarray]:
        """Outputs by name. `precision` None or "fp32" (the only one onnxruntime's providers
        compute here; OpenVinoModel also takes "bf16")."""
        if precision not in (None, "fp32"):
            raise ProviderError(f"{self.part.name}: this provider computes fp32 only, not {precision}")
        return self(**inputs)

    def dtype(self, name: str) -> type:
        return self.input_types[name]

    def shape(self, name: str) -> list:
        return self.input_shapes[name]

    def _check(self, name: str, value: np.ndarray) -> None:
        declared = self.input_shapes[name]
        if value.dtype != self.dtype(name):
            raise InputError(
                f"{self.part.name} input {name!r}: dtype {value.dtype} given, the model declares "
                f"{np.dtype(self.dtype(name)).name}"
            )
        if len(value.shape) != len(declared):
            raise InputError(
                f"{self.part.name} input {name!r}: shape {value.shape} given, the model declares "
                f"{len(declared)} dimensions {declared}"
            )
        for axis, (got, want) in enumerate(zip(value.shape, declared)):
            if isinstance(want, int) and want > 0 and got != want:
                raise InputError(
                    f"{self.part.name} input {name!r}: size {got} on axis {axis}, the model "
                    f"declares {want} (shape {declared})"
                )

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        unknown = set(inputs) - set(self.input_types)
        if unknown:
            raise InputError(f"{self.part.name}: unknown input(s) {', '.join(sorted(unknown))}")
        missing = [name for name in self.input_types if name not in inputs]
        if missing:
            raise InputError(f"{self.part.name}: missing input(s) {', '.join(missing)}")
        for name, value in inputs.items():
            self._check(name, value)


class OnnxModel(PartModel):
    """An onnxruntime session for one part, called with numpy arrays by input name.

    With a `cache_root` (cpu provider), the optimized graph of a large part is saved there on
    the first load and read back, unoptimized again, on the next ones (runtime/cache.py);
    `cache` says which happened: "hit", "written" or None. `arena` False allocates each call's
    buffers from malloc instead of onnxruntime's arena (the VAE: its 512x512 decode at SD 1.5
    size peaked 0.25 GB lower, about 4 s slower; the text encoder: 0.13 GB less held); with the
    arena, the process's shared one (providers.shared_cpu_arena), what a call took is given
    back when it ends (providers.run_options).

    `overrides` {initializer name: array} replace weights of the file for this session
    (LoRAs, a token table with embeddings: runtime/adapters.py), `resized` naming those of
    another shape than the file's and `inline` those stored inside the graph file; onnxruntime uses the arrays' memory without copying, so
    they are kept here. Such a session is built from the file,
    never from the cache of optimized graphs, which holds the file's own weights.
    """

    def __init__(self, path: Path, part: Part, provider: str = "cpu", threads: int | None = None,
                 cache_root: Path | None = None, arena: bool = True,
                 overrides: dict[str, np.ndarray] | None = None, resized: frozenset[str] = frozenset(),
                 inline: frozenset[str] = frozenset()):
        if not path.is_file():
            raise ModelFolderError(f"{part.name}: model file missing: {path}")
        self.provider, self.threads, self.cache, self.arena = provider, threads, None, arena
        self.overrides = overrides or {}
        cache_wanted = cache_root and provider == "cpu" and not self.overrides
        graphs = OptimizedGraphs(cache_root, provider) if cache_wanted else None
        try:
            self.session = self._cached_session(path, graphs) if graphs and graphs.wanted(path) else None
            if self.session is None:
                options = providers.session_options(threads, arena=arena)
                # The session points into these OrtValues (and they into the arrays): kept with it.
                # add_external_initializers, not add_initializer: with the latter, onnxruntime
                # 1.32's NCHWc layout transform (ORT_ENABLE_ALL) reorders the file's Conv
                # weights, not the replacements (tests/test_adapters.py covers conv layers).
                # It takes only weights stored beside the graph and of their own shape, though:
                # a token table grown by embeddings (read by a Gather, which no layout
                # transform touches) and weights inside the graph file (the embedded model's)
                # go through add_initializer, the latter without the layout transform.
                self._initializers = {n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in self.overrides.items()}
                direct = resized | inline
                beside = [n for n in self.overrides if n not in direct]
                if beside:
                    options.add_external_initializers(beside, [self._initializers[n] for n in beside])
                for name in direct & set(self.overrides):
                    options.add_initializer(name, self._initializers[name])
                if inline & set(self.overrides):
                    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
                self.session = self._open(path, options)
        except ProviderError:
            raise
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ModelFolderError(f"{part.name}: cannot load {path}: {e}") from e
        self.part = part
        self.path = path
        inputs = self.session.get_inputs()
        self.input_types = {i.name: _NUMPY_TYPES.get(i.type, np.float32) for i in inputs}
        self.input_shapes = {i.name: list(i.shape) for i in inputs}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._check_contract()
        self.bind_device = providers.PROVIDERS[provider].bind_device
        self._resident: dict[str, tuple[np.ndarray, ort.OrtValue, np.ndarray]] = {}
        self.run_options = providers.run_options() if provider == "cpu" and arena else None

    def _open(self, path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
        providers.preload_libraries(self.provider)
        session = ort.InferenceSession(str(path), options, providers=providers.PROVIDERS[self.provider].ort_providers)
        providers.check_session(session, self.provider, path)
        return session

    def _cached_session(self, path: Path, graphs: OptimizedGraphs) -> ort.InferenceSession | None:
        """The session from the saved optimized graph, or a fresh one that saves it; None when
        the cache cannot be used (then the caller loads the file as usual)."""
        saved = graphs.lookup(path)
        if saved is not None:
            try:
                session = self._open(saved, providers.session_options(self.threads, optimize=False, arena=self.arena))
                self.cache = "hit"
                return session
            except Exception:  # a damaged entry: rebuilt below
                pass
        try:
            staged = graphs.staging(path)
        except OSError:  # a read-only or full cache folder
            return None
        options = providers.session_options(self.threads, arena=self.arena)
        options.optimized_model_filepath = str(staged / OPTIMIZED_FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         OPTIMIZED_FILE + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            session = self._open(path, options)
        except Exception:
            shutil.rmtree(staged, ignore_errors=True)
            return None
        graphs.commit(path, staged)
        self.cache = "written"
        return session

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        self._check_inputs(inputs)
        try:
            if self.bind_device:
                return self._run_bound(inputs)
            return dict(zip(self.output_names, self.session.run(None, inputs, self.run_options)))
        except Exception as e:  # onnxruntime's own error types
            raise_if_out_of_memory(e, self.part.name, inputs)
            raise

    def _run_bound(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with onnxruntime's IO binding on `bind_device`: outputs are allocated there and
        copied back once; an input given as the very same array object as in the previous call
        (the text context, step after step) is not uploaded again. The samplers' arithmetic
        stays in numpy, so the latents (128 KB at 512x512) travel each step; the context, the
        UNet's activations and its output buffer do not."""
        binding = self.session.io_binding()
        for name, value in inputs.items():
            kept = self._resident.get(name)
            if kept is None or kept[0] is not value:
                # (np.ascontiguousarray would turn a 0-d timestep into 1-d.) On "cpu" the
                # OrtValue shares the array's memory, so the array is kept with it.
                array = value if value.flags.c_contiguous else value.copy(order="C")
                kept = (value, ort.OrtValue.ortvalue_from_numpy(array, self.bind_device, 0), array)
                self._resident[name] = kept
            binding.bind_ortvalue_input(name, kept[1])
        for name in self.output_names:
            binding.bind_output(name, self.bind_device)
        self.session.run_with_iobinding(binding, self.run_options)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))
