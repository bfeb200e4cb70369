"""Tensors from the files people download (LoRAs, embeddings), read into numpy without torch.

- `.safetensors`: an 8-byte little-endian header length, a JSON header (dtype, shape, byte
  range per tensor) and the raw data (the format's specification, huggingface/safetensors).
  Read here rather than with `safetensors.numpy`, which refuses bf16, the dtype many LoRAs
  are saved in.
- `.pt` / `.ckpt` / `.bin` in torch's zip format (torch >= 1.6): `data.pkl` names the tensors, each a
  view of a storage stored as a raw file `data/<key>`. The pickle is read with an unpickler that
  knows only the handful of globals a tensor file needs (torch's own weights_only rule), so
  a file that would run code is refused, never run.

Floating tensors come back as float32 (bf16 and fp16 widened exactly); integer ones as they are.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from sdonnx.runtime.errors import InputError

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16",
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": "bf16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
MAX_HEADER = 100 * 2**20  # bytes; the format's own reader refuses more


def _widen(raw: np.ndarray, dtype) -> np.ndarray:
    """Raw little-endian bytes as an array: bf16 shifted into float32's high half, floats widened."""
    if dtype == "bf16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    array = raw.view(np.dtype(dtype).newbyteorder("<"))
    return array.astype(np.float32) if array.dtype.kind == "f" else array.astype(array.dtype.newbyteorder("="))


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({name: array}, metadata) of a .safetensors file; InputError when it is not one."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise InputError(f"{path} is not a safetensors file (only {len(data)} bytes)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER, len(data) - 8):
        raise InputError(f"{path} is not a safetensors file (its header length {size} does not fit the file)")
    try:
        header = json.loads(data[8:8 + size])
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path} is not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    body = np.frombuffer(data, dtype=np.uint8, offset=8 + size)
    tensors = {}
    for name, spec in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[spec["dtype"]]
            start, end = spec["data_offsets"]
            shape = tuple(int(d) for d in spec["shape"])
            tensors[name] = _widen(body[start:end], dtype).reshape(shape)
        except KeyError as e:
            raise InputError(f"{path}: tensor {name!r} has an unsupported dtype or no {e} field") from None
        except (TypeError, ValueError) as e:
            raise InputError(f"{path}: tensor {name!r} does not fit its declared shape or range ({e})") from None
    return tensors, {str(k): str(v) for k, v in metadata.items()}


class _Storage:
    def __init__(self, dtype, key: str):
        self.dtype, self.key = dtype, key


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *args):
    return ("tensor", storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, hooks=None, *args):
    return data


class _StorageType:
    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


class _TensorUnpickler(pickle.Unpickler):
    """Only what torch.save writes for tensors and plain containers (torch's weights_only set)."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): OrderedDict,
        ("torch", "Size"): tuple,
    }

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise InputError(f"{self.path} needs {module}.{name} to load, which is not a tensor: it could run code, "
                         "so it was not read; use a .safetensors copy of it")

    def persistent_load(self, pid):
        # ("storage", storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise InputError(f"{self.path}: unknown persistent id {pid!r} in its pickle")
        storage_type = pid[1]
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else _STORAGE_DTYPES.get(str(storage_type))
        return _Storage(dtype, str(pid[2]))


def read_torch_zip(path: Path) -> object:
    """The object torch.save wrote (dicts, lists, numbers, strings), tensors as numpy arrays;
    InputError for a file that is not torch's zip format or needs more than tensors."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is neither safetensors nor torch's zip format (an old-style pickle?); "
                         "save it as .safetensors")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise InputError(f"{path} is a zip file but not a torch file (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            tree = _TensorUnpickler(archive.open(pickles[0]), path).load()
        except InputError:
            raise
        except Exception as e:  # a damaged or foreign pickle
            raise InputError(f"{path}: cannot read its pickle ({type(e).__name__}: {e})") from None
        cache: dict[str, np.ndarray] = {}

        def storage(s: _Storage) -> np.ndarray:
            if s.key not in cache:
                raw = np.frombuffer(archive.read(f"{prefix}data/{s.key}"), dtype=np.uint8)
                cache[s.key] = _widen(raw, s.dtype).reshape(-1)
            return cache[s.key]

        def build(node):
            if isinstance(node, tuple) and len(node) == 5 and node[0] == "tensor":
                _, s, offset, size, stride = node
                flat = storage(s)
                last = offset + sum((n - 1) * st for n, st in zip(size, stride)) if all(size) else offset - 1
                if offset < 0 or any(st < 0 for st in stride) or len(size) != len(stride) or last >= len(flat):
                    raise ValueError(f"a tensor of size {size} reaches past its storage of {len(flat)}")
                view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                                       strides=tuple(st * flat.itemsize for st in stride))
                return np.array(view)
            if isinstance(node, dict):
                return type(node)((k, build(v)) for k, v in node.items())
            if isinstance(node, (list, tuple)):
                return type(node)(build(v) for v in node)
            return node

        try:
            return build(tree)
        except (KeyError, ValueError, TypeError) as e:
            raise InputError(f"{path}: a tensor in it is damaged ({e})") from None


def read_tensor_file(path: Path) -> tuple[dict, dict[str, str]]:
    """(content, metadata) of a .safetensors file ({name: array}) or a torch zip file (whatever
    dict it holds; no metadata)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        content = read_torch_zip(path)
        if not isinstance(content, dict):
            raise InputError(f"{path} holds a {type(content).__name__}, not a dictionary of tensors")
        return content, {}
    return read_safetensors(path)
