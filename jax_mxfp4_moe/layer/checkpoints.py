"""Expert weights and routers from model checkpoints (gpt-oss's MXFP4 safetensors).

A checkpoint is what a model repository holds: a directory with
``model.safetensors.index.json`` (its ``weight_map`` names the shard of each
tensor; gpt-oss ships this way), a directory with ``*.safetensors`` files, one
file, a list of files, or a mapping name -> array.

Loading keeps host memory bounded: the output arrays are allocated once, in
the requested layout, and filled one expert at a time (each expert read from
its file straight into its place, or, for a backend layout, read, re-laid out
alone and copied in), so the peak is the layer in its layout plus one expert.
On CPU the filled arrays become jax arrays without a copy (they are
allocated page-aligned, which lets XLA:CPU alias them); on a GPU each is
copied to the device and freed.  ``examples/gpt_oss_moe.py --synthetic
gpt-oss-120b`` measures the peak for a gpt-oss-120b-sized layer.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Callable, Mapping

import jax
import numpy as np

from jax_mxfp4_moe.layer import layouts
from jax_mxfp4_moe.layer.safetensors_io import CheckpointError, SafetensorsFile
from jax_mxfp4_moe.layer.weights import MoEWeights
from jax_mxfp4_moe.numerics import formats

GPT_OSS_PREFIX = "model.layers.{layer}.mlp.experts."
GPT_OSS_ROUTER = "model.layers.{layer}.mlp.router."
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj_blocks$")


# ---------------------------------------------------------------------------
# A checkpoint: tensor name -> the file that holds it
# ---------------------------------------------------------------------------

class _Arrays:
    """A mapping name -> array behind SafetensorsFile's read interface."""

    path = "<tensors>"

    def __init__(self, tensors: Mapping):
        self.tensors = tensors

    def __contains__(self, name):
        return name in self.tensors

    def keys(self):
        return self.tensors.keys()

    def shape_dtype(self, name):
        a = self.tensors[name]
        return tuple(np.shape(a)), np.dtype(a.dtype)

    def read(self, name, index=None, out=None):
        a = np.asarray(self.tensors[name])
        a = a if index is None else a[index]
        if out is None:
            return a
        out.reshape(-1).view(np.uint8)[:] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        return out


class Checkpoint:
    """The tensors of a checkpoint, opened lazily, file by file."""

    def __init__(self, source):
        self._files: dict[str, object] = {}
        self._where: dict[str, str] = {}
        if isinstance(source, Mapping):
            arrays = _Arrays(source)
            self.description = "the given tensors"
            self._files[arrays.path] = arrays
            self._where = {name: arrays.path for name in source}
            return
        if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
            path = os.fsdecode(os.fspath(source))
            if os.path.isdir(path):
                self._open_directory(path)
                return
            paths = [path]
        else:
            paths = [os.fsdecode(os.fspath(p)) for p in source]
        self.description = paths[0] if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"
        for p in paths:
            for name in self._file(p).keys():
                self._where[name] = p

    def _open_directory(self, path):
        index = os.path.join(path, INDEX_FILE)
        self.description = path
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            self.description = index
            self._where = {name: os.path.join(path, f) for name, f in weight_map.items()}
            return
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no {INDEX_FILE} and no *.safetensors files")
        for f in files:
            p = os.path.join(path, f)
            for name in self._file(p).keys():
                self._where[name] = p

    def _file(self, path):
        if path not in self._files:
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: missing (named by {self.description})")
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    def __contains__(self, name) -> bool:
        return name in self._where

    def keys(self):
        return self._where.keys()

    def where(self, name) -> str:
        return self._where[name]

    def shape_dtype(self, name):
        f = self._file(self._where[name])
        if isinstance(f, _Arrays):
            return f.shape_dtype(name)
        t = f.info(name)
        if name not in f:
            raise CheckpointError(f"{f.path}: has no tensor {name!r} (the index says it does)")
        return t.shape, t.dtype

    def read(self, name, index=None, out=None):
        f = self._file(self._where[name])
        if not isinstance(f, _Arrays) and name not in f:
            raise CheckpointError(f"{f.path}: has no tensor {name!r} ({self.description} says it does)")
        return f.read(name, index, out)

    def gpt_oss_layers(self) -> list[int]:
        """The layers that have gpt-oss MoE experts."""
        return sorted(int(m.group(1)) for m in map(_LAYER_RE.match, self._where) if m)

    def require(self, name, layer):
        if name not in self:
            raise CheckpointError(
                f"{self.description}: no tensor {name!r}: layer {layer} has no gpt-oss MoE block "
                f"here; the layers with one are {_ranges(self.gpt_oss_layers())}")


