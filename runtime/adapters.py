"""LoRA and textual-inversion weights applied to an exported folder at load time, without torch.

A LoRA adds a low-rank product to the weight of a Linear or Conv layer (Hu et al. 2021,
"LoRA: Low-Rank Adaptation of Large Language Models"; kohya-ss/sd-scripts `networks/lora.py`):

    W' = W + scale * (alpha / rank) * up @ down        up (out, rank), down (rank, in[, kh, kw])

The exported graphs name their weights differently from torch: the exporter stores a Linear
weight transposed under a generated name (`onnx::MatMul_2613`, [in, out]) for a MatMul node
named after its module (`/down_blocks.0/attentions.0/.../attn1/to_q/MatMul`), while Gemm and
Conv weights keep the torch name and layout. `WeightMap` is the table module -> initializer,
layout and where its bytes lie; `sdonnx export` writes it into every part's folder
(WEIGHT_MAP_FILE), and for a folder exported elsewhere it is derived from the node names
(which needs the `onnx` package). The patched tensors then replace the initializers when a
session is created (onnxruntime's SessionOptions.add_initializer; OpenVINO: new Constant
nodes before compiling); the files are never written.

Textual inversion (Gal et al. 2022, "An Image is Worth One Word") appends an embedding's
vectors as new rows of the text encoder's token table; the prompt's mention of the
embedding's name is replaced by their ids (runtime/prompts.py), as AUTOMATIC1111 does.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from sdonnx.runtime import parts, prompts
from sdonnx.runtime.checks import check_number
from sdonnx.runtime.errors import InputError, ModelFolderError
from sdonnx.runtime.tensorfiles import read_tensor_file

WEIGHT_MAP_FILE = "sdonnx_weights.json"
TOKEN_EMBEDDING = "text_model.embeddings.token_embedding"
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
MAX_VECTORS = 75  # an embedding's vectors stay in one 75-token window (prompts.py)
MAX_SCALE = 100.0  # |scale| above this is a typo, not a style strength (A1111's slider: -2..2)

# Layouts of a weight in the graph: "linear_t" a MatMul's [in, out] (torch's weight
# transposed), "linear" a Gemm's [out, in] (transB=1) as torch stores it, "conv" [out, in, kh,
# kw], "table" an embedding table [vocabulary, width].
_OP_LAYOUT = {"MatMul": "linear_t", "Conv": "conv"}


@dataclass(frozen=True)
class Weight:
    """One weight of a part's graph: which initializer, its layout and shape in the graph,
    and where its raw little-endian bytes lie (file beside the model, byte offset)."""

    initializer: str
    layout: str
    shape: tuple[int, ...]
    dtype: str  # "float32" or "float16"
    file: str
    offset: int

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.layout == "linear_t" else self.shape

    def to_graph(self, torch_layout: np.ndarray) -> np.ndarray:
        """A tensor in torch's layout as this initializer stores it (transposed, cast)."""
        value = torch_layout.T if self.layout == "linear_t" else torch_layout
        return np.ascontiguousarray(value, dtype=self.dtype)


