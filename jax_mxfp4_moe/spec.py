"""The layer spec: what one MoE layer computes, each fact stated once.

- MX element formats: block size, element bits, the scale rule's emax, the
  element maximum, the kernels' format codes;
- quant modes: the activation format of each mode and the kernels' format codes;
- activations: name, parameters with their published defaults, the jnp and
  NumPy definitions, the kernels' activation codes;
- gate/up placement in W1's 2I rows;
- the sort contract's entry packing (token and slot in one int32);
- ``LayerSpec``: one hashable value holding a layer's dims and choices (the
  ``moe`` primitive's parameter), and the model presets.

This module is the floor under the package: it imports nothing of it.
Validation, the formats, the jnp path, both kernel backends, the kernels'
constexpr codes, the bench and the report read these tables.  The float64
reference (``numerics.reference``) keeps its own math: it is the oracle.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

# ---------------------------------------------------------------------------
# MX element formats (OCP Microscaling v1.0)
# ---------------------------------------------------------------------------

# Consecutive elements along the reduction dimension sharing one E8M0 scale.
MX_BLOCK = 32


@dataclasses.dataclass(frozen=True)
class MXFormat:
    """An MX element format.  ``emax``: the scale rule divides a block's amax
    by 2**emax (numerics.formats states the rule); ``code``: the kernels'
    format constexpr (CUDA A_FMT / OUT_FMT; 0 is bf16)."""

    name: str
    elem_bits: int
    emax: int
    elem_max: float
    code: int


MX_FORMATS: dict[str, MXFormat] = {
    f.name: f for f in (MXFormat("mxfp4", 4, 2, 6.0, 1), MXFormat("mxfp8", 8, 8, 448.0, 2))
}
BF16_CODE = 0  # the kernels' format code of bf16 activations


def mx_format(name: str) -> MXFormat:
    try:
        return MX_FORMATS[name]
    except KeyError:
        raise ValueError(f"fmt: expected one of {tuple(MX_FORMATS)}, got {name!r}") from None


# ---------------------------------------------------------------------------
# Quant modes
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantMode:
    """A quant mode: activations in ``act_format`` (None: bf16), weights MXFP4.

    In the MX modes x is quantised before gemm1 and gemm1's output is
    re-quantised before gemm2, both by formats' one scale rule."""

    name: str
    act_format: str | None
    weight_format: str = "mxfp4"

    @property
    def code(self) -> int:
        """The kernels' activation-format code."""
        return BF16_CODE if self.act_format is None else MX_FORMATS[self.act_format].code

    @property
    def emax(self) -> int | None:
        """Exponent of the scale rule's divisor for the activations."""
        return None if self.act_format is None else MX_FORMATS[self.act_format].emax


QUANT_MODES: dict[str, QuantMode] = {
    m.name: m for m in (QuantMode("a16w4", None), QuantMode("a8w4", "mxfp8"), QuantMode("a4w4", "mxfp4"))
}
DEFAULT_QUANT = "a16w4"


def quant_mode(name: str) -> QuantMode:
    try:
        return QUANT_MODES[name]
    except KeyError:
        raise ValueError(f"quant: expected one of {tuple(QUANT_MODES)}, got {name!r}") from None


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


def _silu_jnp(g, u):
    import jax
    return jax.nn.silu(g) * u


def _silu_np(g, u):
    return g / (1.0 + np.exp(-g)) * u


def _swiglu_oai_jnp(g, u, *, alpha, limit):
    import jax
    import jax.numpy as jnp
    g = jnp.minimum(g, limit)
    u = jnp.clip(u, -limit, limit)
    return g * jax.nn.sigmoid(alpha * g) * (u + 1.0)


def _swiglu_oai_np(g, u, *, alpha, limit):
    g = np.minimum(g, limit)
    u = np.clip(u, -limit, limit)
    return g / (1.0 + np.exp(-alpha * g)) * (u + 1.0)


