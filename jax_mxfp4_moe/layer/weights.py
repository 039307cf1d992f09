"""MoEWeights: the expert weights of one MoE layer, and how to build them.

Canonical arrays (MXFP4, see formats.py):
  w1 [E, 2I, H/2] u8, w1_scale [E, 2I, H/32] u8   gate + up projections
  w2 [E, H, I/2] u8,  w2_scale [E, H, I/32] u8    down projection
  b1 [E, 2I] f32, b2 [E, H] f32                   optional biases
``gate_up`` says where gate and up sit in W1's 2I rows; ``layout`` names the
memory layout of the arrays (layouts.py); the dims stay the logical ones.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_mxfp4_moe.numerics import formats
from jax_mxfp4_moe.layer import layouts

GATE_UP_LAYOUTS = ("separated", "interleaved")
_ARRAYS = ("w1", "w1_scale", "w2", "w2_scale", "b1", "b2")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEWeights:
    """The MXFP4 expert weights of one MoE layer: a JAX pytree.

    Leaves (canonical layout; a backend layout keeps the names and stores the
    same bytes re-arranged, ``layouts.py``):
      w1 [E, 2I, H/2] u8, w1_scale [E, 2I, H/32] u8  gate + up rows, fp4 pairs
                                                     (low nibble first) and E8M0
      w2 [E, H, I/2] u8,  w2_scale [E, H, I/32] u8    down projection
      b1 [E, 2I] f32, b2 [E, H] f32                   optional biases (None: absent)
    Static fields (part of the tree structure, so a jit retraces when they
    change): ``num_experts`` E, ``hidden`` H, ``intermediate`` I (the logical
    dims, whatever the layout pads), ``gate_up`` ("separated": gate rows
    [0, I), up rows [I, 2I); "interleaved": row 2i gate i, row 2i+1 up i),
    ``layout`` ("canonical", "sm90", "gfx950") and ``scale_max``.

    Build them with ``prepare_weights`` (float -> MXFP4), ``from_mxfp4``
    (already-quantised bytes) or ``from_gpt_oss`` (a checkpoint); lay them out
    for a GPU once with ``to_layout``.  The repr is one line: dims, layout,
    dtypes and bytes, never the arrays.
    """

    w1: Any
    w1_scale: Any
    w2: Any
    w2_scale: Any
    b1: Optional[Any] = None
    b2: Optional[Any] = None
    num_experts: int = dataclasses.field(default=0, metadata=dict(static=True))
    hidden: int = dataclasses.field(default=0, metadata=dict(static=True))
    intermediate: int = dataclasses.field(default=0, metadata=dict(static=True))
    gate_up: str = dataclasses.field(default="separated", metadata=dict(static=True))
    layout: str = dataclasses.field(default=layouts.CANONICAL, metadata=dict(static=True))
    # The largest E8M0 byte of w1_scale and w2_scale, when the arrays were
    # concrete at construction (None if unknown): lets a backend fold a
    # constant factor into the scales where it stays in range (backends/cuda.py).
    scale_max: Optional[int] = dataclasses.field(default=None, metadata=dict(static=True))

    def __repr__(self) -> str:
        arrays = self.arrays()
        biases = [n for n in ("b1", "b2") if n in arrays]
        bias = (f"{'/'.join(biases)} {_dtype_name(arrays[biases[0]])}" if biases else "no bias")
        return (f"MoEWeights(E={self.num_experts}, H={self.hidden}, I={self.intermediate}, "
                f"gate_up={self.gate_up!r}, layout={self.layout!r}, "
                f"w1/w2 {_dtype_name(self.w1)} + scales {_dtype_name(self.w1_scale)}, {bias}, "
                f"{_format_bytes(self.nbytes)})")

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays as stored (a layout's padding included)."""
        return sum(int(np.prod(a.shape)) * np.dtype(_dtype_name(a)).itemsize
                   for a in self.arrays().values())

    @property
    def has_bias(self) -> bool:
        return self.b1 is not None or self.b2 is not None

    def arrays(self) -> dict:
        return {n: getattr(self, n) for n in _ARRAYS if getattr(self, n) is not None}

    def _dims(self) -> dict:
        return dict(num_experts=self.num_experts, hidden=self.hidden, intermediate=self.intermediate)

    def with_scale_max(self) -> "MoEWeights":
        """The same weights with scale_max read from the scale arrays (None
        when they are traced)."""
        return dataclasses.replace(self, scale_max=_max_byte(self.w1_scale, self.w2_scale))

    def canonical(self) -> "MoEWeights":
        """The same weights in the canonical layout (traceable)."""
        if self.layout == layouts.CANONICAL:
            return self
        arrays = layouts.get(self.layout).unpack(self.arrays(), **self._dims())
        return dataclasses.replace(self, layout=layouts.CANONICAL, **_with_missing(arrays))

    def to_layout(self, name: str) -> "MoEWeights":
        """The same weights re-laid out for a backend (traceable)."""
        if name == self.layout:
            return self
        canon = self.canonical()
        arrays = layouts.get(name).pack(canon.arrays(), **self._dims())
        return dataclasses.replace(canon, layout=name, **_with_missing(arrays))

    def validate(self) -> None:
        """Check shapes and dtypes of canonical weights; raise naming the field."""
        E, H, I = self.num_experts, self.hidden, self.intermediate
        if self.gate_up not in GATE_UP_LAYOUTS:
            raise ValueError(f"gate_up: expected one of {GATE_UP_LAYOUTS}, got {self.gate_up!r}")
        for name, v in (("num_experts", E), ("hidden", H), ("intermediate", I)):
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"weights.{name}: expected a positive int, got {v!r}")
        for name, v in (("hidden", H), ("intermediate", I)):
            if v % formats.MX_BLOCK:
                raise ValueError(f"weights.{name}: must be a multiple of {formats.MX_BLOCK}, got {v}")
        layout = layouts.get(self.layout)  # unknown layouts fail here
        if self.layout == layouts.CANONICAL:
            expect = canonical_shapes(E, H, I)
        elif hasattr(layout, "shapes"):  # a layout that states its arrays' shapes
            expect = layout.shapes(num_experts=E, hidden=H, intermediate=I)
        else:
            return
        for name, (shape, dtype) in expect.items():
            a = getattr(self, name)
            if a is None:
                if name in ("b1", "b2"):
                    continue
                raise ValueError(f"weights.{name}: missing")
            if tuple(a.shape) != shape:
                raise ValueError(f"weights.{name}: expected shape {shape}, got {tuple(a.shape)}")
            if dtype is not None and jnp.dtype(a.dtype) != jnp.dtype(dtype):
                raise TypeError(f"weights.{name}: expected dtype {dtype}, got {a.dtype}")
            if dtype is None and not jnp.issubdtype(a.dtype, jnp.floating):
                raise TypeError(f"weights.{name}: expected a float dtype, got {a.dtype}")