@dataclass
class WeightMap:
    """Module path (torch's dotted name, `down_blocks.0.attentions.0.proj_in`) -> Weight, for
    one part file; `files` the byte sizes of the files it was made from (a stale map is not used)."""

    folder: Path
    modules: dict[str, Weight]
    files: dict[str, int]
    # Weights stored inside the graph file of a map derived at load (offset -1): held here,
    # as finding their bytes in a large protobuf would take longer than reading it.
    values: dict[str, np.ndarray] = field(default_factory=dict)

    def read(self, module: str) -> np.ndarray:
        """The module's weight in torch's layout ((out, in) or (out, in, kh, kw)), float32."""
        w = self.modules[module]
        if w.offset < 0:
            value = self.values[module].astype(np.float32)
        else:
            count = math.prod(w.shape)
            raw = np.fromfile(self.folder / w.file, dtype=np.dtype(w.dtype).newbyteorder("<"), count=count,
                              offset=w.offset)
            value = raw.astype(np.float32).reshape(w.shape)
        return value.T if w.layout == "linear_t" else value

    def save(self) -> Path:
        """Write WEIGHT_MAP_FILE beside the part; weights inside the graph file are located
        by their bytes (sdonnx's exports keep theirs beside it: only a small embedded model
        has any). ModelFolderError when one cannot be located unambiguously."""
        data = None
        entries = {}
        for module, w in self.modules.items():
            offset = w.offset
            if offset < 0:
                data = data if data is not None else (self.folder / w.file).read_bytes()
                raw = np.ascontiguousarray(self.values[module], dtype=np.dtype(w.dtype).newbyteorder("<")).tobytes()
                offset = data.find(raw)
                if offset < 0 or data.find(raw, offset + 1) >= 0:
                    raise ModelFolderError(f"{self.folder / w.file}: the weight of {module} cannot be located; "
                                           "store the weights beside the graph (external data)")
            entries[module] = [w.initializer, w.layout, list(w.shape), w.dtype, w.file, offset]
        path = self.folder / WEIGHT_MAP_FILE
        path.write_text(json.dumps({"format": 1, "files": self.files, "modules": entries}, indent=0) + "\n")
        return path

    @classmethod
    def load(cls, model_file: Path) -> "WeightMap":
        """The map of a part file: the one written beside it at export when it still matches
        the files, else derived from the graph (needs the `onnx` package)."""
        folder = model_file.parent
        recorded = folder / WEIGHT_MAP_FILE
        if recorded.is_file():
            data = parts.read_json(recorded)
            files = data.get("files", {})
            if files and all((folder / n).is_file() and (folder / n).stat().st_size == s for n, s in files.items()):
                return cls(folder, {m: Weight(e[0], e[1], tuple(e[2]), e[3], e[4], int(e[5]))
                                    for m, e in data["modules"].items()}, files)
        return derive_weight_map(model_file)


def _module_of(node_name: str) -> str | None:
    """`/down_blocks.0/attentions.0/proj_in/Conv` -> `down_blocks.0.attentions.0.proj_in`."""
    if not node_name.startswith("/") or node_name.count("/") < 2:
        return None
    return ".".join(node_name.strip("/").split("/")[:-1])


