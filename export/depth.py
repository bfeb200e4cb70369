"""Depth-to-image (diffusers' StableDiffusionDepth2ImgPipeline): the depth estimator as a part.

Stable Diffusion 2's depth model takes a fifth UNet input channel, the init image's depth map,
estimated by a DPT model (Intel/dpt-hybrid-midas in stabilityai/stable-diffusion-2-depth) from
the image as the folder's `feature_extractor/` prepares it. The export writes the estimator as
depth_estimator/model.onnx (pixel_values at the feature extractor's fixed size ->
predicted_depth), checked against torch, with the feature extractor's settings beside it for
runtime/depth.py; the UNet, VAE and text encoder go through optimum as for any SD folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from sdonnx.export.torch_parts import copy_configs, export_module, run_exported
from sdonnx.runtime import parts
from sdonnx.runtime.depth import DEPTH_PIPELINE, PREPROCESSOR_CONFIG, input_size
from sdonnx.runtime.errors import ModelFolderError

RELATIVE_TOLERANCE = 1e-3  # max abs difference against torch, of the depth's range


def is_depth_source(source: Path) -> bool:
    """Whether a diffusers folder holds StableDiffusionDepth2ImgPipeline with its estimator."""
    return parts.read_json(source / "model_index.json").get("_class_name") == DEPTH_PIPELINE and \
        (source / parts.DEPTH_ESTIMATOR.name / "config.json").is_file()


def fixed_size(source: Path) -> bool:
    """Whether the feature extractor gives every picture the same size (stable-diffusion-2-depth's
    does: 384x384, keep_aspect_ratio false), which the exported estimator's graph takes."""
    config = parts.read_json(source / "feature_extractor" / PREPROCESSOR_CONFIG)
    return config.get("do_resize", True) and not config.get("keep_aspect_ratio", False)


def export_depth_estimator(source: Path, out: Path, opset: int | None = None,
                           log: Callable[[str], None] = lambda msg: None) -> dict:
    """Export `source`'s depth estimator into the folder being written at `out`, checked
    against torch on a random picture (max abs diff <= RELATIVE_TOLERANCE x the depth's range).
    Returns the parity figures. Raises ModelFolderError when it disagrees."""
    import torch
    from transformers import DPTForDepthEstimation

    model = DPTForDepthEstimation.from_pretrained(source / parts.DEPTH_ESTIMATOR.name, local_files_only=True)
    model = model.float().eval()

    class Estimator(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values).predicted_depth

    config = parts.read_json(source / "feature_extractor" / PREPROCESSOR_CONFIG)
    height, width = input_size(config)
    example = np.random.default_rng(0).uniform(-1, 1, (1, 3, height, width)).astype(np.float32)
    folder = out / parts.DEPTH_ESTIMATOR.name
    target = folder / parts.ONNX_FILE
    inputs = {parts.DEPTH_ESTIMATOR.inputs[0]: example}
    # The feature extractor always gives this size (fixed_size): the position embeddings are
    # resized to it once, at export, and the graph's input is fixed but for the batch.
    (reference,) = export_module(Estimator(model).eval(), inputs, target, [parts.DEPTH_ESTIMATOR.output],
                                 {name: {0: "batch"} for name in (*inputs, parts.DEPTH_ESTIMATOR.output)}, opset)
    del model
    (ours,) = run_exported(target, inputs)
    diff = float(np.abs(ours.astype(np.float64) - reference).max())
    tolerance = RELATIVE_TOLERANCE * max(float(np.ptp(reference)), 1e-6)
    if not diff <= tolerance:
        raise ModelFolderError(f"the depth estimator's export disagrees with torch: max abs diff {diff:.3g} > "
                               f"{tolerance:.3g}; the export was not written")
    copy_configs(source, parts.DEPTH_ESTIMATOR.name, folder, PREPROCESSOR_CONFIG)
    log(f"  depth_estimator: max abs diff {diff:.2e} (tolerance {tolerance:.1e})")
    return {"max_abs_diff": diff, "tolerance": tolerance, "input_shape": list(example.shape)}


def build_random_depth2img(out_dir: Path, seed: int = 0, **pipeline_options) -> Path:
    """A randomly initialised StableDiffusionDepth2ImgPipeline folder for tests: the tiny
    SD preset with a 5-channel UNet, and a tiny DPT-Hybrid estimator (BiT backbone, as
    Intel/dpt-hybrid-midas; diffusers' own test configuration) at 32x32 with DPT's feature
    extractor settings (resize to 32x32 bicubic, normalized by 0.5 / 0.5)."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    from sdonnx.export.synthetic import build_random_pipeline

    out_dir = Path(out_dir)
    build_random_pipeline(out_dir, seed=seed, in_channels=5, **pipeline_options)
    torch.manual_seed(seed + 1)
    backbone = {"global_padding": "same", "layer_type": "bottleneck", "depths": [2, 3, 9],
                "out_features": ["stage1", "stage2", "stage3"], "hidden_sizes": [96, 192, 384, 768], "num_groups": 2}
    config = DPTConfig(image_size=32, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=4,
                       backbone_out_indices=(0, 1, 2, 3), num_attention_heads=4, intermediate_size=37,
                       hidden_act="gelu", is_hybrid=True, backbone_config=backbone,
                       backbone_featmap_shape=[1, 384, 24, 24])
    DPTForDepthEstimation(config).eval().save_pretrained(out_dir / parts.DEPTH_ESTIMATOR.name)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False, ensure_multiple_of=1,
                      image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out_dir / "feature_extractor")
    index = json.loads((out_dir / "model_index.json").read_text())
    index.update({"_class_name": DEPTH_PIPELINE, "depth_estimator": ["transformers", "DPTForDepthEstimation"],
                  "feature_extractor": ["transformers", "DPTImageProcessor"]})
    index.pop("safety_checker", None)
    index.pop("requires_safety_checker", None)
    index.pop("image_encoder", None)
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    return out_dir
