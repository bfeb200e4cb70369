"""Cut a UNet's ONNX graph into stages that `--low-memory` loads one after another.

A whole UNet's weights are the floor of a generation's memory: an SD 1.5 UNet holds 0.87 GB in
onnxruntime as int8 (3.4 GB as float32) for every call, while its activations at 512x512 take
0.13 GB per image. OnnxStream (vitoplantamura/OnnxStream) runs SD 1.5 in a few hundred MB by
streaming the weights from disk operator by operator; this module takes the coarser step that
onnxruntime allows: it cuts the graph into stages of about `stage_bytes` of weights each, which
the runtime (runtime/unet_stages.py, `StagedUnet`) opens in turn for every UNet evaluation,
runs over the images of the batch and closes, so that one stage's weights are in memory at a
time. The price is a session per stage per step (its optimized graph comes from the cache of
runtime/cache.py after the first).

The cuts follow the graph's own (topological) node order: stage k holds the nodes between two
cut positions, each chosen near an equal share of the weights where the fewest tensors cross
(block boundaries, where only the skip connections, the hidden state and the time embedding
pass), avoiding positions where an integer tensor (a quantized activation, a shape) would
cross. Nodes that compute only from constants (a weight's DequantizeLinear, shapes of weights)
go into every stage that reads them. The stages' weights are references into the part's own
model.onnx_data (no copy).

Before the plan is written the stages are verified on the part itself, at 8x8 latents with
batches of 3 and 5: a run of the whole model gives every boundary tensor (the tensors passed
between stages), which tells those whose first axis is the batch from those that do not depend
on it (the same values at both batches); then `StagedUnet` itself runs the stages as the
runtime will (onnxruntime's full optimizations, one image at a time where the plan allows) and
its output must equal the whole model's (the largest difference is recorded in the plan).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from sdonnx.export.graph_stages import (Graph, constant_feeders, cross_reads, remove_stage_files, save_stage,
                                        stage_inputs, stage_model, tensor_bytes)
from sdonnx.runtime import parts

# About this much weight per stage (bytes, as stored): an SD 1.5 int8 UNet (0.83 GB) in 4
# stages, fp32 (3.4 GB) in 13.
STAGE_BYTES = 256 * 2**20
# The two batch sizes of the verifying runs (no tensor of a UNet has a first axis of both sizes
# by chance: a shape vector's length is a rank, at most 4 here).
PROBE_BATCHES = (3, 5)
# The stages must give the whole model's output to this fraction of its largest value.
TOLERANCE = 1e-3
# Operators whose outputs are integers or shapes in a UNet's graph (onnx's shape inference
# cannot type what follows a contrib operator such as the fused attention).
INTEGER_OPS = ("QuantizeLinear", "Shape", "Gather", "Concat", "Unsqueeze", "Slice", "Squeeze", "Range",
               "ConstantOfShape")


@dataclass
class _Cut:
    """A plan's stages as graph pieces: what stage_model builds each stage's file from."""

    model: onnx.ModelProto
    graph: Graph
    bodies: list[list]  # per stage: its constant feeders, then its nodes


def _weights_by_node(graph: Graph, body: list) -> list[int]:
    """Bytes of the weights each node of `body` reads first (through the constant nodes
    feeding it): a weight is counted once, at its first reader."""
    seen: set[str] = set()

    def weights_of(name: str) -> int:
        if name in seen or name not in graph.constant:
            return 0
        seen.add(name)
        if name in graph.initializers:
            return tensor_bytes(graph.initializers[name])
        node = graph.producer.get(name)
        return sum(weights_of(i) for i in node.input if i) if node is not None else 0

    return [sum(weights_of(i) for i in node.input if i) for node in body]


def _cuts(graph: Graph, body: list, count: int, integer: set[str]) -> list[int]:
    """Positions in `body` (the non-constant nodes, in graph order) where stages 1.. begin."""
    cumulative = list(accumulate(_weights_by_node(graph, body)))
    total = cumulative[-1] if cumulative else 0
    index = {id(n): k for k, n in enumerate(body)}
    last_read: dict[str, int] = {}
    for k, node in enumerate(body):
        for i in node.input:
            if i and i not in graph.constant:
                last_read[i] = k
    # How many tensors cross each position (produced before it, read at or after it), an
    # integer one counting 100: such a cut splits a quantized operator from its quantization
    # or shape arithmetic from its use.
    change = [0] * (len(body) + 2)
    for node in body:
        start = index[id(node)] + 1
        for o in node.output:
            end = last_read.get(o)
            if end is not None and end >= start:
                change[start] += 100 if o in integer else 1
                change[end + 1] -= 100 if o in integer else 1
    crossing = list(accumulate(change))
    cuts: list[int] = []
    for share in range(1, count):
        target, window = total * share / count, total / (4 * count)
        candidates = [k for k in range(1, len(body)) if abs(cumulative[k - 1] - target) <= window
                      and (not cuts or k > cuts[-1])]
        if candidates:
            cuts.append(min(candidates, key=lambda k: (crossing[k], abs(cumulative[k - 1] - target))))
    return cuts


def _integer_tensors(model: onnx.ModelProto, body: list) -> set[str]:
    """Tensors of the body that are (or may be) integers: typed so by onnx's shape inference, or
    made by INTEGER_OPS."""
    inferred = onnx.shape_inference.infer_shapes(model)
    found = {v.name for v in inferred.graph.value_info
             if v.type.tensor_type.elem_type and not np.issubdtype(
                 onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type), np.floating)}
    return found | {o for n in body if n.op_type in INTEGER_OPS for o in n.output}


def plan(path: Path, stage_bytes: int | None = None) -> tuple[dict, _Cut] | None:
    """The stage plan of the UNet part whose model.onnx is `path` (stages of about
    `stage_bytes` of stored weights, default STAGE_BYTES), not yet verified, and the pieces its
    stage files are built from; None when the weights fit in one stage."""
    model = onnx.load(str(path), load_external_data=False)
    graph = Graph(model, path.parent)
    total = sum(tensor_bytes(t) for t in model.graph.initializer)
    count = math.ceil(total / (stage_bytes or STAGE_BYTES))
    if count < 2:
        return None
    body = [n for n in graph.nodes if not all(i == "" or i in graph.constant for i in n.input)]
    weights = _weights_by_node(graph, body)
    cuts = [0, *_cuts(graph, body, count, _integer_tensors(model, body)), len(body)]
    spans = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    if len(spans) < 2:
        return None
    groups = [body[a:b] for a, b in spans]
    outputs_of_graph = [o.name for o in model.graph.output]
    stage_of, read_by = cross_reads(graph, groups)
    stages, bodies = [], []
    for k, (nodes, (a, b)) in enumerate(zip(groups, spans)):
        inputs = stage_inputs(graph, nodes, k, stage_of)
        outputs = [o for n in nodes for o in n.output
                   if o in outputs_of_graph or any(j > k for j in read_by.get(o, ()))]
        stages.append({"file": f"stage_{k:02d}.onnx", "inputs": inputs, "outputs": outputs,
                       "weight_bytes": sum(weights[a:b])})
        bodies.append(constant_feeders(graph, nodes) + nodes)
    record = {
        "format": 1,
        "kind": "unet",
        "inputs": declared_inputs(model),
        "output": outputs_of_graph[0],
        "stages": stages,
        "weight_bytes": total,
        # The stages hold the graph's references into the weight file: the plan is for this
        # graph file and weight file size (parts.graph_digest).
        "graph": parts.graph_digest(path),
    }
    return record, _Cut(model, graph, bodies)


def declared_inputs(model: onnx.ModelProto) -> dict[str, dict]:
    """The graph's inputs as {name: {"dtype": numpy dtype name, "shape": [int, or a name or
    None for a dynamic axis]}}."""
    inputs = {}
    for value in model.graph.input:
        tensor = value.type.tensor_type
        inputs[value.name] = {
            "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name,
            "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim],
        }
    return inputs


def probe_inputs(inputs: dict[str, dict], batch: int) -> dict[str, np.ndarray]:
    """Inputs (`inputs` as declared_inputs gives them) of a `batch`-image call at 8x8 latents
    (8 tokens of context); the timestep is 500 at every batch (tensors computed from it alone
    are the same at both batches)."""
    rng = np.random.default_rng(batch)
    feed = {}
    for name, declared in inputs.items():
        shape = [d if isinstance(d, int) and d > 0 else (batch if axis == 0 else 8)
                 for axis, d in enumerate(declared["shape"])]
        dtype = np.dtype(declared["dtype"])
        if name == "timestep":
            feed[name] = np.full(shape, 500, dtype)
        elif np.issubdtype(dtype, np.integer):
            feed[name] = rng.integers(0, 8, shape).astype(dtype)
        else:
            feed[name] = rng.standard_normal(shape).astype(dtype)
    return feed


def _probe(path: Path, record: dict) -> list[tuple[dict, dict]]:
    """Per PROBE_BATCHES: the inputs, and every boundary tensor's value (the output's too) in
    a run of the whole part, whose graph gets the boundary tensors as extra outputs (untyped:
    onnxruntime types them). Onnxruntime's basic optimizations only: this run is the reference."""
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    known = {o.name for o in model.graph.output}
    for name in dict.fromkeys(n for s in record["stages"] for n in s["outputs"]):
        if name not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    probe = path.parent / ".probe.onnx"
    try:
        onnx.save(model, str(probe))  # (beside the part: its weights are references into model.onnx_data)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(str(probe), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        runs = []
        for batch in PROBE_BATCHES:
            feed = probe_inputs(record["inputs"], batch)
            runs.append((feed, dict(zip(names, session.run(names, feed)))))
        return runs
    finally:
        probe.unlink(missing_ok=True)