def derive_weight_map(model_file: Path) -> WeightMap:
    """The module -> weight table of an ONNX file exported from torch (optimum, sdonnx), read
    from its node names; weights behind a Cast (sdonnx's fp16 folders) are followed. Raises
    ModelFolderError when the `onnx` package is missing or the graph names no modules."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ModelFolderError(
            f"{model_file.parent} has no {WEIGHT_MAP_FILE} (it was not exported by sdonnx) and the onnx package "
            "that would derive it is not installed: pip install onnx, or export the model with `sdonnx export`"
        ) from None
    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    modules: dict[str, Weight] = {}
    values: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            layout = "linear" if trans_b else "linear_t"
        elif node.op_type == "Gather" and node.name.endswith("token_embedding/Gather"):
            layout = "table"
        else:
            layout = _OP_LAYOUT.get(node.op_type)
        if layout is None or len(node.input) < 2:
            continue
        name = node.input[0] if layout == "table" else node.input[1]
        if name not in inits and name in producers and producers[name].op_type == "Cast":
            name = producers[name].input[0]  # an fp16 weight behind its Cast to float32
        init = inits.get(name)
        module = _module_of(node.name)
        if init is None or module is None or uses.get(name, 0) != 1 and layout != "table" \
                or init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        dtype = "float32" if init.data_type == onnx.TensorProto.FLOAT else "float16"
        external = {e.key: e.value for e in init.external_data}
        if init.data_location == onnx.TensorProto.EXTERNAL:
            file, offset = external["location"], int(external.get("offset", 0))
        else:
            file, offset = model_file.name, -1
            values[module] = numpy_helper.to_array(init)
        modules[module] = Weight(init.name, layout, tuple(int(d) for d in init.dims), dtype, file, offset)
    if not modules:
        raise ModelFolderError(
            f"{model_file}: no float weights named after torch modules were found (a quantized or renamed graph); "
            "LoRAs and embeddings need a float folder exported from torch (`sdonnx export`)"
        )
    files = {p.name: p.stat().st_size for p in parts.model_files(model_file)}
    return WeightMap(model_file.parent, modules, files, values)


# --- LoRA files ------------------------------------------------------------------------------

# (down, up) key endings of the LoRA formats in use: kohya/A1111, PEFT, diffusers' older
# LoRACompatible layers, diffusers' training scripts (attention processors).
_PAIRS = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".down.weight", ".up.weight"),
)
# Keys of LoRA variants that are not a plain low-rank product, refused by name.
_VARIANTS = {
    "hada_w1_a": "LoHa (LyCORIS)", "lokr_w1": "LoKr (LyCORIS)", "lokr_w1_a": "LoKr (LyCORIS)",
    "oft_blocks": "OFT (LyCORIS)", "oft_diag": "OFT (LyCORIS)", "a1.weight": "GLoRA (LyCORIS)",
    "lora_mid.weight": "LoCon with a Tucker mid weight (LyCORIS)", "diff": "a full weight difference (LyCORIS)",
    "dora_scale": "DoRA (weight-decomposed LoRA)", "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
}
_PART_PREFIXES = (
    ("lora_unet_", parts.UNET.name, True), ("lora_te_", parts.TEXT_ENCODER.name, True),
    ("lora_te1_", parts.TEXT_ENCODER.name, True),
    ("unet.", parts.UNET.name, False), ("text_encoder.", parts.TEXT_ENCODER.name, False),
    ("base_model.model.", None, False),
)


@dataclass(frozen=True)
class LoraLayer:
    """One layer's low-rank pair: `up` (out, rank[, 1, 1]), `down` (rank, in[, kh, kw]),
    `alpha` (None: the rank, i.e. no extra scaling), float32."""

    down: np.ndarray
    up: np.ndarray
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> np.ndarray:
        """(alpha / rank) * up @ down in the layer's weight layout: (out, in) or (out, in, kh, kw)."""
        product = self.up.reshape(self.up.shape[0], -1) @ self.down.reshape(self.rank, -1)
        factor = 1.0 if self.alpha is None else self.alpha / self.rank
        return (product * factor).reshape((self.up.shape[0], *self.down.shape[1:]))


@dataclass(frozen=True, eq=False)  # compared by identity: one object per file read
class Lora:
    """A LoRA file's layers keyed by (part, module-key); module keys are dotted names, or
    kohya's flat names (`down_blocks_0_attentions_0_proj_in`) until matched to a model."""

    name: str  # the file's stem: what <lora:NAME> refers to
    path: Path
    layers: dict[tuple[str | None, str, bool], LoraLayer]  # (part or None: either, key, flat)
    short_hash: str  # AUTOMATIC1111's "Lora hashes" value (sd-webui-additional-networks' hash)


def _module_key(key: str) -> str:
    """diffusers' attention-processor keys to module names: `attn1.processor.to_q_lora` ->
    `attn1.to_q`, `to_out_lora` -> `to_out.0`."""
    key = re.sub(r"\.processor\.to_out_lora$", ".to_out.0", key)
    return re.sub(r"\.processor\.(\w+)_lora$", r".\1", key)


def short_hash(path: Path) -> str:
    """The first 12 hex digits of the sha256 of a safetensors file's data after its header
    (AUTOMATIC1111's `addnet_hash_safetensors`, its "Lora hashes"), or of a whole other file."""
    data = path.read_bytes()
    if path.suffix == ".safetensors" and len(data) > 8:
        data = data[8 + int.from_bytes(data[:8], "little"):]
    return hashlib.sha256(data).hexdigest()[:12]