def _ranges(values) -> str:
    if not values:
        return "none"
    out, start = [], values[0]
    for a, b in zip(values, values[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}..{a}")
            start = b
    return ", ".join(out)


def read_config(path) -> dict:
    """The model's ``config.json`` beside the checkpoint ({} when there is none)."""
    path = os.fspath(path) if not isinstance(path, Mapping) else None
    if path is None:
        return {}
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    cfg = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(cfg):
        return {}
    try:
        with open(cfg) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg}: unreadable ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------
# gpt-oss
# ---------------------------------------------------------------------------

def _aligned_empty(shape, dtype, align: int = 4096) -> np.ndarray:
    """An uninitialised C array whose data starts on an ``align`` boundary:
    XLA:CPU then takes it as a device buffer without a copy."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class _Progress:
    def __init__(self, progress, layer, total_bytes, experts):
        self.fn, self.layer, self.total, self.experts = progress, layer, total_bytes, experts
        self.t0 = time.perf_counter()
        self.tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.next_pct = 25

    def __call__(self, expert):
        if not self.fn:
            return
        done = self.total * expert // self.experts
        if callable(self.fn):
            self.fn(done, self.total)
            return
        pct = 100 * expert // self.experts
        if not self.tty and pct < self.next_pct and expert < self.experts:
            return
        self.next_pct = pct - pct % 25 + 25
        msg = (f"from_gpt_oss: layer {self.layer}: expert {expert}/{self.experts}, "
               f"{done / 1e9:.2f}/{self.total / 1e9:.2f} GB, {time.perf_counter() - self.t0:.1f} s")
        end = "\r" if self.tty and expert < self.experts else "\n"
        print(msg, end=end, file=sys.stderr, flush=True)


def _check(ckpt, name, shape, dtypes, layer):
    got_shape, got_dtype = ckpt.shape_dtype(name)
    if tuple(got_shape) != tuple(shape) or (dtypes and np.dtype(got_dtype) not in dtypes):
        want = "/".join(str(np.dtype(d)) for d in dtypes) if dtypes else "float"
        raise CheckpointError(f"{ckpt.where(name)}: tensor {name!r} of layer {layer}: expected "
                              f"{want} {list(shape)}, got {np.dtype(got_dtype)} {list(got_shape)}")


_FLOATS = (np.float32, np.float16, "bfloat16")


def from_gpt_oss(checkpoint, layer: int, *, layout: str = layouts.CANONICAL,
                 progress: bool | Callable | None = None, device=None) -> MoEWeights:
    """The MoE experts of one gpt-oss layer as MoEWeights (interleaved gate/up).

    ``checkpoint``: a checkpoint directory (through ``model.safetensors.index.json``
    when it has one), a safetensors file, a list of them, or a mapping name ->
    array.  gpt-oss stores per layer ``gate_up_proj_blocks [E, 2I, H/32, 16]``
    u8 (fp4 pairs, low nibble first), ``gate_up_proj_scales [E, 2I, H/32]`` u8
    (E8M0), ``gate_up_proj_bias [E, 2I]`` (gate and up rows interleaved), and
    the same for ``down_proj`` ([E, H, I/32, 16], [E, H, I/32], [E, H]).
    layout: the weights' layout ("canonical", "sm90", "gfx950"), built one
    expert at a time.  progress: True prints progress to stderr; a callable
    gets (bytes done, bytes total).  device: where the arrays go
    (``jax.device_put``'s second argument; default device when None).
    Errors (``CheckpointError``, a ValueError) name the file, the tensor and,
    for a missing layer, the layers the checkpoint has."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    prefix = GPT_OSS_PREFIX.format(layer=layer)
    names = {n: prefix + n for n in ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
                                     "down_proj_blocks", "down_proj_scales", "down_proj_bias")}
    for key in names.values():
        ckpt.require(key, layer)
    shape1, _ = ckpt.shape_dtype(names["gate_up_proj_blocks"])
    if len(shape1) != 4 or shape1[-1] != formats.MX_BLOCK // 2:
        raise CheckpointError(f"{ckpt.where(names['gate_up_proj_blocks'])}: tensor "
                              f"{names['gate_up_proj_blocks']!r}: expected uint8 [E, 2I, H/32, 16], "
                              f"got {list(shape1)}")
    E, two_i, hb, _ = shape1
    H, I = hb * formats.MX_BLOCK, two_i // 2
    u8 = (np.uint8,)
    _check(ckpt, names["gate_up_proj_blocks"], (E, 2 * I, H // 32, 16), u8, layer)
    _check(ckpt, names["gate_up_proj_scales"], (E, 2 * I, H // 32), u8, layer)
    _check(ckpt, names["gate_up_proj_bias"], (E, 2 * I), _FLOATS, layer)
    _check(ckpt, names["down_proj_blocks"], (E, H, I // 32, 16), u8, layer)
    _check(ckpt, names["down_proj_scales"], (E, H, I // 32), u8, layer)
    _check(ckpt, names["down_proj_bias"], (E, H), _FLOATS, layer)
    dims = dict(num_experts=E, hidden=H, intermediate=I)
    source = {"w1": names["gate_up_proj_blocks"], "w1_scale": names["gate_up_proj_scales"],
              "w2": names["down_proj_blocks"], "w2_scale": names["down_proj_scales"],
              "b1": names["gate_up_proj_bias"], "b2": names["down_proj_bias"]}

    def read_expert(e, out, slot):
        """Expert e's canonical arrays, read into ``out[name][slot]``."""
        for n, key in source.items():
            if n in ("b1", "b2"):
                out[n][slot] = ckpt.read(key, e).astype(np.float32)
            else:
                ckpt.read(key, e, out[n][slot])
        return out

    from jax_mxfp4_moe.layer.weights import canonical_shapes
    canon_shapes = canonical_shapes(E, H, I)
    target = layouts.get(layout)
    one_expert = {n: ((1, *s[1:]), np.float32 if d is None else d) for n, (s, d) in canon_shapes.items()}
    if layout == layouts.CANONICAL:
        shapes = {n: ((E, *s[1:]), d) for n, (s, d) in one_expert.items()}
        pack = None
    else:
        # One compiled program per layer shape, fed from one aligned staging
        # expert that XLA:CPU takes without a copy: the load's transients are
        # that expert and the program's output (the layer + ~2 experts; a
        # fresh input per expert measured up to +4, tests/test_checkpoints.py).
        pack_one = jax.jit(lambda arrays: target.pack(arrays, num_experts=1, hidden=H, intermediate=I))
        stage = {n: _aligned_empty(s, d) for n, (s, d) in one_expert.items()}

        def pack(arrays):
            return {n: np.asarray(a) for n, a in pack_one(arrays).items()}
        first = pack(read_expert(0, stage, 0))
        shapes = {n: ((E, *a.shape[1:]), a.dtype) for n, a in first.items()}
        del first
    out = {n: _aligned_empty(s, d) for n, (s, d) in shapes.items()}
    total = sum(a.nbytes for a in out.values())
    report = _Progress(progress, layer, total, E)
    report(0)
    scale_max = 0
    for e in range(E):
        if pack is None:
            read_expert(e, out, e)
            scale_max = max(scale_max, int(out["w1_scale"][e].max()), int(out["w2_scale"][e].max()))
        else:
            read_expert(e, stage, 0)
            scale_max = max(scale_max, int(stage["w1_scale"].max()), int(stage["w2_scale"].max()))
            for n, a in pack(stage).items():
                out[n][e] = a[0]
        report(e + 1)
    arrays = {}
    for n in list(out):
        arrays[n] = jax.device_put(out.pop(n), device)  # CPU: aliases the aligned buffer
    w = MoEWeights(**arrays, **dims, gate_up="interleaved", layout=layout, scale_max=scale_max)
    w.validate()
    return w


def gpt_oss_router(checkpoint, layer: int):
    """(weight [E, H] f32, bias [E] f32) of gpt-oss's router for ``layer``
    (``model.layers.{layer}.mlp.router.weight`` / ``.bias``, stored bf16)."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    prefix = GPT_OSS_ROUTER.format(layer=layer)
    out = []
    for name in ("weight", "bias"):
        key = prefix + name
        ckpt.require(key, layer)
        out.append(np.asarray(ckpt.read(key), np.float32))
    weight, bias = out
    if weight.ndim != 2 or bias.shape != weight.shape[:1]:
        raise CheckpointError(f"{ckpt.where(prefix + 'weight')}: router of layer {layer}: expected "
                              f"weight [E, H] and bias [E], got {list(weight.shape)} and {list(bias.shape)}")
    return weight, bias
