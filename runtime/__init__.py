"""The torch-free runtime: numpy, onnxruntime, pillow and a pure-Python CLIP tokenizer."""

from sdonnx.runtime.errors import InputError, ModelFolderError, ProviderError, SdonnxError
from sdonnx.runtime.pipeline import SAMPLERS, GenerationConfig, LoadConfig, Pipeline

__all__ = [
    "SAMPLERS",
    "GenerationConfig",
    "InputError",
    "LoadConfig",
    "ModelFolderError",
    "Pipeline",
    "ProviderError",
    "SdonnxError",
]