def read_lora(path: Path) -> Lora:
    """A LoRA file (kohya/A1111, PEFT, diffusers), its layers not yet matched to a model.
    Raises InputError for a file that is not a LoRA, or a LoRA variant other than the
    low-rank product (LoHa, LoKr, OFT ...), naming it."""
    path = Path(path)
    tensors, _ = read_tensor_file(path)
    tensors = {k: np.asarray(v, dtype=np.float32) if isinstance(v, (int, float)) else v
               for k, v in tensors.items() if isinstance(v, (np.ndarray, int, float))}
    for key in tensors:
        for marker, variant in _VARIANTS.items():
            if key.endswith("." + marker) or key.endswith("." + marker + ".weight"):
                raise InputError(f"{path.name} is a {variant} network, which sdonnx does not apply; "
                                 "use a plain LoRA (lora_down/lora_up or lora_A/lora_B keys)")
    layers: dict[tuple[str | None, str, bool], LoraLayer] = {}
    for key, down in tensors.items():
        pair = next((p for p in _PAIRS if key.endswith(p[0])), None)
        if pair is None:
            continue
        stem = key[: -len(pair[0])]
        up = tensors.get(stem + pair[1])
        if up is None:
            raise InputError(f"{path.name}: {key} has no matching {stem + pair[1]}; the file is incomplete")
        alpha = tensors.get(stem + ".alpha")
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] \
                or up.shape[2:] not in ((), (1, 1)):
            raise InputError(f"{path.name}: {stem} has a down {down.shape} and up {up.shape} that do not "
                             "multiply; the file is damaged or not a LoRA")
        if alpha is not None and np.asarray(alpha).size != 1:
            raise InputError(f"{path.name}: {stem}.alpha must be one number, it has shape {np.shape(alpha)}")
        if not (np.isfinite(down).all() and np.isfinite(up).all()
                and (alpha is None or np.isfinite(alpha).all())):
            raise InputError(f"{path.name}: {stem} holds NaN or infinite values; the file is damaged")
        part, flat = None, False
        for prefix, prefix_part, prefix_flat in _PART_PREFIXES:
            if stem.startswith(prefix):
                stem, part, flat = stem[len(prefix):], prefix_part, prefix_flat
                break
        alpha_value = None if alpha is None else float(np.asarray(alpha).reshape(-1)[0])
        layers[(part, _module_key(stem), flat)] = LoraLayer(down, up, alpha_value)
    if not layers:
        raise InputError(f"{path.name} is not a LoRA: none of its {len(tensors)} tensors is a lora_down/lora_up "
                         "or lora_A/lora_B pair")
    return Lora(path.stem, path, layers, short_hash(path))


def check_scale(name: str, scale) -> float:
    """A LoRA's scale as a float; InputError unless a finite number within +-MAX_SCALE."""
    return float(check_number(f"LoRA {name}'s scale", scale, -MAX_SCALE, MAX_SCALE))


@dataclass(frozen=True)
class LoraUse:
    """A LoRA at a scale: per part (AUTOMATIC1111's `<lora:name:te:unet>` sets them apart)."""

    lora: Lora
    unet_scale: float
    text_encoder_scale: float

    def __post_init__(self):
        object.__setattr__(self, "unet_scale", check_scale(self.lora.name, self.unet_scale))
        object.__setattr__(self, "text_encoder_scale", check_scale(self.lora.name, self.text_encoder_scale))

    def scale(self, part: str) -> float:
        """The scale on `part` ("unet" or "text_encoder")."""
        return self.unet_scale if part == parts.UNET.name else self.text_encoder_scale

    @property
    def tag(self) -> str:
        """As written in an AUTOMATIC1111 prompt."""
        if self.unet_scale == self.text_encoder_scale:
            return f"<lora:{self.lora.name}:{self.unet_scale:g}>"
        return f"<lora:{self.lora.name}:{self.text_encoder_scale:g}:{self.unet_scale:g}>"


