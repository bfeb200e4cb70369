"""Execution providers as data: a name maps to a backend, its settings and what it can do.

`cpu` and `cuda` run the ONNX files with onnxruntime's execution providers; `openvino` runs the
same files with the OpenVINO runtime (it reads ONNX directly, no second export), which offers
bf16 inference on CPUs with AVX512-BF16 or AMX, static shapes and a compiled-model cache;
`ort-openvino` is onnxruntime's OpenVINO execution provider (the `onnxruntime-openvino` build,
which replaces `onnxruntime`); the OpenVINO runtime was 1.10x faster than it per SD 1.5 UNet step
(tests/benchmarks/results/ort-openvino-ep.md), hence `openvino` is the runtime and `auto` never
picks the EP. `auto` takes the first available of AUTO_ORDER.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from sdonnx.runtime.errors import ProviderError, install_hint


@dataclass(frozen=True)
class Provider:
    name: str
    backend: str  # "onnxruntime" or "openvino"
    ort_providers: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ("fp32",)
    install: str = ""
    # Where onnxruntime's IO binding keeps inputs and outputs ("cuda": on the GPU, so the text
    # context is uploaded once per generation); None runs plain numpy in, numpy out.
    bind_device: str | None = None
    # Whether parts cut into stages run as stages here (the UNet's under low_memory, the VAE's
    # 256-pixel pieces by default): opening a small session per stage is cheap on the CPU with
    # the cache of optimized graphs; a GPU or OpenVINO builds or compiles each one again.
    stages: bool = False

    def available(self) -> bool:
        if self.backend == "openvino":
            return importlib.util.find_spec("openvino") is not None
        return self.ort_providers[0] in ort.get_available_providers()


PROVIDERS = {p.name: p for p in (
    Provider("cpu", "onnxruntime", ("CPUExecutionProvider",), stages=True),
    Provider("cuda", "onnxruntime", ("CUDAExecutionProvider", "CPUExecutionProvider"),
             install="pip install 'onnxruntime-gpu[cuda,cudnn]' (in place of onnxruntime) on a machine with "
                     "an NVIDIA GPU",
             bind_device="cuda"),
    Provider("openvino", "openvino", precisions=("fp32", "bf16"),
             install=install_hint("openvino")),
    Provider("ort-openvino", "onnxruntime", ("OpenVINOExecutionProvider", "CPUExecutionProvider"),
             install="pip install onnxruntime-openvino (in place of onnxruntime)"),
)}
AUTO_ORDER = ("cuda", "openvino", "cpu")
CHOICES = (*PROVIDERS, "auto")
PRECISIONS = ("fp32", "bf16", "auto")


def resolve(name: str) -> str:
    """Map a user's provider choice to an available provider name, or fail saying what to do."""
    if name == "auto":
        return next(p for p in AUTO_ORDER if PROVIDERS[p].available())
    if name not in PROVIDERS:
        raise ProviderError(f"unknown provider {name!r}; choose one of: {', '.join(CHOICES)}")
    if not PROVIDERS[name].available():
        have = ", ".join(p for p in PROVIDERS if PROVIDERS[p].available())
        raise ProviderError(
            f"provider {name!r} is not installed (available here: {have}); to use it: {PROVIDERS[name].install}"
        )
    return name


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX); False where unknown."""
    try:
        flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(provider: str, precision: str) -> str:
    """fp32 or bf16 for a provider; `auto` is bf16 where the provider and the CPU both do it."""
    if precision not in PRECISIONS:
        raise ProviderError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    supported = PROVIDERS[provider].precisions
    if precision == "auto":
        return "bf16" if "bf16" in supported and cpu_has_bf16() else "fp32"
    if precision not in supported:
        can = [name for name, p in PROVIDERS.items() if precision in p.precisions]
        raise ProviderError(
            f"provider {provider!r} cannot run in {precision}; choose --precision fp32, "
            f"or a provider that can: {', '.join(can)}"
        )
    if precision == "bf16" and not cpu_has_bf16():
        # OpenVINO would silently compute in fp32: say so instead.
        raise ProviderError(
            "this CPU has neither AVX512-BF16 nor AMX, so bf16 would run as fp32; "
            "choose --precision fp32 or auto"
        )
    return precision


@functools.cache
def preload_libraries(name: str) -> None:
    """Load CUDA and cuDNN before the first cuda session: onnxruntime-gpu finds them in the
    nvidia-* pip packages (its `[cuda,cudnn]` extras, or PyTorch's) only when asked to."""
    if name == "cuda" and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # what is missing shows when the session starts (check_session)
            pass


def check_session(session: ort.InferenceSession, name: str, path: Path) -> None:
    """onnxruntime falls back to the CPU, with only a log line, when a provider's libraries do
    not load; a user who asked for the GPU must hear it."""
    wanted = PROVIDERS[name].ort_providers[0]
    if wanted not in session.get_providers():
        raise ProviderError(
            f"onnxruntime could not start {wanted} for {path} (see its log above: usually CUDA or "
            f"cuDNN libraries it cannot find); to use {name!r}: {PROVIDERS[name].install}, "
            "or choose --provider cpu"
        )


@functools.cache
def shared_cpu_arena() -> bool:
    """Register, once per process, the CPU arena that sessions with an arena share (onnxruntime's
    environment allocator), growing by exactly what a call requests (kSameAsRequested) instead
    of by powers of two; False where onnxruntime refuses (each session then has its own).

    With each session's own arena an SD 1.5 int8 UNet call at 512x512 (CFG pair) left 0.25 GB
    resident after it ended, whatever run_options asked (its regions are rounded up and not
    given back); through this one the process returned to 0.96 GB after every call of ten, at
    the same speed (2.06-2.13 s against 2.12) and a peak 0.03 GB higher (2026-12-01, Zen 4). That
    quarter GB was held under every later phase: the text encoder's call, the VAE decode."""
    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
    except Exception:  # onnxruntime's own error types; an older build without the API
        return False
    return True


def session_options(threads: int | None = None, optimize: bool = True, arena: bool = True) -> ort.SessionOptions:
    """`optimize` False for a graph onnxruntime already optimized and saved (runtime/cache.py).
    `arena` False: buffers come from malloc and go back after each call (see OnnxModel); True:
    from the process's shared CPU arena (shared_cpu_arena).

    No memory pattern: with it onnxruntime plans one block per set of input shapes on top of
    the arena, and an SD 1.5 UNet call at 512x512 grew from 5.5 to 7.7 GB resident on its second
    call (before fused attention, tests/benchmarks/README.md "Memory"), at no measurable speed.
    """
    options = ort.SessionOptions()
    options.enable_mem_pattern = False
    options.enable_cpu_mem_arena = arena
    if arena and shared_cpu_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        options.intra_op_num_threads = threads
    return options


def run_options() -> ort.RunOptions:
    """Per call: the CPU arena gives back what the call allocated when it ends, so a part's
    activations (0.8 GB for an SD 1.5 VAE decode at 512x512) are not held while the next part
    runs."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options