def _stage_models(record: dict, cut: _Cut, runs: list) -> list[onnx.ModelProto]:
    """The stage models, their inputs and outputs declared with the dtypes and ranks the probe
    saw (every axis dynamic)."""
    feed, values = runs[0]
    shapes = {name: ((None,) * np.ndim(value), np.asarray(value).dtype) for name, value in {**feed, **values}.items()}
    return [stage_model(cut.model, cut.graph, body, stage["inputs"], stage["outputs"], shapes, channels=False)
            for stage, body in zip(record["stages"], cut.bodies)]


def _classify(record: dict, runs: list) -> None:
    """Mark in the plan the boundary tensors whose first axis is the batch ("batch_major") and
    each stage that may run one image at a time ("splits_batch": it reads at least one
    batch-first tensor and otherwise only tensors that do not depend on the batch, and writes
    batch-first tensors only). `runs`: _probe's, at PROBE_BATCHES."""
    first, second = ({**feed, **values} for feed, values in runs)
    boundary = sorted({n for s in record["stages"] for n in s["inputs"] + s["outputs"]})
    major = {name for name in boundary
             if all(np.ndim(run[name]) >= 1 and len(run[name]) == batch
                    for run, batch in ((first, PROBE_BATCHES[0]), (second, PROBE_BATCHES[1])))}
    invariant = {name for name in boundary if name not in major
                 and np.shape(first[name]) == np.shape(second[name]) and np.array_equal(first[name], second[name])}
    for stage in record["stages"]:
        stage["splits_batch"] = (any(n in major for n in stage["inputs"])
                                 and all(n in major or n in invariant for n in stage["inputs"])
                                 and all(n in major for n in stage["outputs"]))
    record["batch_major"] = sorted(major)


