"""sdonnx: Stable Diffusion on ONNX Runtime, without torch at run time."""

__all__ = ["Pipeline", "SdonnxError"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `import sdonnx.export` or the CLI's --help do not load onnxruntime.
    if name in __all__:
        from sdonnx import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'sdonnx' has no attribute {name!r}")
