"""Cut a UNet's ONNX graph into stages that `--low-memory` loads one after another.

A whole UNet's weights are the floor of a generation's memory: an SD 1.5 UNet holds 0.87 GB in
onnxruntime as int8 (3.4 GB as float32) for every call, while its activations at 512x512 take
0.13 GB per image. OnnxStream (vitoplantamura/OnnxStream) runs SD 1.5 in a few hundred MB by
streaming the weights from disk operator by operator; this module takes the coarser step that
onnxruntime allows: it cuts the graph into stages of about `stage_bytes` of weights each, which
the runtime (runtime/unet_stages.py, `StagedUnet`) opens in turn for every UNet evaluation,
runs over all rows of the batch and closes, so that one stage's weights are in memory at a time.
The price is a session per stage per step (its optimized graph comes from the cache of
runtime/cache.py after the first).

The cuts follow the graph's own (topological) node order: stage k holds the nodes between two
cut positions, each chosen near an equal share of the weights where the fewest tensors cross
(block boundaries, where only the skip connections, the hidden state and the time embedding
pass), avoiding positions where an integer tensor (a quantized activation, a shape) would
cross. Nodes that compute only from constants (a weight's DequantizeLinear, shapes of weights)
go into every stage that reads them. The stages' weights are references into the part's own
model.onnx_data (no copy).

Before the plan is written the stages are proven on the part itself: two onnxruntime runs at
8x8 latents (batches of 3 and 5) of the whole model and of the stages chained give the same
output (the largest difference is recorded in the plan), and tell which passed tensors have the
batch as their first axis, so that the runtime can run a stage one image at a time.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import onnx

from sdonnx.export.vae_stages import _Graph, _stage_model
from sdonnx.runtime import parts

# About this much weight per stage (bytes): an SD 1.5 int8 UNet (0.83 GB) in 4 stages, fp32 in 14.
STAGE_BYTES = 256 * 2**20
# The two batch sizes of the proving runs (no tensor of a UNet has a first axis of both sizes
# by chance: a shape vector's length is a rank, at most 4 here).
PROBE_BATCHES = (3, 5)
# Stages chained must give the whole model's output to this fraction of its largest value.
TOLERANCE = 1e-3


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def _cuts(graph: _Graph, body: list, count: int, integer: set[str]) -> list[int]:
    """Positions in `body` (the non-constant nodes, in graph order) where stages 1.. begin."""
    # Weights are counted at their first reader in the body (through the constant nodes feeding it).
    seen: set[str] = set()

    def weights_of(name: str) -> int:
        if name in seen or name not in graph.constant:
            return 0
        seen.add(name)
        if name in graph.initializers:
            return _tensor_bytes(graph.initializers[name])
        node = graph.producer.get(name)
        return sum(weights_of(i) for i in node.input if i) if node is not None else 0

    cumulative, total = [], 0
    for node in body:
        total += sum(weights_of(i) for i in node.input if i)
        cumulative.append(total)
    # Tensors crossing each position: produced before it, read at or after it.
    index = {id(n): k for k, n in enumerate(body)}
    last_read: dict[str, int] = {}
    for k, node in enumerate(body):
        for i in node.input:
            if i and i not in graph.constant:
                last_read[i] = k
    change = [0] * (len(body) + 2)
    for node in body:
        start = index[id(node)] + 1
        for o in node.output:
            end = last_read.get(o)
            if end is not None and end >= start:
                # (An integer tensor crossing counts 100: such cuts split a quantized operator
                # from its quantization or shape arithmetic from its use.)
                change[start] += 100 if o in integer else 1
                change[end + 1] -= 100 if o in integer else 1
    crossing = list(itertools.accumulate(change))
    cuts = []
    for share in range(1, count):
        target = total * share / count
        window = total / (4 * count)
        candidates = [k for k in range(1, len(body)) if abs(cumulative[k - 1] - target) <= window
                      and (not cuts or k > cuts[-1])]
        if candidates:
            cuts.append(min(candidates, key=lambda k: (crossing[k], abs(cumulative[k - 1] - target))))
    return cuts


def plan(path: Path, stage_bytes: int | None = None) -> tuple[dict, tuple] | None:
    """The stage plan of the UNet part whose model.onnx is `path` (stages of about
    `stage_bytes` of weights, default STAGE_BYTES) and what _stage_models builds them from;
    None when its weights fit in one stage."""
    model = onnx.load(str(path), load_external_data=False)
    graph = _Graph(model, path.parent)
    total = sum(_tensor_bytes(t) for t in model.graph.initializer)
    count = math.ceil(total / (stage_bytes or STAGE_BYTES))
    if count < 2:
        return None
    body = [n for n in graph.nodes if not all(i == "" or i in graph.constant for i in n.input)]
    cuts = [0, *_cuts(graph, body, count, _integer_tensors(model, body)), len(body)]
    groups = [body[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    if len(groups) < 2:
        return None
    outputs_of_graph = [o.name for o in model.graph.output]
    stage_of = {o: k for k, nodes in enumerate(groups) for n in nodes for o in n.output}
    read_by: dict[str, set[int]] = {}
    for k, nodes in enumerate(groups):
        for n in nodes:
            for i in n.input:
                if i and i not in graph.constant and stage_of.get(i) != k:
                    read_by.setdefault(i, set()).add(k)
    stages, bodies = [], []
    for k, nodes in enumerate(groups):
        pulled, seen = [], set()

        def pull(name: str) -> None:
            node = graph.producer.get(name)
            if name in graph.constant and node is not None and id(node) not in seen:
                seen.add(id(node))
                for i in node.input:
                    pull(i)
                pulled.append(node)

        for n in nodes:
            for i in n.input:
                pull(i)
        inputs = list(dict.fromkeys(i for n in nodes for i in n.input
                                    if i and i not in graph.constant and stage_of.get(i) != k))
        outputs = [o for n in nodes for o in n.output
                   if o in outputs_of_graph or any(j > k for j in read_by.get(o, ()))]
        stages.append({"file": f"stage_{k:02d}.onnx", "inputs": inputs, "outputs": outputs})
        bodies.append(pulled + nodes)
    inputs = {}
    for value in model.graph.input:
        tensor = value.type.tensor_type
        inputs[value.name] = {
            "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name,
            "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim],
        }
    record = {
        "format": 1,
        "kind": "unet",
        "inputs": inputs,
        "output": outputs_of_graph[0],
        "stages": stages,
        "weight_bytes": total,
        # The stages read the weights by offset: the plan is for these bytes only.
        "weights": parts.weights_digest(path),
    }
    return record, (model, graph, bodies)


def _integer_tensors(model: onnx.ModelProto, body: list) -> set[str]:
    """Tensors of the body that are (or may be) integers: typed so by onnx's shape inference
    (which cannot type what follows a contrib operator), or made by operators that make
    quantized activations and shapes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    found = {v.name for v in inferred.graph.value_info
             if v.type.tensor_type.elem_type and not np.issubdtype(
                 onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type), np.floating)}
    found |= {o for n in body if n.op_type in ("QuantizeLinear", "Shape", "Gather", "Concat", "Unsqueeze",
                                              "Slice", "Squeeze", "Range", "ConstantOfShape") for o in n.output}
    return found


