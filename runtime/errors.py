"""Errors that reach the user: each message names what is wrong and what to do about it."""

from pathlib import Path


class SdonnxError(Exception):
    """A problem with the user's input, model folder or environment (not a bug in sdonnx)."""


class ModelFolderError(SdonnxError):
    """The model folder is missing, incomplete or not a Stable Diffusion ONNX export."""


class InputError(SdonnxError, ValueError):
    """A generation or export argument is out of range or malformed."""


class ProviderError(SdonnxError):
    """The requested execution provider is unknown or not installed."""


class OutOfMemory(SdonnxError):
    """A model part could not allocate what the requested size or batch needs."""


def raise_if_out_of_memory(error: Exception, part: str, inputs: dict) -> None:
    """onnxruntime and OpenVINO report a failed allocation as their own runtime errors; turn
    those (and MemoryError) into OutOfMemory naming the part and the input shapes."""
    text = str(error)
    if isinstance(error, MemoryError) or "alloc" in text.lower():
        shapes = ", ".join(f"{name} {tuple(getattr(v, 'shape', ()))}" for name, v in inputs.items())
        raise OutOfMemory(f"{part}: not enough memory for {shapes}; use a smaller size or batch "
                          f"({text.splitlines()[0][:200] if text else type(error).__name__})") from None


def install_hint(extra: str) -> str:
    """The pip command that adds an optional extra to this installation: from the source
    folder when sdonnx runs from a checkout (`pip install -e .`), else from the index."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        return f"pip install -e '{root}[{extra}]'"
    return f"pip install 'sdonnx[{extra}]'"