def match_layers(lora: Lora, part: str, weights: WeightMap) -> dict[str, LoraLayer]:
    """The LoRA's layers for `part` by module name in `weights`; InputError when a layer of
    this part names no module of the model or does not fit its weight (another base model)."""
    flat_names = {m.replace(".", "_"): m for m in weights.modules}
    matched: dict[str, LoraLayer] = {}
    missing: list[str] = []
    for (layer_part, key, flat), layer in lora.layers.items():
        if layer_part not in (None, part):
            continue
        module = flat_names.get(key) if flat else key
        if module not in weights.modules:
            if layer_part == part:
                missing.append(key)
            continue
        matched[module] = layer
    if missing:
        raise InputError(
            f"LoRA {lora.name}: {len(missing)} of its {part} layers name modules this model does not have "
            f"(first: {missing[0]}); it was made for another architecture (SDXL? SD 2.x?)"
        )
    for module, layer in matched.items():
        want = weights.modules[module].torch_shape
        got = (layer.up.shape[0], *layer.down.shape[1:])
        if math.prod(got) != math.prod(want) or got[:2] != want[:2]:
            raise InputError(
                f"LoRA {lora.name}: layer {module} has shape {got} but the model's weight is {want}; "
                "it was made for another base model (an SD 2.x LoRA on SD 1.x, or the reverse)"
            )
    return matched


# --- textual inversion ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Embedding:
    """A textual-inversion embedding: `vectors` (n, width) float32, used where `name` is written."""

    name: str
    vectors: np.ndarray
    path: Path
    short_hash: str


def read_embedding(path: Path) -> Embedding:
    """An embedding file: AUTOMATIC1111's (`string_to_param`, `.pt` or `.safetensors`;
    `emb_params`) or diffusers' `learned_embeds.safetensors` ({token: vector(s)}); its name
    is the file's stem. InputError when it is none of these (SDXL's clip_l/clip_g pairs
    included)."""
    path = Path(path)
    content, _ = read_tensor_file(path)
    if "string_to_param" in content and isinstance(content["string_to_param"], dict):
        vectors = next(iter(content["string_to_param"].values()), None)
    elif "emb_params" in content:
        vectors = content["emb_params"]
    elif {"clip_l", "clip_g"} & set(content):
        raise InputError(f"{path.name} is an SDXL embedding (clip_l/clip_g); it does not fit an SD 1.x/2.x model")
    elif len(content) == 1 and isinstance(next(iter(content.values())), np.ndarray):
        vectors = next(iter(content.values()))
    else:
        raise InputError(f"{path.name} is not a textual-inversion embedding (no string_to_param, emb_params, "
                         "or single learned token)")
    if not isinstance(vectors, np.ndarray) or vectors.ndim not in (1, 2) or vectors.size == 0:
        raise InputError(f"{path.name}: its embedding is not a vector or a (vectors, width) matrix")
    vectors = np.atleast_2d(vectors).astype(np.float32)
    if not np.isfinite(vectors).all():
        raise InputError(f"{path.name}: its embedding holds NaN or infinite values")
    return Embedding(path.stem, vectors, path, short_hash(path))


# --- the patches of one load ------------------------------------------------------------------