def _probe_inputs(record: dict, batch: int) -> dict[str, np.ndarray]:
    """Inputs of a `batch`-row call at 8x8 latents (8 tokens of context)."""
    rng = np.random.default_rng(batch)
    feed = {}
    for name, declared in record["inputs"].items():
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


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # (Basic optimizations only: the proof compares graphs, and builds sessions quickly.)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _probe(path: Path, record: dict) -> list[tuple[dict, dict]]:
    """Per PROBE_BATCHES: the inputs and every passed tensor's value (and the output) of a run
    of the whole part, whose graph gets the passed tensors as extra outputs (untyped:
    onnxruntime types them)."""
    model = onnx.load(str(path), load_external_data=False)
    passed = list(dict.fromkeys(n for s in record["stages"] for n in s["outputs"]))
    known = {o.name for o in model.graph.output}
    for name in passed:
        if name not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    probe = path.parent / ".probe.onnx"
    try:
        onnx.save(model, str(probe))  # (beside the part: its weights are references into model.onnx_data)
        session = _session(probe)
        names = [o.name for o in session.get_outputs()]
        runs = []
        for batch in PROBE_BATCHES:
            feed = _probe_inputs(record, batch)
            runs.append((feed, dict(zip(names, session.run(names, feed)))))
        return runs
    finally:
        probe.unlink(missing_ok=True)


