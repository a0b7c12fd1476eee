"""A lean GGUF reader: metadata and tensor index parsed with struct from one buffered read of the header.

gguf.GGUFReader builds a numpy view for every part of every field (a 49k-token vocabulary and its merges are ~150k
memmap views: seconds and ~150 MB); this reads the same header into plain Python values in a fraction of that.
Tensor data is not read here: `data_offset` / `n_bytes` locate it (gguf_packed reads packed blocks straight into
place), and `data` maps it lazily (numpy memmap, read-only) for the float dequantizers.

Layout (GGUF v2/v3, little-endian): magic, version u32, tensor count u64, kv count u64; kv pairs (key string, type
u32, value); tensor infos (name, n_dims u32, dims u64 each innermost first, type u32, offset u64); tensor data from
the next multiple of `general.alignment` (default 32).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LMStackError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Buf:
    """Reads from a file through a growing buffer (the header is read in 4 MiB steps, never the tensor data)."""

    def __init__(self, f):
        self.f, self.data, self.pos = f, b"", 0

    def take(self, n: int) -> memoryview:
        while self.pos + n > len(self.data):
            more = self.f.read(max(4 << 20, n))
            if not more:
                raise LMStackError("the GGUF header is cut short (truncated file)")
            self.data = self.data[self.pos:] + more
            self.base = getattr(self, "base", 0) + self.pos
            self.pos = 0
        out = memoryview(self.data)[self.pos:self.pos + n]
        self.pos += n
        return out

    def tell(self) -> int:
        return getattr(self, "base", 0) + self.pos

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.unpack("<Q"))).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.unpack("<I"), self.unpack("<Q")
            if itype in _SCALARS and itype != 7:
                fmt = _SCALARS[itype]
                return list(struct.unpack(f"<{n}{fmt[1]}", self.take(n * struct.calcsize(fmt))))
            return [self.value(itype) for _ in range(n)]
        raise LMStackError(f"unknown GGUF value type {vtype}; the file is corrupt or from a newer GGUF version")


@dataclass
class Field:
    value: object

    def contents(self):
        return self.value

    @property
    def data(self):  # gguf.ReaderField compatibility: the array's items
        return self.value if isinstance(self.value, list) else [self.value]


@dataclass
class Tensor:
    name: str
    shape: list[int]            # ggml order (innermost first), like gguf.ReaderTensor.shape
    tensor_type: object         # gguf.GGMLQuantizationType
    data_offset: int            # absolute, in the file
    n_bytes: int
    path: Path = field(repr=False)

    @property
    def data(self) -> np.ndarray:
        """The raw tensor as gguf.GGUFReader shapes it: float types as values (torch layout), quantized types as
        uint8 rows of blocks."""
        import gguf
        qt = self.tensor_type
        dims = list(reversed(self.shape))
        if qt.name in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32"):
            dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I8": np.int8,
                     "I16": np.int16, "I32": np.int32}[qt.name]
            return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_offset, shape=tuple(dims))
        block, size = gguf.GGML_QUANT_SIZES[qt]
        dims[-1] = dims[-1] // block * size
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_offset, shape=tuple(dims))


class LeanReader:
    """fields {key: Field} and tensors [Tensor] of a GGUF file (the parts of gguf.GGUFReader lmstack uses)."""

    def __init__(self, path: str | Path):
        import gguf
        self.path = Path(path)
        with open(self.path, "rb") as f:
            b = _Buf(f)
            if bytes(b.take(4)) != b"GGUF":
                raise LMStackError(f"{path} is not a GGUF file")
            version = b.unpack("<I")
            if version not in (2, 3):
                raise LMStackError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
            n_tensors, n_kv = b.unpack("<Q"), b.unpack("<Q")
            self.fields: dict[str, Field] = {}
            for _ in range(n_kv):
                key = b.string()
                self.fields[key] = Field(b.value(b.unpack("<I")))
            infos = []
            for _ in range(n_tensors):
                name = b.string()
                dims = [b.unpack("<Q") for _ in range(b.unpack("<I"))]
                infos.append((name, dims, b.unpack("<I"), b.unpack("<Q")))
            align = int(self.fields.get("general.alignment", Field(32)).value)
            start = -(-b.tell() // align) * align
        size = self.path.stat().st_size
        self.tensors: list[Tensor] = []
        for name, dims, t, off in infos:
            try:
                qt = gguf.GGMLQuantizationType(t)
            except ValueError:
                raise LMStackError(f"{path}: tensor {name} has unknown ggml type {t}") from None
            block, tsize = gguf.GGML_QUANT_SIZES[qt]
            n = int(np.prod(dims)) // block * tsize
            if start + off + n > size:
                raise LMStackError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
            self.tensors.append(Tensor(name, dims, qt, start + off, n, self.path))

    def get_tensor(self, i: int) -> Tensor:
        return self.tensors[i]
