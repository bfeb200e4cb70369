"""The safety checker (diffusers' StableDiffusionSafetyChecker) as an optional part.

Stable Diffusion folders from the hub carry `safety_checker/` (a CLIP ViT-L/14 vision tower,
its projection, and 17 + 3 "concept" embeddings with a threshold each) and
`feature_extractor/` (CLIPImageProcessor's settings). The export writes one ONNX graph that
does what diffusers' `forward_onnx` does (the decision its ONNX pipeline uses): cosine
similarity of the image embedding to every concept, minus the concept's threshold, plus 0.01
on every concept when any "special care" concept scores above 0; an image is flagged when any
concept scores above 0. The feature extractor's settings go beside it for runtime/safety_checker.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from sdonnx.export.torch_parts import copy_configs, export_module, run_exported
from sdonnx.runtime import parts
from sdonnx.runtime.errors import ModelFolderError
from sdonnx.runtime.safety_checker import PREPROCESSOR_CONFIG

TOLERANCE = 1e-4  # max abs difference of the scores (cosine similarities) against torch
SIDE = 224  # CLIP ViT-L/14's input side; a source's own vision config decides the check's


def has_safety_checker(source: Path) -> bool:
    """Whether a diffusers folder carries a safety checker with its feature extractor."""
    return (source / parts.SAFETY_CHECKER.name / "config.json").is_file() and \
        (source / "feature_extractor" / PREPROCESSOR_CONFIG).is_file()


def _scores_module(checker):
    import torch

    class Scores(torch.nn.Module):
        """clip_input (n, 3, S, S) -> concept_scores (n, 17), special_scores (n, 3), has_nsfw_concepts (n,)."""

        def __init__(self):
            super().__init__()
            self.checker = checker

        def forward(self, clip_input):
            c = self.checker
            embeds = c.visual_projection(c.vision_model(clip_input)[1])
            embeds = torch.nn.functional.normalize(embeds)
            special = embeds @ torch.nn.functional.normalize(c.special_care_embeds).T - c.special_care_embeds_weights
            concept = embeds @ torch.nn.functional.normalize(c.concept_embeds).T - c.concept_embeds_weights
            concept = concept + 0.01 * (special > 0).any(dim=1, keepdim=True).to(concept.dtype)
            return concept, special, (concept > 0).any(dim=1)

    return Scores().eval()


def export_safety_checker(source: Path, out: Path, opset: int | None = None,
                          log: Callable[[str], None] = lambda msg: None) -> dict:
    """Export `source`'s safety checker into the model folder being written at `out`
    (out/safety_checker/model.onnx + preprocessor_config.json), checked against torch on
    random input (max abs diff of the scores <= TOLERANCE). Returns the parity figures.
    Raises ModelFolderError when the export disagrees with torch."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    checker = StableDiffusionSafetyChecker.from_pretrained(source / parts.SAFETY_CHECKER.name,
                                                           local_files_only=True).float().eval()
    module = _scores_module(checker)
    side = checker.config.vision_config.image_size
    example = np.random.default_rng(0).standard_normal((2, 3, side, side), dtype=np.float32)
    folder = out / parts.SAFETY_CHECKER.name
    target = folder / parts.ONNX_FILE
    inputs = {parts.SAFETY_CHECKER.inputs[0]: example}
    names = parts.SAFETY_CHECKER_OUTPUTS
    reference = export_module(module, inputs, target, names,
                              {name: {0: "batch"} for name in (*inputs, *names)}, opset)
    del module, checker
    ours = run_exported(target, inputs)
    diff = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(ours[:2], reference[:2]))
    if not diff <= TOLERANCE or not np.array_equal(ours[2], reference[2]):
        raise ModelFolderError(f"the safety checker's export disagrees with torch: max abs diff of its scores "
                               f"{diff:.3g} (tolerance {TOLERANCE}); the export was not written")
    copy_configs(source, parts.SAFETY_CHECKER.name, folder, PREPROCESSOR_CONFIG)
    log(f"  safety_checker: max abs diff {diff:.2e} (tolerance {TOLERANCE:.0e})")
    return {"max_abs_diff": diff, "tolerance": TOLERANCE, "input_shape": list(example.shape)}


def add_random_safety_checker(source: Path, seed: int = 0, image_size: int = SIDE) -> None:
    """Give a diffusers folder a randomly initialised, small safety checker (CLIP vision tower
    of width 32, patch 32, at `image_size`) and CLIP's feature extractor settings: for tests.
    Concept and special-care embeddings are random (diffusers initialises them to ones)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=32),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
        projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
    checker.save_pretrained(source / parts.SAFETY_CHECKER.name)
    CLIPImageProcessor(crop_size={"height": image_size, "width": image_size},
                       size={"shortest_edge": image_size}).save_pretrained(source / "feature_extractor")
    index = json.loads((source / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index["requires_safety_checker"] = True
    (source / "model_index.json").write_text(json.dumps(index, indent=2))