def _stage_models(record: dict, made: tuple, runs: list) -> list[onnx.ModelProto]:
    """The stage models, their inputs and outputs declared with the dtypes and ranks the probe
    saw (every axis dynamic)."""
    model, graph, bodies = made
    feed, values = runs[0]
    seen = {**feed, **values}
    shapes = {name: ((None,) * np.ndim(value), np.asarray(value).dtype) for name, value in seen.items()}
    return [_stage_model(model, graph, body, stage["inputs"], stage["outputs"], shapes, channels=False)
            for stage, body in zip(record["stages"], bodies)]


def prove(folder: Path, record: dict, runs: list) -> tuple[float, list[str], list[str]]:
    """Run the stages chained on the probe inputs; returns the largest difference of their
    output from the whole part's (relative to its largest value), the passed tensors (graph
    inputs included) whose first axis is the batch, and those of the same shape at every
    batch. Raises ValueError when the output differs by more than TOLERANCE."""
    chained = [dict(feed) for feed, _ in runs]
    for stage in record["stages"]:
        session = _session(folder / stage["file"])
        for values in chained:
            out = session.run(stage["outputs"], {n: values[n] for n in stage["inputs"]})
            values.update(zip(stage["outputs"], out))
        del session
    worst = 0.0
    for (_, whole), values in zip(runs, chained):
        expected, got = whole[record["output"]], values[record["output"]]
        scale = max(float(np.abs(expected).max()), 1e-6)
        worst = max(worst, float(np.abs(got.astype(np.float64) - expected).max()) / scale)
    if not worst <= TOLERANCE:
        raise ValueError(f"the stages chained differ from the whole UNet by {worst:.2e} of its output's range")
    passed = sorted({n for s in record["stages"] for n in s["inputs"]})
    shapes = {name: [np.shape(values[name]) for values in chained] for name in passed}
    batch_major = [name for name in passed
                   if all(len(shape) >= 1 and shape[0] == batch for batch, shape in zip(PROBE_BATCHES, shapes[name]))]
    batch_free = [name for name in passed if len(set(shapes[name])) == 1]
    return worst, batch_major, batch_free


def remove_stages(folder: Path) -> None:
    """Remove the stages of a UNet folder (plan first: a half-removed set is never used)."""
    for old in [folder / parts.UNET_STAGES, *folder.glob("stage_*.onnx")]:
        old.unlink(missing_ok=True)


def write_stages(path: Path, stage_bytes: int | None = None) -> dict | None:
    """Write and prove the stages of the UNet part whose model.onnx is `path` beside it
    (removing an earlier set); returns the plan, None when the weights fit in one stage.
    Raises ValueError (prove) when the stages do not compute the whole UNet's output."""
    folder = path.parent
    remove_stages(folder)
    made = plan(path, stage_bytes)
    if made is None:
        return None
    record, structure = made
    runs = _probe(path, record)
    models = _stage_models(record, structure, runs)
    del structure
    for stage, model in zip(record["stages"], models):
        tmp = folder / f".{stage['file']}.partial"
        onnx.save(model, str(tmp))
        tmp.replace(folder / stage["file"])
    del models
    record["difference"], major, free = prove(folder, record, runs)
    # A stage may run one image at a time (the rows of the CFG pair and of n images in turn:
    # one image's activations) when every tensor it takes has the batch as its first axis or
    # does not depend on it (a scalar timestep).
    for stage in record["stages"]:
        stage["rows"] = all(name in major or name in free for name in stage["inputs"])
    record["batch_major"] = major
    tmp = folder / f".{parts.UNET_STAGES}.partial"
    tmp.write_text(json.dumps(record))
    tmp.replace(folder / parts.UNET_STAGES)
    return record


def try_write_stages(path: Path, log, stage_bytes: int | None = None) -> int:
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
    sizes = f"{record['weight_bytes'] / 2**20 / len(record['stages']):.0f} MB of weights each"
    log(f"{path.parent.name}: {len(record['stages'])} stages for --low-memory ({sizes}; chained they "
        f"differ from the whole by {record['difference']:.1e} of its output's range)")
    return len(record["stages"])