@dataclasses.dataclass(frozen=True)
class ActivationKind:
    """One activation: act(gate, up) -> I values.  ``defaults`` are its
    parameters' published values; ``code`` is the kernels' constexpr."""

    name: str
    code: int
    defaults: tuple[tuple[str, float], ...]
    jnp_fn: Callable
    np_fn: Callable
    doc: str


ACTIVATION_KINDS: dict[str, ActivationKind] = {
    k.name: k for k in (
        ActivationKind("silu", 0, (), _silu_jnp, _silu_np,
                       "silu(g) * u (Mixtral, DeepSeek, Qwen, Kimi)"),
        # gpt-oss: alpha and limit from its published model definition.
        ActivationKind("swiglu_oai", 1, (("alpha", 1.702), ("limit", 7.0)), _swiglu_oai_jnp,
                       _swiglu_oai_np,
                       "g' * sigmoid(alpha * g') * (u' + 1), g' = min(g, limit), "
                       "u' = clip(u, -limit, limit) (gpt-oss)"),
    )
}


@dataclasses.dataclass(frozen=True)
class Activation:
    """An activation with all its parameters (hashable).

    ``Activation("swiglu_oai")`` takes the published defaults;
    ``Activation("swiglu_oai", limit=10.0)`` overrides one."""

    name: str
    params: tuple[tuple[str, float], ...] = ()

    def __init__(self, name: str, **params: float):
        kind = activation_kind(name)
        allowed = dict(kind.defaults)
        for key in params:
            if key not in allowed:
                raise ValueError(f"activation: {name!r} has no parameter {key!r}; "
                                 f"its parameters are {tuple(allowed) or 'none'}")
        values = tuple((key, float(params.get(key, default))) for key, default in kind.defaults)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "params", values)

    @property
    def kind(self) -> ActivationKind:
        return ACTIVATION_KINDS[self.name]

    @property
    def code(self) -> int:
        return self.kind.code

    def param(self, key: str) -> float:
        return dict(self.params)[key]

    def __call__(self, g, u):
        """act(g, u) in jnp (traceable)."""
        return self.kind.jnp_fn(g, u, **dict(self.params))

    def numpy(self, g, u):
        """act(g, u) in NumPy (float64 in, float64 out)."""
        return self.kind.np_fn(g, u, **dict(self.params))

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params)
        return f"Activation({self.name!r}{extra})"


def activation_kind(name) -> ActivationKind:
    try:
        return ACTIVATION_KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation: expected one of {tuple(ACTIVATION_KINDS)} or an "
                         f"Activation, got {name!r}") from None


def as_activation(value) -> Activation:
    """An Activation from a name (published defaults) or an Activation."""
    if isinstance(value, Activation):
        return value
    return Activation(value)


# ---------------------------------------------------------------------------
# Gate / up placement in W1's 2I rows
# ---------------------------------------------------------------------------

# "separated": rows [0, I) gate, [I, 2I) up; "interleaved": row 2i gate i,
# row 2i + 1 up i (gpt-oss checkpoints).
GATE_UP = ("separated", "interleaved")


def check_gate_up(gate_up: str) -> str:
    if gate_up not in GATE_UP:
        raise ValueError(f"gate_up: expected one of {GATE_UP}, got {gate_up!r}")
    return gate_up


def split_gate_up(h, gate_up: str):
    """(gate, up) halves of pre-activations h [..., 2I] (jnp or NumPy)."""
    check_gate_up(gate_up)
    if gate_up == "separated":
        half = h.shape[-1] // 2
        return h[..., :half], h[..., half:]
    return h[..., 0::2], h[..., 1::2]


# ---------------------------------------------------------------------------
# The sort contract's entry packing
# ---------------------------------------------------------------------------

