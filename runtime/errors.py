"""Errors that reach the user: each message names what is wrong and what to do about it."""


class SdonnxError(Exception):
    """A problem with the user's input, model folder or environment (not a bug in sdonnx)."""


class ModelFolderError(SdonnxError):
    """The model folder is missing, incomplete or not a Stable Diffusion ONNX export."""


class InputError(SdonnxError, ValueError):
    """A generation or export argument is out of range or malformed."""


class ProviderError(SdonnxError):
    """The requested execution provider is unknown or not installed."""
