"""The safetensors file format, read by byte range and written as a stream.

A safetensors file is an 8-byte little-endian header length N, N bytes of
JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, plus an
optional ``"__metadata__"``), then the raw little-endian data, offsets
counted from the end of the header.

Why not the ``safetensors`` package: it maps the file into memory, and the
pages of a mapped file that a load touches count in the process's resident
memory until it is unmapped, so loading a 1.7 GB expert tensor through it
shows ~2x the tensor in the process.  Here one expert of a tensor is read
with ``readinto`` straight into the place it takes in the output.  Every
error names the file (and the tensor).  ``tests/test_checkpoints.py`` reads
files written by the ``safetensors`` package and the other way round.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

# safetensors dtype names -> NumPy dtypes (the formats a checkpoint of an
# MoE layer holds; a file with others still opens, reading such a tensor fails).
DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "U32": np.dtype(np.uint32), "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in DTYPES.items()}
# A header larger than this is not a safetensors header (the format's own
# reader refuses headers past 100 MB).
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as expected; the message names the file."""


class TensorInfo:
    __slots__ = ("name", "dtype_name", "shape", "begin", "end")

    def __init__(self, name, dtype_name, shape, begin, end):
        self.name, self.dtype_name, self.shape, self.begin, self.end = name, dtype_name, shape, begin, end

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.dtype_name]


class SafetensorsFile:
    """The header of one safetensors file, checked against the file's size;
    tensors (or one index of their first axis) read on demand."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file ({size} bytes, "
                                          "shorter than its 8-byte header length)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise CheckpointError(f"{self.path}: truncated or not a safetensors file "
                                          f"(header of {n} bytes, file of {size})")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        data_bytes = size - self.data_start
        for name, entry in header.items():
            try:
                dtype_name = entry["dtype"]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(v) for v in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}: "
                                      f"{entry!r}") from None
            if end > data_bytes:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {name!r} ends at data byte {end}, the file "
                    f"holds {data_bytes} bytes of data")
            if dtype_name in DTYPES and end - begin != int(np.prod(shape)) * DTYPES[dtype_name].itemsize:
                raise CheckpointError(f"{self.path}: tensor {name!r}: {end - begin} bytes do not "
                                      f"hold {dtype_name} {list(shape)}")
            self.tensors[name] = TensorInfo(name, dtype_name, shape, begin, end)

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def keys(self):
        return self.tensors.keys()

    def info(self, name) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None

    def read(self, name, index: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Tensor ``name``, or its ``[index]`` along the first axis, read into
        ``out`` (a C-contiguous array of that many bytes, any dtype) or a new
        array."""
        t = self.info(name)
        if t.dtype_name not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {t.dtype_name}, "
                                  f"which this reader does not take ({sorted(DTYPES)})")
        shape, begin, nbytes = t.shape, t.begin, t.end - t.begin
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise CheckpointError(f"{self.path}: tensor {name!r} {list(shape)} has no index {index}")
            shape = shape[1:]
            nbytes //= t.shape[0]
            begin += index * nbytes
        if out is None:
            out = np.empty(shape, t.dtype)
        elif out.nbytes != nbytes or not out.flags.c_contiguous:
            raise ValueError(f"out: expected a C-contiguous array of {nbytes} bytes for {name!r}"
                             f"{'' if index is None else f'[{index}]'}, got {out.nbytes} bytes")
        view = memoryview(out.reshape(-1).view(np.uint8))
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.data_start + begin)
                got = 0
                while got < nbytes:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except OSError as e:
            raise CheckpointError(f"{self.path}: reading tensor {name!r}: {e}") from None
        if got != nbytes:
            raise CheckpointError(f"{self.path}: truncated: tensor {name!r} needs {nbytes} bytes "
                                  f"at offset {self.data_start + begin}, read {got}")
        if out.dtype != t.dtype:
            return out
        return out.reshape(shape)


class _Source:
    """One tensor to write: dtype and shape, and its bytes as an iterable of
    arrays (chunks in order, e.g. one per index of the first axis)."""

    def __init__(self, dtype, shape, chunks: Iterable[np.ndarray]):
        self.dtype, self.shape, self.chunks = np.dtype(dtype), tuple(shape), chunks


def streamed(dtype, shape, chunks: Iterable[np.ndarray]) -> _Source:
    """A tensor for ``write`` given as chunks (never whole in memory)."""
    return _Source(dtype, shape, chunks)


def write(path, tensors: Mapping[str, object], metadata: Mapping[str, str] | None = None) -> int:
    """Write a safetensors file; each value an array or a ``streamed(...)``
    tensor.  Returns the bytes of tensor data written."""
    entries, offset = {}, 0
    sources = {}
    for name, t in tensors.items():
        src = t if isinstance(t, _Source) else _Source(np.asarray(t).dtype, np.shape(t), [np.asarray(t)])
        if src.dtype not in _NAMES:
            raise ValueError(f"tensors[{name!r}]: dtype {src.dtype} has no safetensors name")
        nbytes = int(np.prod(src.shape)) * src.dtype.itemsize
        entries[name] = {"dtype": _NAMES[src.dtype], "shape": list(src.shape),
                         "data_offsets": [offset, offset + nbytes]}
        sources[name] = (src, nbytes)
        offset += nbytes
    if metadata:
        entries["__metadata__"] = dict(metadata)
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # data 8-byte aligned, as the format's writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, (src, nbytes) in sources.items():
            written = 0
            for chunk in src.chunks:
                chunk = np.ascontiguousarray(chunk, src.dtype)
                f.write(memoryview(chunk.reshape(-1).view(np.uint8)))
                written += chunk.nbytes
            if written != nbytes:
                raise ValueError(f"tensors[{name!r}]: chunks gave {written} bytes, "
                                 f"{src.dtype} {list(src.shape)} needs {nbytes}")
    return offset
