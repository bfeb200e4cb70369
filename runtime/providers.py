"""Execution providers as data: a name maps to what onnxruntime's session needs."""

from __future__ import annotations

import onnxruntime as ort

from sdonnx.runtime.errors import ProviderError

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "openvino": ["OpenVINOExecutionProvider", "CPUExecutionProvider"],
}
INSTALL_HINT = {
    "cuda": "pip install onnxruntime-gpu (in place of onnxruntime) on a machine with CUDA",
    "openvino": "pip install onnxruntime-openvino (in place of onnxruntime)",
}
# `auto` takes the first one installed.
AUTO_ORDER = ("cuda", "openvino", "cpu")
CHOICES = (*PROVIDERS, "auto")


def resolve(name: str) -> str:
    """Map a user's provider choice to an installed provider name, or fail saying what to do."""
    available = set(ort.get_available_providers())
    if name == "auto":
        return next(p for p in AUTO_ORDER if PROVIDERS[p][0] in available)
    if name not in PROVIDERS:
        raise ProviderError(f"unknown provider {name!r}; choose one of: {', '.join(CHOICES)}")
    if PROVIDERS[name][0] not in available:
        raise ProviderError(
            f"provider {name!r} is not available in this onnxruntime "
            f"(available: {', '.join(sorted(available))}); to use it: {INSTALL_HINT[name]}"
        )
    return name


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options
