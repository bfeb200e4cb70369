"""Weight-only rewrites of an ONNX graph: the stored weights shrink, the computation stays float.

`to_fp16` stores every float32 initializer as float16 behind a Cast back to float32, so the
graph keeps float32 inputs, outputs and arithmetic (no "not implemented for Half" anywhere:
ONNX Runtime folds the casts at load time; OpenVINO keeps the f16 constants compressed and
decompresses them inside the kernels). `to_int8_weights` stores the weights of Conv, MatMul
and Gemm as symmetric per-output-channel int8, and embedding tables (Gather) per row, behind a
DequantizeLinear.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sdonnx.runtime import parts

# Tensors smaller than this stay float32 (scalars, shape constants): nothing to gain.
MIN_ELEMENTS = 16


def save_part(model: onnx.ModelProto, path: Path) -> None:
    """Write a part with its weights in model.onnx_data beside the graph, whatever its size.

    OpenVINO maps an external data file into memory and sdonnx gives the pages back once the
    compiled model holds its copy (runtime/memory.py), while weights inside the protobuf are
    parsed into memory whole: an SD 1.5 text encoder (0.46 GB) took 1.1 GB more to compile
    from its inline ONNX. Written under a temporary folder beside the part, then moved in (data
    file first); an interruption between the moves leaves the part to export again."""
    staged = path.with_name(f".{path.name}.staged")
    staged.mkdir(exist_ok=True)
    try:
        onnx.save(model, str(staged / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=parts.EXTERNAL_DATA_FILE, size_threshold=1024)
        for stale in path.parent.iterdir():
            if stale.name.startswith(path.name) and stale.name != path.name:
                stale.unlink()
        if (staged / parts.EXTERNAL_DATA_FILE).is_file():
            (staged / parts.EXTERNAL_DATA_FILE).replace(path.parent / parts.EXTERNAL_DATA_FILE)
        (staged / path.name).replace(path)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def store_externally(path: Path) -> bool:
    """Move the weights of an ONNX file that holds them inline to model.onnx_data beside it
    (save_part); False when they already are."""
    if (path.parent / parts.EXTERNAL_DATA_FILE).is_file():
        return False
    save_part(onnx.load(str(path)), path)
    return True


class _SafetensorsReader:
    """The tensors of a .safetensors file read one at a time at their offsets (float32), not
    through a mapping of the whole file, whose touched pages would all count in the export's
    resident memory (3.4 GB for SD 1.5's UNet)."""

    def __init__(self, path: Path):
        from sdonnx.export.exporter import check_safetensors

        self.path = path
        self.header = {k: v for k, v in check_safetensors(path).items() if k != "__metadata__"}
        with open(path, "rb") as f:
            self.start = 8 + struct.unpack("<Q", f.read(8))[0]

    def readable(self, name: str) -> bool:
        """Whether the file holds `name` in a dtype read here (floats: F64, F32, F16, BF16)."""
        return self.header.get(name, {}).get("dtype") in ("F64", "F32", "F16", "BF16")

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as float32 in its stored shape (bf16 and fp16 widened exactly)."""
        from sdonnx.runtime.tensorfiles import _SAFETENSORS_DTYPES, _widen

        spec = self.header[name]
        begin, end = spec["data_offsets"]
        raw = np.fromfile(self.path, dtype=np.uint8, count=end - begin, offset=self.start + begin)
        return _widen(raw, _SAFETENSORS_DTYPES[spec["dtype"]]).reshape(spec["shape"])  # (floats come out float32)


def write_weight_map(path: Path, source_weights: Path | None = None) -> int:
    """Write the module -> initializer map of a part (runtime/adapters.py) beside its file, so
    the runtime applies LoRAs and embeddings without the onnx package; returns how many
    modules it names (0: none, and no map is left). With `source_weights` (the torch
    part's .safetensors) every mapped weight is checked against the module's own, and one
    that differs is left out of the map (a LoRA on that module is then refused by name)."""
    from sdonnx.runtime.adapters import WEIGHT_MAP_FILE, derive_weight_map
    from sdonnx.runtime.errors import ModelFolderError

    target = path.parent / WEIGHT_MAP_FILE
    target.unlink(missing_ok=True)
    try:
        weight_map = derive_weight_map(path)
    except ModelFolderError:
        return 0
    if source_weights is not None and source_weights.is_file():
        torch_weights = _SafetensorsReader(source_weights)
        wrong = [m for m in weight_map.modules if torch_weights.readable(f"{m}.weight") and not np.array_equal(
            weight_map.read(m), torch_weights.read(f"{m}.weight"))]
        for module in wrong:
            del weight_map.modules[module]
    weight_map.save()
    return len(weight_map.modules)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, index))
    return uses


def _replace_initializer(graph: onnx.GraphProto, old: onnx.TensorProto, new: list[onnx.TensorProto],
                         node: onnx.NodeProto) -> None:
    """Swap an initializer for the new ones and a node that recomputes the old name."""
    graph.initializer.remove(old)
    graph.initializer.extend(new)
    # Topological order: the new node goes first, ahead of every consumer.
    graph.node.insert(0, node)


def to_fp16(model: onnx.ModelProto) -> int:
    """Store float32 initializers as float16 (+ Cast to float32); returns how many."""
    graph = model.graph
    count = 0
    for init in list(graph.initializer):
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < MIN_ELEMENTS:
            continue
        values = numpy_helper.to_array(init)
        half = numpy_helper.from_array(values.astype(np.float16), f"{init.name}__fp16")
        cast = helper.make_node("Cast", [half.name], [init.name], name=f"{init.name}__upcast",
                                to=onnx.TensorProto.FLOAT)
        _replace_initializer(graph, init, [half], cast)
        count += 1
    return count


# Which input of a node is its weight: the kernel of a product, the table of an embedding.
WEIGHT_INPUT = {"Conv": 1, "MatMul": 1, "Gemm": 1, "Gather": 0}


def _channel_axis(node: onnx.NodeProto, rank: int) -> int:
    """The axis of the weight that indexes output channels (an embedding's rows)."""
    if node.op_type in ("Conv", "Gather"):
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return rank - 1  # MatMul: (..., K, N)


def quantize_int8(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8: values ~ q * scale, q in [-127, 127]."""
    moved = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    scale = np.abs(moved).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = -1
    q = np.clip(np.round(values / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def to_int8_weights(model: onnx.ModelProto, exclude: set[str] = frozenset()) -> list[str]:
    """Store Conv/MatMul/Gemm weights and Gather tables as int8 + DequantizeLinear; returns the
    node names whose weights were rewritten. Nodes named in `exclude` keep float32 weights."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    uses = _consumers(graph)
    done: list[str] = []
    for name, init in initializers.items():
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < MIN_ELEMENTS:
            continue
        consumers = uses.get(name, [])
        # Only a weight, used as nothing else, with one channel axis for all its users.
        if not consumers or any(WEIGHT_INPUT.get(n.op_type) != i or n.name in exclude for n, i in consumers):
            continue
        values = numpy_helper.to_array(init)
        axes = {_channel_axis(n, values.ndim) for n, _ in consumers}
        if len(axes) != 1 or values.ndim < 2:
            continue
        axis = axes.pop()
        q, scale = quantize_int8(values, axis)
        tensors = [
            numpy_helper.from_array(q, f"{name}__int8"),
            numpy_helper.from_array(scale, f"{name}__scale"),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}__zero"),
        ]
        dequantize = helper.make_node("DequantizeLinear", [t.name for t in tensors], [name],
                                      name=f"{name}__dequantize", axis=axis)
        _replace_initializer(graph, init, tensors, dequantize)
        done.extend(n.name for n, _ in consumers)
    return done
