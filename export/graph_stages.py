"""What the VAE's and the UNet's stage cutters share: a graph's index of producers, consumers
and constants, the constant nodes a stage needs, and a stage's own model file whose weights stay
in the part's data file (export/vae_stages.py, export/unet_stages.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """A weight's size in bytes as stored (its dims and dtype)."""
    return math.prod(tensor.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


class Graph:
    """An ONNX graph's nodes in order, initializers, producers and consumers by tensor name, and the
    tensors computed from constants alone."""

    def __init__(self, model: onnx.ModelProto, folder: Path):
        self.model, self.folder = model, folder
        self.nodes = list(model.graph.node)
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        # Tensors computed from constants alone (weights, shapes of constants, F.pad's pads).
        self.constant = set(self.initializers)
        for n in self.nodes:
            if all(i == "" or i in self.constant for i in n.input):
                self.constant.update(n.output)

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor that is an initializer, a Constant or an Identity of one."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name], base_dir=str(self.folder))
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].name == "value" else None
        if node.op_type == "Identity":
            return self.value(node.input[0])
        if node.op_type == "Cast":  # float16 weights widened (quantize --mode fp16)
            value = self.value(node.input[0])
            to = next(a.i for a in node.attribute if a.name == "to")
            return None if value is None else value.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        return None

    def only_consumer(self, name: str, op_type: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def constant_feeders(graph: Graph, nodes: list) -> list:
    """The nodes computing constants (a weight's DequantizeLinear or Cast, shapes of weights,
    F.pad's pads) that `nodes` read, in graph order of dependence: each stage gets its own copy."""
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
    return pulled


def cross_reads(graph: Graph, groups: list[list]) -> tuple[dict[str, int], dict[str, set[int]]]:
    """For stages `groups` (each a list of nodes, in order): the stage computing each tensor,
    and for each tensor some stage reads from elsewhere (an earlier stage, or the graph's
    inputs) the stages that read it. Constants are left out: every stage has its own."""
    stage_of = {o: k for k, nodes in enumerate(groups) for n in nodes for o in n.output}
    read_by: dict[str, set[int]] = {}
    for k, nodes in enumerate(groups):
        for n in nodes:
            for i in n.input:
                if i and i not in graph.constant and stage_of.get(i) != k:
                    read_by.setdefault(i, set()).add(k)
    return stage_of, read_by


def stage_inputs(graph: Graph, nodes: list, k: int, stage_of: dict[str, int]) -> list[str]:
    """The tensors stage `k` (its `nodes`) reads from elsewhere, in order of first use."""
    return list(dict.fromkeys(i for n in nodes for i in n.input
                              if i and i not in graph.constant and stage_of.get(i) != k))


def stage_model(model: onnx.ModelProto, graph: Graph, nodes: list, inputs: list[str], outputs: list[str],
                 shapes: dict[str, tuple], channels: bool = True) -> onnx.ModelProto:
    """A model of `nodes` with those inputs and outputs, declared with the dtype and rank of
    `shapes` {name: (shape, dtype)}, every axis dynamic but the channels (axis 1) when
    `channels`; its initializers are copies of the part's, external ones as references into
    the same data file."""
    used = {i for n in nodes for i in n.input}
    initializers = [graph.initializers[name] for name in sorted(used & set(graph.initializers))]

    def info(name: str) -> onnx.ValueInfoProto:
        shape, dtype = shapes[name]
        dims = [None] * len(shape)
        if channels and len(shape) >= 2:
            dims[1] = shape[1]
        return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims)

    stage = onnx.helper.make_graph(nodes, "stage", [info(n) for n in inputs], [info(n) for n in outputs],
                                   initializer=initializers)
    return onnx.helper.make_model(stage, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def save_stage(model: onnx.ModelProto, folder: Path, file: str) -> None:
    """Write a stage model as folder/file through a temporary name (never half-written)."""
    tmp = folder / f".{file}.partial"
    onnx.save(model, str(tmp))
    tmp.replace(folder / file)


def remove_stage_files(folder: Path, plan: str, extra: tuple[str, ...] = ()) -> None:
    """Remove a part folder's stage plan first (a half-removed set is never used), then its
    stage_NN.onnx files, the `extra` files and what an interrupted write left (.partial)."""
    for old in [folder / plan, *(folder / name for name in extra), *folder.glob("stage_*.onnx"),
                *folder.glob(".stage_*.partial"), folder / f".{plan}.partial",
                *(folder / f".{name}.partial" for name in extra)]:
        old.unlink(missing_ok=True)