def _dtype_name(a) -> str:
    return np.dtype(a.dtype).name


def _format_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def canonical_shapes(E: int, H: int, I: int) -> dict:
    """name -> (shape, dtype) of the canonical arrays (dtype None: any float)."""
    return {
        "w1": ((E, 2 * I, H // 2), "uint8"), "w1_scale": ((E, 2 * I, H // 32), "uint8"),
        "w2": ((E, H, I // 2), "uint8"), "w2_scale": ((E, H, I // 32), "uint8"),
        "b1": ((E, 2 * I), None), "b2": ((E, H), None),
    }


# jax.export artifacts carry the pytree of their arguments: name the static
# fields so an exported moe() can be deserialised and called in a new process.
jax.export.register_pytree_node_serialization(
    MoEWeights, serialized_name="jax_mxfp4_moe.MoEWeights",
    serialize_auxdata=lambda aux: json.dumps(list(aux)).encode(),
    deserialize_auxdata=lambda data: tuple(json.loads(data.decode())))


def _with_missing(arrays: Mapping) -> dict:
    out = {n: arrays.get(n) for n in _ARRAYS}
    return out


def _as_bias(b, shape, name):
    if b is None:
        return None
    b = jnp.asarray(b)
    if tuple(b.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(b.shape)}")
    return b.astype(jnp.float32)


def _max_byte(*arrays) -> Optional[int]:
    try:
        return max(int(jnp.max(a)) for a in arrays)
    except jax.errors.ConcretizationTypeError:
        return None


def from_mxfp4(w1, w1_scale, w2, w2_scale, b1=None, b2=None, *, gate_up: str = "separated",
               layout: str = layouts.CANONICAL) -> MoEWeights:
    """Wrap already-quantised canonical arrays (any valid fp4 + e8m0 bytes)."""
    w1, w2 = jnp.asarray(w1), jnp.asarray(w2)
    if w1.ndim != 3 or w2.ndim != 3:
        raise ValueError(f"w1/w2: expected 3-D packed arrays, got {w1.shape} and {w2.shape}")
    E, two_i, h_half = w1.shape
    w = MoEWeights(w1, jnp.asarray(w1_scale), w2, jnp.asarray(w2_scale),
                   _as_bias(b1, (E, two_i), "b1"), _as_bias(b2, (E, h_half * 2), "b2"),
                   num_experts=int(E), hidden=int(h_half * 2), intermediate=int(two_i // 2),
                   gate_up=gate_up)
    w.validate()
    return w.with_scale_max().to_layout(layout)


def prepare_weights(w1, w2, b1=None, b2=None, *, gate_up: str = "separated",
                    layout: str = layouts.CANONICAL) -> MoEWeights:
    """Quantise float expert weights to MXFP4 (formats' scale rule).

    w1: [E, 2I, H] gate and up rows (placement given by ``gate_up``);
    w2: [E, H, I]; b1: [E, 2I]; b2: [E, H]."""
    w1, w2 = jnp.asarray(w1), jnp.asarray(w2)
    if w1.ndim != 3 or w2.ndim != 3:
        raise ValueError(f"w1/w2: expected [E, 2I, H] and [E, H, I], got {w1.shape} and {w2.shape}")
    E, two_i, H = w1.shape
    if two_i % 2 or w2.shape != (E, H, two_i // 2):
        raise ValueError(f"w2: expected shape {(E, H, two_i // 2)} to match w1 {w1.shape}, got {w2.shape}")
    if H % formats.MX_BLOCK or (two_i // 2) % formats.MX_BLOCK:
        raise ValueError(f"w1: H and I must be multiples of {formats.MX_BLOCK}, got H={H}, I={two_i // 2}")
    if gate_up not in GATE_UP_LAYOUTS:
        raise ValueError(f"gate_up: expected one of {GATE_UP_LAYOUTS}, got {gate_up!r}")
    q1, s1 = formats.quantize_mxfp4(w1.astype(jnp.float32))
    q2, s2 = formats.quantize_mxfp4(w2.astype(jnp.float32))
    return from_mxfp4(q1, s1, q2, s2, b1, b2, gate_up=gate_up, layout=layout)
