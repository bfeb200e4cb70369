"""Split a VAE's ONNX graph at its group norms, so that tiles draw the untiled picture.

A tiled VAE whose tiles run the whole network (diffusers' `enable_tiling`) differs from the
untiled decode where it matters: every group norm normalizes each tile by that tile's own
statistics, so tiles come out in different tones, which blending only hides (23 dB PSNR
against the untiled decode of a tiny VAE, 29 dB at SD 1.5 size). AUTOMATIC1111's Tiled VAE
extension (pkuliyi2015/multidiffusion-upscaler-for-automatic1111, `tiled_vae.py`) instead
pauses every tile at each group norm, sums the statistics of all tiles and goes on with
those of the whole image. This module prepares the same for ONNX: it cuts the graph before
every group norm of a four-dimensional activation, so that the runtime (runtime/vae.py,
`StagedVae`) runs each stage over horizontal bands of the image, gathers the group norm's
sums over the whole tensor, and applies the norm itself (a few numpy lines) before the next
stage. Within a stage only convolutions, upsampling, padding and pointwise operations run, so
a band with `halo` extra latent rows on each side computes its own rows exactly; a stage
holding anything else (the mid-block's attention, which mixes every position) runs on the
whole tensor at once (it is at latent resolution; above a size the runtime gives it wide bands
instead, see runtime/vae.py WHOLE_LATENT_PIXELS).

The stages are written beside the part as `stage_NN.onnx` (their weights are references into
the part's own model.onnx_data: no copy) with `stages.json`, the plan the runtime follows
(parts.VAE_STAGES), and `stages.npz`, the group norms' affine parameters. The export writes
them for the VAE decoder and encoder; `quantize` again for the parts it rewrites.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from sdonnx.export.graph_stages import (Graph, constant_feeders, cross_reads, remove_stage_files, save_stage,
                                        stage_inputs, stage_model)
from sdonnx.runtime import parts

# Operations that compute an output pixel from a small neighbourhood of input pixels (or
# pixel by pixel): a stage made of these alone runs band by band.
POINTWISE = {"Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh", "Relu", "Identity", "Cast", "Clip", "Erf", "Pow",
             "Sqrt", "Neg", "Exp", "DequantizeLinear", "QuantizeLinear", "Softplus", "HardSigmoid", "Max", "Min"}
NEIGHBOURHOOD = {"Conv", "Resize", "Pad"}


@dataclass
class _Norm:
    """One group norm as torch exports it: Reshape(x, [0, G, -1]) -> InstanceNormalization ->
    Reshape(Shape(x)) -> Mul(weight) -> Add(bias)."""

    x: str
    y: str
    groups: int
    epsilon: float
    scale: np.ndarray  # (G,) the InstanceNormalization's own (ones as torch exports it)
    bias: np.ndarray  # (G,)
    weight: np.ndarray  # broadcastable to (1, C, H, W)
    shift: np.ndarray
    nodes: list = field(default_factory=list)  # the nodes it replaces
    position: int = 0  # the InstanceNormalization's index in the graph


def _norms(graph: Graph, ranks: dict[str, int]) -> list[_Norm]:
    """The group norms of 4-D activations, in graph order."""
    found = []
    for position, node in enumerate(graph.nodes):
        if node.op_type != "InstanceNormalization":
            continue
        first = graph.producer.get(node.input[0])
        if (first is None or first.op_type != "Reshape" or ranks.get(first.input[0]) != 4
                or len(graph.consumers[first.output[0]]) != 1):
            continue
        x = first.input[0]
        target = graph.value(first.input[1])
        scale, bias = graph.value(node.input[1]), graph.value(node.input[2])
        back = graph.only_consumer(node.output[0], "Reshape")
        mul = back and graph.only_consumer(back.output[0], "Mul")
        add = mul and graph.only_consumer(mul.output[0], "Add")
        if target is None or list(target)[0::2] != [0, -1] or scale is None or bias is None or add is None:
            continue
        shape = graph.producer.get(back.input[1])
        if shape is None or shape.op_type != "Shape" or shape.input[0] != x or len(graph.consumers[shape.output[0]]) != 1:
            continue
        weight = graph.value(next(i for i in mul.input if i != back.output[0]))
        shift = graph.value(next(i for i in add.input if i != mul.output[0]))
        if weight is None or shift is None:
            continue
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        found.append(_Norm(x, add.output[0], int(target[1]), float(epsilon), scale, bias, weight, shift,
                           [first, node, shape, back, mul, add], position))
    return found


def _probe(model: onnx.ModelProto, input_name: str, side: int, constant: set[str]) -> dict[str, tuple]:
    """Shapes and dtypes of every tensor but the `constant` ones for a (1, C, side, side)
    input: one onnxruntime run."""
    import onnxruntime as ort

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in known and name in types and name not in constant:
                probe.graph.output.append(onnx.helper.make_value_info(name, types[name]))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    declared = session.get_inputs()[0]
    channels = declared.shape[1]
    dtype = np.float16 if declared.type == "tensor(float16)" else np.float32
    x = np.random.default_rng(0).standard_normal((1, channels, side, side)).astype(dtype)
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {input_name: x})
    shapes = {input_name: (x.shape, x.dtype)}
    shapes.update({n: (np.shape(v), np.asarray(v).dtype) for n, v in zip(names, values)})
    return shapes


def _radius(nodes: list, rows: dict[str, float], graph: Graph) -> float:
    """How many latent rows away a stage's outputs can look, through its convolutions,
    upsampling and padding (counted generously: a kernel's whole extent, not half)."""
    reach: dict[str, float] = {}
    for node in nodes:
        inputs = [i for i in node.input if i and i not in graph.constant]
        r = max((reach.get(i, 0.0) for i in inputs), default=0.0)
        if node.op_type in NEIGHBOURHOOD and inputs:
            f_in = rows[inputs[0]]
            if node.op_type == "Conv":
                kernel = next(a.ints for a in node.attribute if a.name == "kernel_shape")
                dilation = next((a.ints for a in node.attribute if a.name == "dilations"), [1, 1])
                r += max(d * (k - 1) for k, d in zip(kernel, dilation)) / f_in
            else:
                r += 1 / f_in
        for o in node.output:
            reach[o] = r
    return max(reach.values(), default=0.0)


def plan(path: Path) -> tuple[dict, dict[str, np.ndarray], list[onnx.ModelProto]] | None:
    """The stage plan of a VAE part (`path`: its model.onnx), the group norms' parameters and
    the stage models, or None when the graph has no group norm of an image tensor to cut at."""
    model = onnx.load(str(path), load_external_data=False)
    full = onnx.load(str(path))  # with weights, for the probe run
    graph = Graph(model, path.parent)
    input_name = model.graph.input[0].name
    output_name = model.graph.output[0].name
    # A decoder takes latents (8x8 here), an encoder images (64x64: latents of 8x8).
    side = 8 if model.graph.input[0].type.tensor_type.shape.dim[1].dim_value == parts.LATENT_CHANNELS else 64
    shapes = _probe(full, input_name, side, graph.constant)
    del full
    ranks = {name: len(shape) for name, (shape, _) in shapes.items()}
    norms = _norms(graph, ranks)
    if not norms or len({norm.x for norm in norms}) < len(norms):  # (two norms of one tensor: not torch's)
        return None
    smallest = min(shape[2] for shape, _ in shapes.values() if len(shape) == 4)
    factors = {name: shape[2] // smallest for name, (shape, _) in shapes.items()
               if len(shape) == 4 and shape[2] == shape[3] and shape[2] % smallest == 0}
    # (Rows per latent row of every image tensor, for the reach of a convolution after a pad.)
    rows = {name: shape[2] / smallest for name, (shape, _) in shapes.items() if len(shape) == 4}
    replaced = {id(n) for norm in norms for n in norm.nodes}
    by_output = {norm.y: norm for norm in norms}

    # Stage k: the graph's nodes between the (k-1)-th and k-th cut group norms.
    cuts = [norm.position for norm in norms] + [len(graph.nodes)]
    groups, start = [], 0
    for cut in cuts:
        groups.append([n for n in graph.nodes[start:cut] if id(n) not in replaced and not
                       all(i == "" or i in graph.constant for i in n.input)])
        start = cut
    stage_of, needed_by = cross_reads(graph, groups)
    # A group norm's output is read where its input is: the input must outlive its readers.
    for name, readers in list(needed_by.items()):
        if name in by_output:
            needed_by.setdefault(by_output[name].x, set()).update(readers)
    for norm in norms:
        needed_by.setdefault(norm.x, set()).add(len(groups))  # its statistics, after its stage
    stages, models = [], []
    for k, nodes in enumerate(groups):
        if not nodes:
            continue
        pulled = constant_feeders(graph, nodes)  # (each stage gets the constant nodes it reads)
        inputs = stage_inputs(graph, nodes, k, stage_of)
        outputs = [o for n in nodes for o in n.output
                   if o == output_name or any(j > k for j in needed_by.get(o, ()))]
        body = pulled + nodes
        local = (all(n.op_type in POINTWISE | NEIGHBOURHOOD or n.op_type == "Constant" for n in nodes)
                 and all(name in factors for name in inputs + outputs))
        halo = math.ceil(_radius(nodes, rows, graph) - 1e-9) if local else None
        file = f"stage_{len(stages):02d}.onnx"
        stages.append({"file": file, "inputs": inputs, "outputs": outputs, "halo": halo})
        models.append((body, inputs, outputs))
    # Every tensor passed between stages must be an image tensor (N, C, H, W) with a whole number
    # of rows per latent row: that is what the runtime stores and cuts into bands.
    if len(stages) < 2 or any(name not in factors for s in stages for name in s["inputs"] + s["outputs"]):
        return None
    models = [stage_model(model, graph, *m, shapes) for m in models]
    tensors = {name for s in stages for name in s["inputs"] + s["outputs"]}
    record = {
        "format": 1,
        "input": input_name,
        "output": output_name,
        # Rows of each tensor per latent row (the decoder's input 1, its output 8; the encoder's
        # input 8, its output 1).
        "factors": {name: factors[name] for name in sorted(tensors) if name in factors},
        # (Each norm's affine parameters are arrays "<index>.<name>" of the .npz beside the plan.)
        "norms": {norm.y: {"input": norm.x, "groups": norm.groups, "epsilon": norm.epsilon, "index": i}
                  for i, norm in enumerate(norms)},
        "stages": stages,
        # The weights the stages were cut from: the stages read them by offset, the norms' are
        # copies, so the plan is for these bytes only.
        "weights": parts.weights_digest(path),
    }
    arrays = {f"{i}.{name}": np.asarray(getattr(norm, name), np.float32).reshape(-1)
              for i, norm in enumerate(norms) for name in ("scale", "bias", "weight", "shift")}
    return record, arrays, models


def remove_stages(folder: Path) -> None:
    """Remove the stages of a part folder (plan first: a half-removed set is never used)."""
    remove_stage_files(folder, parts.VAE_STAGES, (parts.VAE_STAGE_NORMS,))


def write_stages(path: Path) -> int:
    """Write the stages of the VAE part whose model.onnx is `path` beside it (removing those of
    an earlier export); returns how many (0: nothing to cut, tiles fall back to blending)."""
    folder = path.parent
    remove_stages(folder)
    made = plan(path)
    if made is None:
        return 0
    record, arrays, models = made
    for stage, model in zip(record["stages"], models):
        save_stage(model, folder, stage["file"])
    with open(folder / f".{parts.VAE_STAGE_NORMS}.partial", "wb") as f:
        np.savez(f, **arrays)
    (folder / f".{parts.VAE_STAGE_NORMS}.partial").replace(folder / parts.VAE_STAGE_NORMS)
    tmp = folder / f".{parts.VAE_STAGES}.partial"
    tmp.write_text(json.dumps(record))
    tmp.replace(folder / parts.VAE_STAGES)
    return len(models)


def try_write_stages(path: Path, log) -> int:
    """write_stages, saying how many; a graph it cannot cut is logged and left without stages
    (its tiles are then blended), never a failed export."""
    try:
        count = write_stages(path)
    except Exception as e:  # onnx and onnxruntime raise their own types; the stages are optional
        remove_stages(path.parent)
        log(f"{path.parent.name}: no stages for tiled decodes ({type(e).__name__}: {e}); large images "
            "will decode in blended tiles")
        return 0
    log(f"{path.parent.name}: {count} stages for tiled decodes" if count else
        f"{path.parent.name}: no group norms to cut at; large images will decode in blended tiles")
    return count