@dataclass
class Patcher:
    """The replaced initializers of one part for a set of LoRAs and embeddings, recomputing
    only the tensors whose contributions changed since the last set."""

    part: str
    weights: WeightMap
    _done: dict[str, tuple[tuple, np.ndarray]] = field(default_factory=dict)

    def check(self, uses: Sequence[LoraUse], embeddings: Sequence[Embedding] = ()) -> None:
        """Raise the InputError `overrides` would, without computing anything."""
        for use in uses:
            match_layers(use.lora, self.part, self.weights)
        if embeddings:
            self._check_embeddings(embeddings)

    def forget(self) -> None:
        """Drop the patched tensors kept for the next switch (low_memory: they are recomputed)."""
        self._done = {}

    @property
    def resized(self) -> frozenset[str]:
        """The initializers the last `overrides` gave another shape (a token table grown by embeddings)."""
        return frozenset({self.weights.modules[TOKEN_EMBEDDING].initializer} if TOKEN_EMBEDDING in self._done else ())

    @property
    def inline(self) -> frozenset[str]:
        """The initializers of the last `overrides` stored inside the graph file, not beside it."""
        return frozenset(self.weights.modules[m].initializer for m in self._done
                         if self.weights.modules[m].file.endswith(".onnx"))

    @property
    def table_rows(self) -> int:
        """Rows of the text encoder's token table as exported (new embeddings' ids start here)."""
        return self._table_weight().shape[0]

    def _table_weight(self) -> Weight:
        if TOKEN_EMBEDDING not in self.weights.modules:
            raise ModelFolderError(f"{self.weights.folder}: the text encoder's token table was not found; "
                                   "embeddings need a text encoder exported from transformers' CLIPTextModel")
        return self.weights.modules[TOKEN_EMBEDDING]

    def _check_embeddings(self, embeddings: Sequence[Embedding]) -> None:
        width = self._table_weight().shape[1]
        for e in embeddings:
            if len(e.vectors) > MAX_VECTORS:
                raise InputError(f"embedding {e.name} has {len(e.vectors)} vectors; at most {MAX_VECTORS} fit "
                                 "in a prompt window")
            if e.vectors.shape[1] != width:
                raise InputError(f"embedding {e.name} has vectors of width {e.vectors.shape[1]}, this model's "
                                 f"text encoder takes {width} (an embedding for another base model)")

    def overrides(self, uses: Sequence[LoraUse], embeddings: Sequence[Embedding] = ()) -> dict[str, np.ndarray]:
        """{initializer name: tensor as the graph stores it}; empty when nothing applies. The
        tensors of the last call whose contributions are unchanged are reused; the others are
        dropped before the new ones are computed, so a switch holds one set at a time."""
        contributions: dict[str, list[tuple[LoraUse, LoraLayer]]] = {}
        for use in uses:
            if use.scale(self.part) == 0.0:
                continue
            for module, layer in match_layers(use.lora, self.part, self.weights).items():
                contributions.setdefault(module, []).append((use, layer))
        keys = {module: tuple((use.lora, use.scale(self.part)) for use, _ in contributors)
                for module, contributors in contributions.items()}
        if embeddings:
            self._check_embeddings(embeddings)
            keys[TOKEN_EMBEDDING] = ("embeddings", *embeddings)
        self._done = {m: done for m, done in self._done.items() if keys.get(m) == done[0]}
        for module, key in keys.items():
            if module in self._done:
                continue
            if module == TOKEN_EMBEDDING:
                table = np.concatenate([self.weights.read(module), *(e.vectors for e in embeddings)])
                self._done[module] = (key, self.weights.modules[module].to_graph(table))
                continue
            w = self.weights.read(module)
            for use, layer in contributions[module]:
                w += use.scale(self.part) * layer.delta().reshape(w.shape)
            self._done[module] = (key, self.weights.modules[module].to_graph(w))
        return {self.weights.modules[m].initializer: value for m, (_, value) in self._done.items()}


def default_dir(kind: str, given: str | Path | None = None) -> Path:
    """Where LoRAs ("loras") or embeddings ("embeddings") are looked up: `given`, else
    $SDONNX_LORA_DIR / $SDONNX_EMBEDDINGS_DIR, else $XDG_DATA_HOME/sdonnx/KIND
    (~/.local/share/sdonnx/KIND)."""
    import os

    if given is not None:
        return Path(given).expanduser()
    env = os.environ.get({"loras": "SDONNX_LORA_DIR", "embeddings": "SDONNX_EMBEDDINGS_DIR"}[kind])
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "sdonnx" / kind


def locate_lora(name: str, folder: Path | None, paths: bool = True) -> Path:
    """The LoRA file `name` names: a path (when `paths`: the command line and the API, never a
    prompt's tag, which a server takes from anyone), or a file stem in `folder`
    (`<lora:NAME>`); InputError listing what the folder has when neither."""
    path = Path(name).expanduser()
    if paths and path.is_file():
        return path
    if not paths and ("/" in name or "\\" in name):
        raise InputError(f"<lora:{name}>: a prompt's tag names a file in the LoRA folder ({folder}), never a path")
    found = find_files(folder).get(name)
    if found is None:
        known = ", ".join(sorted(find_files(folder))[:10]) or "no LoRA files"
        raise InputError(f"LoRA {name!r} not found: not a file, nor a name in {folder or 'the LoRA folder'} "
                         f"(it has {known}); pass a path, or put the file in --lora-dir")
    return found


