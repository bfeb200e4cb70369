"""Freeing torch modules' weights during an export, so that the export's peak is one part's.

Measured on SD 1.5 (tests/benchmarks/README.md "Export"): optimum exports the parts of a
pipeline it holds whole, and after a part larger than 2 GB (the UNet, 3.4 GB) it loads that
part's ONNX file with all its weights to gather them into one file while the torch weights are
still resident: 8.4 GB at the peak, 5.7 GB once each module's weights go as soon as its graph
is written.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from sdonnx.runtime.memory import trim_heap


def release_weights(module) -> None:
    """Replace every parameter and buffer of the torch module by an empty tensor of its dtype
    and give the freed heap back (glibc malloc_trim). The module object stays valid (its dtype
    and config still read) but can no longer be run."""
    import torch

    for sub in module.modules():
        for param in sub._parameters.values():
            if param is not None:
                param.data = torch.empty(0, dtype=param.dtype)
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = torch.empty(0, dtype=buffer.dtype)
    trim_heap()


@contextmanager
def weights_released_after_export() -> Iterator[None]:
    """Within the block, each module given to torch.onnx.export has its weights released as soon
    as the export returns (or fails).

    This wraps `torch.onnx.export` for the duration of the block (restored on every path),
    because optimum's `main_export` has no hook between a part's export and its own gathering
    of the external data, and it imports `torch.onnx.export` at each call. It is safe there
    because optimum runs nothing of a module after exporting it once its validation is off
    (sdonnx checks the parts itself against torch parts it loads afresh, so a module freed too
    early would fail that check, not pass unnoticed), and it deep-copies the VAE for the encoder
    and the decoder, so no part shares weights with a later one (optimum-onnx 0.1.0)."""
    import torch.onnx

    original = torch.onnx.export

    def export_then_release(model, *args, **kwargs):
        try:
            return original(model, *args, **kwargs)
        finally:
            release_weights(model)

    torch.onnx.export = export_then_release
    try:
        yield
    finally:
        torch.onnx.export = original
