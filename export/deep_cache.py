"""The UNet's graph cut for DeepCache: a full graph that also returns the deep feature, and a
shallow graph that computes the output from that feature.

DeepCache (Ma, Fang and Wang 2023, "DeepCache: Accelerating Diffusion Models for Free",
arXiv:2312.00858; horseee/DeepCache) observes that the UNet's deep features change little
between neighbouring sampler steps. Every N-th step runs the whole UNet and keeps the hidden
state that enters the up path's last layer; the steps between run only the shallow branch:
the time embedding, conv_in, and that last layer (a ResNet block on the kept feature
concatenated with conv_in's output, and its transformer) with the output convolution. This is
the reference implementation's cache branch 0 (`cache_layer_id` 0, `cache_block_id` 0), its
cheapest: for SD 1.5 one level-0 ResNet block and transformer of the UNet's 16 blocks.

The cut is found in the graph itself, not by module names: conv_in is the first convolution
reached from the `sample` input (through the QuantizeLinear/DequantizeLinear pair of an int8
graph), and the feature is the other input of the Concat that joins conv_in's output, the
shallowest skip connection, to the up path. The shallow graph is every node the output needs
when that tensor is given (its weights: 2% of an SD 1.5 UNet's). Both graphs keep their
weights in the UNet's model.onnx_data (no copy); the plan (parts.DEEP_CACHE_PLAN) names the
files, the feature's channels, the shallow graph's weights (the LoRA patches it takes) and the
graph it was cut from (parts.graph_digest).

Before the plan is written the cut is verified: at 8x8 latents, batch 2, the full graph's
output and feature, then the shallow graph on that feature, run as the runtime runs them
(onnxruntime's full optimizations), must give the same output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from sdonnx.export.graph_stages import Graph, save_stage, tensor_bytes
from sdonnx.export.unet_stages import declared_inputs, probe_inputs
from sdonnx.runtime import parts

# The shallow graph must give the full graph's output to this fraction of its largest value.
TOLERANCE = 1e-4
# A shallow graph with more than this share of the UNet's weights is not the shallow branch.
MAX_SHALLOW_SHARE = 0.5
_PASS_THROUGH = ("QuantizeLinear", "DequantizeLinear", "Cast", "Identity")


def find_feature(graph: Graph) -> str:
    """The name of the deep feature: the tensor concatenated (axis 1) with conv_in's output at
    the up path's last layer. Raises ValueError when the graph has no such Concat."""
    def after(name: str) -> list:
        return graph.consumers.get(name, [])

    # conv_in: the first Conv on the way from `sample` (through an int8 graph's Q/DQ pair).
    frontier, conv_in = ["sample"], None
    while frontier and conv_in is None:
        name = frontier.pop(0)
        for node in after(name):
            if node.op_type == "Conv" and node.input[0] == name:
                conv_in = node
                break
            if node.op_type in _PASS_THROUGH:
                frontier.append(node.output[0])
    if conv_in is None:
        raise ValueError("no convolution reads the UNet's sample input")
    skip = {conv_in.output[0]}
    frontier = [conv_in.output[0]]
    while frontier:
        for node in after(frontier.pop()):
            if node.op_type in _PASS_THROUGH:
                skip.add(node.output[0])
                frontier.append(node.output[0])
    joins = [n for n in graph.nodes if n.op_type == "Concat" and len(n.input) == 2 and n.input[1] in skip
             and next((a.i for a in n.attribute if a.name == "axis"), None) in (1, -3)]
    if len(joins) != 1:
        raise ValueError(f"expected one Concat joining conv_in's output to the up path, found {len(joins)}")
    return joins[0].input[0]


def shallow_nodes(graph: Graph, output: str, feature: str) -> list:
    """The nodes `output` needs when `feature` is given, in graph order."""
    needed: set[int] = set()
    stack, seen = [output], set()
    while stack:
        name = stack.pop()
        if name == feature or name in seen:
            continue
        seen.add(name)
        node = graph.producer.get(name)
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(i for i in node.input if i)
    return [n for n in graph.nodes if id(n) in needed]


def _full_model(model: onnx.ModelProto, feature: str) -> onnx.ModelProto:
    """The UNet's graph with the feature as a second output, parts.DEEP_CACHE_FEATURE."""
    full = onnx.ModelProto()
    full.CopyFrom(model)
    full.graph.node.append(onnx.helper.make_node("Identity", [feature], [parts.DEEP_CACHE_FEATURE],
                                                 name="deep_cache/feature_out"))
    full.graph.output.append(onnx.ValueInfoProto(name=parts.DEEP_CACHE_FEATURE))
    return full


