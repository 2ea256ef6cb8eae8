"""Saving and describing ONNX files: external data above protobuf's 2 GB limit, one shared weights file for the
UNet variants, specs for the manifest."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .. import manifest as mf
from ..manifest import GraphSpec, TensorSpec, sha256_file

PROTOBUF_LIMIT = 2 * 1024**3 - 1
EXTERNAL_DATA = "model.onnx_data"
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def parameter_count(model: onnx.ModelProto) -> int:
    """Float weights held by the graph (initializers and constant nodes with more than one value)."""
    total = 0
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        if init.data_type in FLOAT_TYPES and n > 1:
            total += n
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in FLOAT_TYPES:
                    n = int(np.prod(attr.t.dims)) if attr.t.dims else 1
                    total += n if n > 1 else 0
    return total


def weight_bytes(model: onnx.ModelProto) -> int:
    from onnx.external_data_helper import uses_external_data

    size = 0
    for init in model.graph.initializer:
        if uses_external_data(init):
            size += int(np.prod(init.dims)) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        else:
            size += init.ByteSize()
    return size


def finalize(raw: Path, folder: Path, force_external: bool = False) -> int:
    """Move an exported ``raw`` ONNX file into ``folder/model.onnx`` (one external-data file when it
    would not fit in one protobuf) and check it; returns the parameter count.

    torch writes one file per tensor for models above 2 GB; consolidating them keeps a graph to at
    most two files, which is what TensorRT's parser, ORT and optimum expect.
    """
    model = onnx.load(str(raw), load_external_data=True)
    params = parameter_count(model)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    if force_external or weight_bytes(model) > PROTOBUF_LIMIT - 64 * 1024**2:
        onnx.save_model(
            model,
            str(target),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(target))
    del model
    onnx.checker.check_model(str(target))
    return params


class SharedWeights:
    """Several graphs in one folder with one external-data file in which every weight is written once.

    The UNet variants of an export hold nearly the same weights (a post-gate graph lacks only what it
    replays). Initializers of at least ``threshold`` bytes (all but scalars and short shape constants) are keyed
    by their content (dtype, shape, bytes), so an identical tensor is stored once whatever its name in each
    graph; offsets of tensors of a page or more are page-aligned, so a runtime can memory-map the file.
    ``written`` and ``referenced`` count the bytes, for the export's report.
    """

    def __init__(self, folder: Path, name: str = EXTERNAL_DATA, threshold: int = 64, align: int = 4096) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.name, self.threshold, self.align = folder, name, threshold, align
        self._file = open(folder / name, "wb")  # noqa: SIM115 (closed by close())
        self._offsets: dict[str, int] = {}
        self.written = self.referenced = 0

    def __enter__(self) -> SharedWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _put(self, data: bytes, key: str) -> int:
        if key not in self._offsets:
            pos = self._file.tell()
            pad = -pos % (self.align if len(data) >= self.align else 64)  # pages for what may be mapped
            self._file.write(b"\0" * pad)
            self._file.write(data)
            self._offsets[key] = pos + pad
            self.written += len(data)
        self.referenced += len(data)
        return self._offsets[key]

    def save(self, raw: Path, filename: str, rename: bool = False) -> int:
        """Write the graph at ``raw`` as ``folder/filename`` with its large weights in the shared file; check it
        and return its parameter count. One graph is in memory at a time. ``rename`` names every stored
        weight after its content (``w_<sha256>``), so graphs can also share them by name (ORT's
        ``SessionOptions.add_initializer``)."""
        from onnx import numpy_helper

        model = onnx.load(str(raw), load_external_data=True)
        params = parameter_count(model)
        names: dict[str, str] = {}
        for init in model.graph.initializer:
            array = numpy_helper.to_array(init)
            data = array.tobytes()
            if len(data) < self.threshold:
                continue
            key = hashlib.sha256(f"{array.dtype}{array.shape}".encode() + data).hexdigest()
            offset = self._put(data, key)
            if rename:
                names[init.name] = init.name = f"w_{key[:32]}"
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                init.ClearField(field)
            del init.external_data[:]
            for k, v in (("location", self.name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = init.external_data.add()
                entry.key, entry.value = k, v
            init.data_location = TensorProto.EXTERNAL
        if names:
            _rename_inputs(model.graph, names)
            unique = {init.name: init for init in model.graph.initializer}  # identical tensors: one initializer
            del model.graph.initializer[:]
            model.graph.initializer.extend(unique.values())
        self._file.flush()
        target = self.folder / filename
        onnx.save_model(model, str(target))
        del model
        onnx.checker.check_model(str(target))
        return params


def _rename_inputs(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Point every node input (subgraphs included) at the initializers' new names."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = names.get(name, name)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _rename_inputs(sub, names)


def external_files(model_file: Path) -> list[Path]:
    """The external-data files a graph reads (none when its weights are inside the protobuf)."""
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(model_file), load_external_data=False)
    names: dict[str, None] = {}
    for init in model.graph.initializer:
        if uses_external_data(init):
            names.update({e.value: None for e in init.external_data if e.key == "location"})
    return [model_file.parent / name for name in names]


def graph_files(model_file: Path, root: Path) -> dict[str, str]:
    """sha256 of a graph file and the external data it reads, keyed by path relative to the export root."""
    files = [model_file, *external_files(model_file)]
    return {f.relative_to(root).as_posix(): sha256_file(f) for f in files}


def _specs(values: list[onnx.ValueInfoProto]) -> list[TensorSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        shape: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        specs.append(TensorSpec(v.name, dtype, shape))
    return specs


def describe(model_file: Path, root: Path, params: int) -> GraphSpec:
    model = onnx.load(str(model_file), load_external_data=False)
    return GraphSpec(
        file=model_file.relative_to(root).as_posix(),
        files=graph_files(model_file, root),
        inputs=_specs(list(model.graph.input)),
        outputs=_specs(list(model.graph.output)),
        parameters=params,
    )


class ScratchDir:
    """A temp folder inside the export's temp tree, removed on exit (torch may spill many files)."""

    def __init__(self, root: Path) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=".scratch-", dir=root))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def random_feeds(manifest: mf.Manifest, key: str, lat_h: int, lat_w: int, batch: int = 1) -> dict[str, np.ndarray]:
    """Seeded inputs for one graph at one latent size: to time or compare graphs without a pipeline."""
    rng = np.random.default_rng(0)
    dims: dict[str, int] = {mf.BATCH: batch, "batch_size": batch, mf.LATENT_H: lat_h, mf.LATENT_W: lat_w}
    dims[mf.CFG_BATCH] = 2 * batch
    dims.update({mf.hw_dim(c.level): c.tokens(lat_h, lat_w) for c in manifest.cache_layers})
    out = {}
    for t in manifest.graphs[key].inputs:
        shape = [dims[d] if isinstance(d, str) else d for d in t.shape]
        out[t.name] = rng.standard_normal(shape).astype(t.dtype)
    if mf.TIMESTEP in out:
        out[mf.TIMESTEP] = np.array([500.0], np.float32)
    if mf.GUIDANCE_SCALE in out:
        out[mf.GUIDANCE_SCALE] = np.array([7.5], np.float32)
    return out


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want|| (inf when the shapes differ): how far one graph's output is from a reference's."""
    want = want.astype(np.float32)
    if got.shape != want.shape:
        return float("inf")
    return float(np.linalg.norm(got.astype(np.float32) - want) / max(float(np.linalg.norm(want)), 1e-12))
