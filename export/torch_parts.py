"""Parts that optimum does not export, through torch's ONNX exporter, and their checks.

The x4 upscaler's parts (upscaler.py), the depth estimator (depth.py) and the safety checker
(safety_checker.py) go through the same three steps: trace the module on example inputs with
torch's TorchScript-based exporter, store its weights in model.onnx_data (weights.save_part),
and run the written file in ONNX Runtime on the same inputs for the caller to compare.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_OPSET = 17


def export_module(module, example: dict[str, np.ndarray], target: Path, outputs: Sequence[str], dynamic: dict,
                  opset: int | None = None) -> list[np.ndarray]:
    """Write `module` (torch, eval mode) called on `example`'s arrays in order as the ONNX file
    `target`, inputs named as `example`'s keys, `outputs` named in order, `dynamic` axes per
    input and output name; weights in model.onnx_data beside it. Returns torch's outputs on
    the example as numpy arrays."""
    import onnx
    import torch

    from sdonnx.export.weights import save_part

    target.parent.mkdir(parents=True, exist_ok=True)
    inputs = tuple(torch.from_numpy(v) for v in example.values())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python control flow it fixes to the example
        torch.onnx.export(module, inputs, str(target), input_names=list(example), output_names=list(outputs),
                          opset_version=opset or DEFAULT_OPSET, dynamo=False, dynamic_axes=dynamic)
        reference = module(*inputs)
    save_part(onnx.load(str(target)), target)
    return [t.numpy() for t in (reference if isinstance(reference, (tuple, list)) else (reference,))]


def run_exported(target: Path, example: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The ONNX file's outputs on `example` in ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    return ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, example)


def copy_configs(source: Path, name: str, folder: Path, preprocessor: str) -> None:
    """The source part's config.json and its feature extractor's settings (`preprocessor`
    file in source/feature_extractor) into the exported part's `folder`."""
    shutil.copyfile(source / "feature_extractor" / preprocessor, folder / preprocessor)
    shutil.copyfile(source / name / "config.json", folder / "config.json")