def verify(folder: Path, record: dict, runs: list) -> float:
    """Run the stages written in `folder` as the runtime does (runtime/unet_stages.py
    `StagedUnet`, onnxruntime's full optimizations, one image at a time where the plan allows)
    on the probe inputs of `runs`; returns the largest difference of its output from the whole
    part's (run the same way), relative to the whole output's largest value. Raises ValueError
    above TOLERANCE."""
    from sdonnx.runtime.onnx_model import OnnxModel
    from sdonnx.runtime.unet_stages import StagedUnet

    # The reference: the whole part as the runtime runs it too (with int8 weights onnxruntime's
    # full optimizations fuse the QDQ pairs into int8 kernels, whose output differs from the
    # probe's float arithmetic by far more than any cut could).
    whole = OnnxModel(folder / parts.ONNX_FILE, parts.UNET, "cpu")
    expected = [whole(**feed)[record["output"]] for feed, _ in runs]
    del whole
    staged = StagedUnet(folder, record, lambda file, part: OnnxModel(file, part, "cpu"), max_batch=1)
    worst = 0.0
    for (feed, _), expected in zip(runs, expected):
        got = staged(**feed)[record["output"]]
        scale = max(float(np.abs(expected).max()), 1e-6)
        worst = max(worst, float(np.abs(got.astype(np.float64) - expected).max()) / scale)
    if not worst <= TOLERANCE:
        raise ValueError(f"the stages chained differ from the whole UNet by {worst:.2e} of its output's range")
    return worst


def remove_stages(folder: Path) -> None:
    """Remove the stages of a UNet folder (plan first: a half-removed set is never used)."""
    remove_stage_files(folder, parts.UNET_STAGES)


def write_stages(path: Path, stage_bytes: int | None = None) -> dict | None:
    """Write and verify the stages of the UNet part whose model.onnx is `path` beside it
    (removing an earlier set); returns the plan, None when the weights fit in one stage.
    Raises ValueError (verify) when the stages do not compute the whole UNet's output, and what
    onnx and onnxruntime raise for a graph they cannot read or run."""
    folder = path.parent
    remove_stages(folder)
    made = plan(path, stage_bytes)
    if made is None:
        return None
    record, cut = made
    runs = _probe(path, record)
    for stage, model in zip(record["stages"], _stage_models(record, cut, runs)):
        save_stage(model, folder, stage["file"])
    del cut
    _classify(record, runs)
    record["difference"] = verify(folder, record, runs)
    tmp = folder / f".{parts.UNET_STAGES}.partial"
    tmp.write_text(json.dumps(record))
    tmp.replace(folder / parts.UNET_STAGES)
    return record


def try_write_stages(path: Path, log: Callable[[str], None], stage_bytes: int | None = None) -> int:
    """write_stages, saying how many; a graph that cannot be cut is logged and left without
    stages (--low-memory then loads the whole UNet), never a failed export or quantization."""
    try:
        record = write_stages(path, stage_bytes)
    except Exception as e:  # onnx and onnxruntime raise their own types; the stages are optional
        remove_stages(path.parent)
        log(f"{path.parent.name}: no stages for --low-memory ({type(e).__name__}: {e}); it will load the "
            "whole UNet")
        return 0
    if record is None:
        return 0
    largest = max(stage["weight_bytes"] for stage in record["stages"])
    log(f"{path.parent.name}: {len(record['stages'])} stages for --low-memory (at most {largest / 2**20:.0f} MB "
        f"of weights each; they give the whole UNet's output to {record['difference']:.1e} of its range)")
    return len(record["stages"])