# A sorted entry packs (slot << TOKEN_BITS) | token; padding entries hold
# (k << TOKEN_BITS) | T.  The slot field is bits 24..30 of an int32.
TOKEN_BITS = 24
TOKEN_MASK = (1 << TOKEN_BITS) - 1
MAX_TOKENS = 1 << TOKEN_BITS
MAX_TOP_K = (1 << (31 - TOKEN_BITS)) - 1  # 127
# Rows per sorted block the sort contract supports (both backends' kernels).
BLOCK_SIZES = (16, 32, 64, 128)


def pack_entry(token, slot):
    return (slot << TOKEN_BITS) | token


def padding_entry(num_tokens: int, top_k: int) -> int:
    return pack_entry(num_tokens, top_k)


def unpack_entry(entries):
    """(token, slot) of packed sorted entries."""
    return entries & TOKEN_MASK, entries >> TOKEN_BITS


# ---------------------------------------------------------------------------
# The layer spec
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Dims and choices of one MoE layer: hashable, the primitive's parameter.

    ``top_k`` experts per token out of ``num_experts``; x [T, hidden];
    W1 [2 * intermediate, hidden], W2 [hidden, intermediate] per expert."""

    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    activation: Activation = Activation("silu")
    gate_up: str = "separated"
    quant: str = DEFAULT_QUANT
    has_b1: bool = False
    has_b2: bool = False

    def __post_init__(self):
        object.__setattr__(self, "activation", as_activation(self.activation))
        check_gate_up(self.gate_up)
        quant_mode(self.quant)
        for name in ("num_experts", "top_k", "hidden", "intermediate"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name in ("hidden", "intermediate"):
            if getattr(self, name) % MX_BLOCK:
                raise ValueError(f"{name}: must be a multiple of {MX_BLOCK} (MX block), "
                                 f"got {getattr(self, name)}")
        if self.top_k > MAX_TOP_K:
            raise ValueError(f"top_k: at most {MAX_TOP_K} (the sort entry's slot field), got {self.top_k}")

    @classmethod
    def for_weights(cls, weights, top_k: int, *, activation="silu", quant: str = DEFAULT_QUANT):
        """The spec of a layer over ``weights`` (an ``MoEWeights``: its dims,
        gate/up placement and biases) with ``top_k`` experts per token."""
        return cls(weights.num_experts, top_k, weights.hidden, weights.intermediate,
                   as_activation(activation), weights.gate_up, quant,
                   has_b1=weights.b1 is not None, has_b2=weights.b2 is not None)

    @property
    def mode(self) -> QuantMode:
        return QUANT_MODES[self.quant]

    def replace(self, **changes) -> "LayerSpec":
        return dataclasses.replace(self, **changes)

    def flops(self, tokens: int) -> float:
        """Multiply-adds x 2 of one call over ``tokens`` tokens."""
        return 2.0 * tokens * self.top_k * 3 * self.hidden * self.intermediate


# Model shapes the bench times and the report and CI compile for.
PRESETS: Mapping[str, LayerSpec] = {
    "gpt-oss-120b": LayerSpec(128, 4, 2880, 2880, Activation("swiglu_oai"), "interleaved",
                              has_b1=True, has_b2=True),
    "gpt-oss-20b": LayerSpec(32, 4, 2880, 2880, Activation("swiglu_oai"), "interleaved",
                             has_b1=True, has_b2=True),
    "deepseek-v3": LayerSpec(256, 8, 7168, 2048, Activation("silu"), "separated"),
    "qwen3-30b-a3b": LayerSpec(128, 8, 2048, 768, Activation("silu"), "separated"),
    "tiny": LayerSpec(8, 2, 128, 64, Activation("silu"), "separated", has_b1=True, has_b2=True),
    # The CPU timing case: the jnp path against dequantising inside the jit
    # (the bench's CPU baselines), at T = 64.
    "small": LayerSpec(32, 4, 512, 512, Activation("silu"), "separated"),
}


def preset(name: str) -> LayerSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset: unknown {name!r}; known: {sorted(PRESETS)}") from None