def _shallow_model(model: onnx.ModelProto, graph: Graph, nodes: list, feature: str,
                   channels: int, dtype: np.dtype) -> onnx.ModelProto:
    """The shallow graph: `nodes` after an Identity from the new input parts.DEEP_CACHE_FEATURE
    (batch, channels, height, width) to the feature; the UNet's other inputs as declared."""
    used = {i for n in nodes for i in n.input}
    inputs = [v for v in model.graph.input if v.name in used]
    inputs.append(onnx.helper.make_tensor_value_info(
        parts.DEEP_CACHE_FEATURE, onnx.helper.np_dtype_to_tensor_dtype(dtype), ["batch", channels, "height", "width"]))
    feed = onnx.helper.make_node("Identity", [parts.DEEP_CACHE_FEATURE], [feature], name="deep_cache/feature_in")
    initializers = [graph.initializers[name] for name in sorted(used & set(graph.initializers))]
    body = onnx.helper.make_graph([feed, *nodes], "deep_cache_shallow", inputs, list(model.graph.output),
                                  initializer=initializers)
    return onnx.helper.make_model(body, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def remove_deep_cache(folder: Path) -> None:
    """Remove a UNet folder's DeepCache plan first (a half-removed set is never used), then its
    graphs and what an interrupted write left."""
    for name in (parts.DEEP_CACHE_PLAN, parts.DEEP_CACHE_FULL, parts.DEEP_CACHE_SHALLOW):
        (folder / name).unlink(missing_ok=True)
        (folder / f".{name}.partial").unlink(missing_ok=True)


def write_deep_cache(path: Path) -> dict:
    """Write and verify the DeepCache graphs of the UNet part whose model.onnx is `path` beside
    it (removing an earlier set); returns the plan. Raises ValueError when the graph has no
    cut (find_feature), the shallow graph is not shallow, or it does not give the full graph's
    output; and what onnx and onnxruntime raise for a graph they cannot read or run."""
    folder = path.parent
    remove_deep_cache(folder)
    model = onnx.load(str(path), load_external_data=False)
    graph = Graph(model, folder)
    feature = find_feature(graph)
    output = model.graph.output[0].name
    nodes = shallow_nodes(graph, output, feature)
    total = sum(tensor_bytes(t) for t in model.graph.initializer)
    initializers = sorted({i for n in nodes for i in n.input} & set(graph.initializers))
    shallow_bytes = sum(tensor_bytes(graph.initializers[name]) for name in initializers)
    if total and shallow_bytes > MAX_SHALLOW_SHARE * total:
        raise ValueError(f"the shallow graph would hold {shallow_bytes / total:.0%} of the UNet's weights")
    save_stage(_full_model(model, feature), folder, parts.DEEP_CACHE_FULL)
    inputs = declared_inputs(model)
    feed = probe_inputs(inputs, 2)
    full = _session(folder / parts.DEEP_CACHE_FULL)
    expected, kept = full.run([output, parts.DEEP_CACHE_FEATURE], feed)
    del full
    save_stage(_shallow_model(model, graph, nodes, feature, int(kept.shape[1]), kept.dtype),
               folder, parts.DEEP_CACHE_SHALLOW)
    shallow = _session(folder / parts.DEEP_CACHE_SHALLOW)
    used = {i.name for i in shallow.get_inputs()}
    got = shallow.run([output], {**{k: v for k, v in feed.items() if k in used}, parts.DEEP_CACHE_FEATURE: kept})[0]
    scale = max(float(np.abs(expected).max()), 1e-6)
    difference = float(np.abs(got.astype(np.float64) - expected).max()) / scale
    if not difference <= TOLERANCE:
        remove_deep_cache(folder)
        raise ValueError(f"the shallow graph differs from the full UNet by {difference:.2e} of its output's range")
    record = {
        "format": 1,
        "kind": "deep_cache",
        "full": parts.DEEP_CACHE_FULL,
        "shallow": parts.DEEP_CACHE_SHALLOW,
        "feature": feature,
        "channels": int(kept.shape[1]),
        "output": output,
        "weight_bytes": total,
        "shallow_weight_bytes": shallow_bytes,
        "shallow_initializers": initializers,
        "difference": difference,
        "graph": parts.graph_digest(path),
    }
    tmp = folder / f".{parts.DEEP_CACHE_PLAN}.partial"
    tmp.write_text(json.dumps(record))
    tmp.replace(folder / parts.DEEP_CACHE_PLAN)
    return record


def try_write_deep_cache(path: Path, log: Callable[[str], None]) -> bool:
    """write_deep_cache, saying what it wrote; a graph that cannot be cut is logged and left
    without DeepCache graphs (--cache-interval then says so), never a failed export."""
    try:
        record = write_deep_cache(path)
    except Exception as e:  # onnx and onnxruntime raise their own types; DeepCache is optional
        remove_deep_cache(path.parent)
        log(f"{path.parent.name}: no DeepCache graphs for --cache-interval ({type(e).__name__}: {e})")
        return False
    log(f"{path.parent.name}: DeepCache graphs for --cache-interval (the shallow branch holds "
        f"{record['shallow_weight_bytes'] / max(record['weight_bytes'], 1):.1%} of the weights; it gives the full "
        f"UNet's output to {record['difference']:.1e} of its range)")
    return True