def parse_lora_option(spec: str) -> tuple[str, float]:
    """`FILE[:SCALE]` (the command line's --lora) -> (FILE, SCALE), scale 1 when not given;
    InputError for a scale that is not a number or out of range."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or Path(spec).expanduser().is_file():
        return spec, 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise InputError(f"--lora {spec}: the scale after ':' must be a number, as in FILE:0.8") from None
    return head, check_scale(head, scale)


def find_files(folder: Path | None, suffixes: Iterable[str] = LORA_SUFFIXES) -> dict[str, Path]:
    """{stem: path} of the files in `folder` (and its subfolders) with these suffixes."""
    if folder is None or not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in suffixes and path.is_file():
            found.setdefault(path.stem, path)
    return found


# --- what a pipeline's parts carry ------------------------------------------------------------

KEEP_FILES = 8  # LoRA and embedding files kept read between generations
_PATCHED_PARTS = (parts.UNET.name, parts.TEXT_ENCODER.name)


@dataclass(frozen=True)
class Overrides:
    """What a part is loaded with: `tensors` {initializer: array}, and which of them have
    another shape than the file's (`resized`) or are stored inside the graph file (`inline`)."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    resized: frozenset[str] = frozenset()
    inline: frozenset[str] = frozenset()


class Adapters:
    """The LoRAs and embeddings a pipeline's UNet and text encoder should carry, the files they
    come from, and the patched tensors of each part (Patcher). The pipeline reloads a part
    whose `wanted` key differs from the one it was loaded with."""

    def __init__(self, folder: Path, tokenizer, lora_dir: Path | None, embeddings_dir: Path | None):
        self.folder, self.tokenizer = folder, tokenizer
        self.lora_dir, self.embeddings_dir = lora_dir, embeddings_dir
        self.loras: tuple[LoraUse, ...] = ()
        self.embeddings: tuple[Embedding, ...] = ()
        # Token ids of each active embedding's name -> the ids of its vectors in the grown table.
        self.embedding_ids: dict[tuple[int, ...], list[int]] = {}
        self.patchers: dict[str, Patcher] = {}
        self._args: dict[str, tuple[tuple, tuple]] = {}
        self._wanted: dict[str, tuple] = {}
        self._files: dict[Path, tuple[tuple, object]] = {}

    def wanted(self, part: str) -> tuple:
        """A key of the LoRAs (and scales) and embeddings `part` should carry; () for none."""
        return self._wanted.get(part, ())

    def patcher(self, part: str) -> Patcher:
        """The part's weight map and patch cache; InputError for a part without float weights."""
        if part not in self.patchers:
            file = next(p for p in parts.PARTS if p.name == part).file(self.folder)
            record = parts.read_json(self.folder / parts.RECORD).get("parts", {}).get(part, {})
            if file is None or file.name == parts.IR_FILE or "int8" in str(record.get("precision", "")):
                raise InputError(f"LoRAs and embeddings need float weights, and {self.folder.name}'s {part} is "
                                 "int8; use the fp32 or fp16 folder it was quantized from")
            self.patchers[part] = Patcher(part, WeightMap.load(file))
        return self.patchers[part]

    def overrides(self, part: str) -> Overrides:
        """What `part` is to be loaded with now; the patched tensors of a previous set whose
        LoRAs are gone are dropped."""
        uses, extra = self._args.get(part, ((), ()))
        if not uses and not extra:
            self.forget(part)
            return Overrides()
        patcher = self.patcher(part)
        tensors = patcher.overrides(uses, extra)
        return Overrides(tensors, patcher.resized, patcher.inline)

    def forget(self, part: str) -> None:
        """Drop the part's patched tensors kept for the next switch."""
        if part in self.patchers:
            self.patchers[part].forget()

    def set(self, loras: Sequence[LoraUse] = (), embeddings: Sequence[Embedding] = ()) -> None:
        """Have the UNet and text encoder carry these LoRAs (and the text encoder these
        embeddings' vectors) from their next load. Every layer is checked against the model
        first: an InputError (a LoRA for another base model, an embedding of another width)
        leaves everything as it was."""
        loras, embeddings = tuple(loras), tuple(embeddings)
        plan = {}
        for part in _PATCHED_PARTS:
            uses = tuple(u for u in loras if u.scale(part) != 0.0)
            extra = embeddings if part == parts.TEXT_ENCODER.name else ()
            key = tuple((u.lora, u.scale(part)) for u in uses) + tuple(("embedding", e) for e in extra)
            if key and key != self.wanted(part):
                self.patcher(part).check(uses, extra)
            plan[part] = ((uses, extra), key)
        for part, (args, key) in plan.items():
            self._args[part], self._wanted[part] = args, key
        self.loras, self.embeddings = loras, embeddings
        ids: dict[tuple[int, ...], list[int]] = {}
        offset = self.patcher(parts.TEXT_ENCODER.name).table_rows if embeddings else 0
        for e in embeddings:
            ids[tuple(self.tokenizer.encode(e.name))] = list(range(offset, offset + len(e.vectors)))
            offset += len(e.vectors)
        self.embedding_ids = ids

    def read(self, path: Path, reader):
        """A LoRA or embedding file read once (again when it changes on disk); the last
        KEEP_FILES read are kept, so a server cycling through many does not keep them all."""
        path = path.resolve()
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        kept = self._files.pop(path, None)
        if kept is None or kept[0] != stamp:
            kept = (stamp, reader(path))
        self._files[path] = kept
        for old in list(self._files)[: max(len(self._files) - KEEP_FILES, 0)]:
            del self._files[old]
        return kept[1]

    def lora_use(self, spec, scale: float | None = None, *, paths: bool = True) -> LoraUse:
        """A LoRA at a scale from a path, a name in `lora_dir`, a (path or name, scale) pair or
        a LoraUse; InputError when the file is missing or not a LoRA. `paths` False takes
        names in `lora_dir` only (a prompt's tags)."""
        if isinstance(spec, LoraUse):
            return spec
        if isinstance(spec, (tuple, list)):
            if len(spec) != 2:
                raise InputError(f"a LoRA is a path or a (path, scale) pair, got {str(spec)[:60]}")
            spec, scale = spec
        name = str(spec)
        scale = check_scale(name, 1.0 if scale is None else scale)
        lora = self.read(locate_lora(name, self.lora_dir, paths), read_lora)
        return LoraUse(lora, scale, scale)

    def used_embeddings(self, texts: Sequence[str]) -> list[Embedding]:
        """The embeddings in `embeddings_dir` whose names the texts mention (AUTOMATIC1111's
        rule: the name's tokens appear among the prompt's), in name order."""
        files = find_files(self.embeddings_dir, EMBEDDING_SUFFIXES)
        if not files:
            return []
        runs = [self.tokenizer.encode(text) for t in texts
                for text, _ in prompts.parse_attention(prompts.extract_networks(t)[0])]
        used = []
        for name, path in sorted(files.items()):
            wanted = self.tokenizer.encode(name)
            n = len(wanted)
            if n and any(run[i:i + n] == wanted for run in runs for i in range(len(run) - n + 1)):
                used.append(self.read(path, read_embedding))
        return used

    def prepare(self, prompt: str, negative_prompt: str = "", loras: Sequence = ()) -> list[LoraUse]:
        """Set the LoRAs of `loras` and of the prompts' `<lora:NAME:...>` tags (names in
        `lora_dir` only), and the embeddings the prompts name; returns the LoRAs, `loras`'
        first. Pipeline.generate calls it for every generation."""
        uses = [self.lora_use(spec) for spec in loras]
        for text in (prompt, negative_prompt):
            for tag in prompts.extract_networks(text)[1]:
                text_encoder_scale, unet_scale = prompts.lora_scales(tag)
                use = self.lora_use(tag.name, text_encoder_scale, paths=False)
                uses.append(LoraUse(use.lora, unet_scale, text_encoder_scale))
        self.set(uses, self.used_embeddings([prompt, negative_prompt]))
        return uses
