"""OCP Microscaling (MX v1.0) formats: MXFP4 (E2M1) and MXFP8 (E4M3FN), E8M0 scales.

One block of ``MX_BLOCK`` consecutive elements along the reduction dimension
shares one E8M0 scale byte ``s`` (value ``2**(s - 127)``, ``s == 255`` is NaN).
MXFP4 packs two elements per byte: element ``2i`` in the low nibble.

Scale rule for quantising (activations here, and float weights in
``prepare_weights``), one rule for both formats.  It is the ROCm ecosystem's
MXFP4 rule, FlyDSL ``tests/kernels/utils/gemm_common_utils.py``
``f32_to_e8m0(amax / 2**floor(log2(elem_max)))`` as its ``_per_1x32_fp4_quant``
calls it, so our MXFP4 results compare with FlyDSL's and aiter's:

    v    = float32(amax) / 2**emax       (emax = 2 for E2M1, 8 for E4M3FN)
    byte = biased exponent of v, plus one when mantissa bit 22 is set and
           (bit 21, or any lower bit, or the exponent is non-zero)
    byte = 255 when v is NaN or Inf

i.e. the block maximum lands in [0.75, 1.5) * 2**emax, which never exceeds the
element maximum (6 = 1.5 * 4, 448 > 1.5 * 256).  FlyDSL's MXFP8 test helper
divides by 448 instead of 256; that lets a block maximum reach 1.5 * 448 and
clip by up to a third, so MXFP8 follows the MXFP4 rule here.

Elements are then ``x * 2**(127 - byte)`` converted with round-to-nearest-even,
saturating at the format's maximum (MXFP8 clips to +-448 first, since E4M3FN
has no infinity).  Element conversion matches ``ml_dtypes`` bit for bit.

Every function has a jnp form (traceable, used by the jnp pipeline) and a
NumPy twin with the ``_np`` suffix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jax_mxfp4_moe.spec import MX_BLOCK, MX_FORMATS, mx_format

FP4_MAX = MX_FORMATS["mxfp4"].elem_max
FP8_MAX = MX_FORMATS["mxfp8"].elem_max
E8M0_NAN = 255
E8M0_BIAS = 127

# Divisors of the block amax in the scale rule: 2**emax of each element format.
FP4_SCALE_DIVISOR = float(2 ** MX_FORMATS["mxfp4"].emax)
FP8_SCALE_DIVISOR = float(2 ** MX_FORMATS["mxfp8"].emax)

# E2M1 magnitudes by code 0..7 (code 8..15 are the negatives).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Round-to-nearest-even boundaries between consecutive E2M1 codes, with
# whether a tie goes up: a magnitude above the boundary (or equal to it, when
# the upper code is even) takes the upper code.  Kernels use this table too.
E2M1_ROUNDING = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False),
                 (3.5, True), (5.0, False))

FORMATS = tuple(MX_FORMATS)


def _check_blocks(x_shape, name: str = "x") -> None:
    if len(x_shape) < 1 or x_shape[-1] % MX_BLOCK:
        raise ValueError(
            f"{name}: the last dimension must be a multiple of {MX_BLOCK} "
            f"(MX block size), got shape {tuple(x_shape)}")


# --------------------------------------------------------------------------
# E8M0 scales
# --------------------------------------------------------------------------

def _e8m0_from_f32_bits(u, xp):
    """The scale byte of float32 values given as uint32 bits (rule above)."""
    exp = (u >> 23) & 0xFF
    bit22 = (u & 0x400000) != 0
    round_up = bit22 & (((u & 0x200000) != 0) | ((u & 0x1FFFFF) != 0) | (exp > 0))
    byte = xp.where(round_up & (exp != 0xFF), exp + 1, exp)
    return byte.astype(xp.uint8)


def e8m0_scale_np(amax: np.ndarray, fmt: str) -> np.ndarray:
    """Scale bytes for blocks with absolute maxima ``amax`` (float32)."""
    v = np.asarray(amax, np.float32) / np.float32(_divisor(fmt))
    return _e8m0_from_f32_bits(v.astype(np.float32).view(np.uint32), np)


def e8m0_scale(amax: jax.Array, fmt: str) -> jax.Array:
    """jnp form of :func:`e8m0_scale_np`."""
    v = amax.astype(jnp.float32) / jnp.float32(_divisor(fmt))
    return _e8m0_from_f32_bits(jax.lax.bitcast_convert_type(v, jnp.uint32), jnp)


def _divisor(fmt: str) -> float:
    return float(2 ** mx_format(fmt).emax)


def e8m0_to_float_np(scale: np.ndarray) -> np.ndarray:
    """Scale bytes -> float64 values (255 -> NaN)."""
    s = np.asarray(scale).astype(np.int32)
    return np.where(s == E8M0_NAN, np.nan, np.ldexp(1.0, s - E8M0_BIAS))


def e8m0_to_float(scale: jax.Array) -> jax.Array:
    """Scale bytes -> float32 values (255 -> NaN; 0 -> 2**-127)."""
    s = scale.astype(jnp.int32)
    # 2**(s-127) from exponent bits; s == 0 is the denormal 2**-127.
    normal = jax.lax.bitcast_convert_type(s << 23, jnp.float32)
    value = jnp.where(s == 0, jnp.float32(2.0 ** -127), normal)
    return jnp.where(s == E8M0_NAN, jnp.float32(jnp.nan), value)


def _inverse_scale_np(scale: np.ndarray) -> np.ndarray:
    """2**(127 - s) as float64 (exact); brings a block into the element range.

    NaN scales (255) use 2**-128: those blocks dequantise to NaN whatever
    their elements hold."""
    return np.ldexp(1.0, E8M0_BIAS - scale.astype(np.int32))


def _apply_inverse_scale(xb: jax.Array, scale: jax.Array) -> jax.Array:
    """xb * 2**(127 - s) in float32, exactly: two power-of-two factors in
    [2**-64, 2**64] keep every factor a normal number (CPUs may flush
    denormals, and 2**-127 / 2**-128 are denormal)."""
    e = E8M0_BIAS - scale.astype(jnp.int32)  # in [-128, 127]
    e1 = e // 2
    e2 = e - e1
    f1 = jax.lax.bitcast_convert_type((e1 + 127) << 23, jnp.float32)
    f2 = jax.lax.bitcast_convert_type((e2 + 127) << 23, jnp.float32)
    return xb * f1[..., None] * f2[..., None]


def _blocks(x, xp):
    return x.reshape(*x.shape[:-1], x.shape[-1] // MX_BLOCK, MX_BLOCK)


# --------------------------------------------------------------------------
# Element conversion
# --------------------------------------------------------------------------

def e2m1_encode(v: jax.Array) -> jax.Array:
    """float32 -> E2M1 codes (uint8, 0..15), as ml_dtypes.float4_e2m1fn does it."""
    v = v.astype(jnp.float32)
    a = jnp.abs(v)
    code = jnp.zeros(v.shape, jnp.uint8)
    for bound, tie_up in E2M1_ROUNDING:
        code = code + ((a >= bound) if tie_up else (a > bound)).astype(jnp.uint8)
    sign = (jax.lax.bitcast_convert_type(v, jnp.uint32) >> 31).astype(jnp.uint8)
    # ml_dtypes maps NaN to a zero with the opposite sign bit.
    sign = jnp.where(jnp.isnan(v), 1 - sign, sign)
    return jnp.where(jnp.isnan(v), sign << 3, code | (sign << 3))


def e2m1_encode_np(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)


def e2m1_decode(codes: jax.Array) -> jax.Array:
    """E2M1 codes -> float32, from the bits (elementwise: XLA:CPU runs a
    16-entry table lookup as a gather, several times slower).  Code
    s|e1e0|m: e > 0 is (1 + m/2) * 2**(e-1), biased exponent e + 126; e == 0
    is m * 0.5."""
    c = codes.astype(jnp.int32)
    e, m = (c >> 1) & 3, c & 1
    bits = jnp.where(e > 0, ((e + 126) << 23) | (m << 22), m * (126 << 23))
    return jax.lax.bitcast_convert_type(bits | ((c & 8) << 28), jnp.float32)


def e2m1_decode_np(codes: np.ndarray) -> np.ndarray:
    return np.asarray(codes, np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)


def e4m3_encode(v: jax.Array) -> jax.Array:
    """float32 -> E4M3FN bits, saturating at +-448 (NaN stays NaN)."""
    v = jnp.clip(v.astype(jnp.float32), -FP8_MAX, FP8_MAX)
    return jax.lax.bitcast_convert_type(v.astype(jnp.float8_e4m3fn), jnp.uint8)


def e4m3_encode_np(v: np.ndarray) -> np.ndarray:
    v = np.clip(np.asarray(v, np.float32), -FP8_MAX, FP8_MAX)
    return v.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def e4m3_decode(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint8), jnp.float8_e4m3fn).astype(jnp.float32)


def e4m3_decode_np(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


# --------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------

def pack_fp4(codes):
    """[..., K] codes -> [..., K/2] bytes, element 2i in the low nibble."""
    xp = jnp if isinstance(codes, jax.Array) else np
    codes = codes.astype(xp.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(xp.uint8)


def unpack_fp4(packed):
    """[..., K/2] bytes -> [..., K] codes."""
    xp = jnp if isinstance(packed, jax.Array) else np
    lo = packed & 0x0F
    hi = packed >> 4
    return xp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2).astype(xp.uint8)


# --------------------------------------------------------------------------
# Quantise / dequantise
# --------------------------------------------------------------------------

def _quantize(x, fmt: str):
    _check_blocks(x.shape)
    xb = _blocks(x.astype(jnp.float32), jnp)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    # XLA's max may drop NaN; a block holding one must get the NaN scale.
    amax = jnp.where(jnp.isnan(xb).any(axis=-1), jnp.float32(jnp.nan), amax)
    scale = e8m0_scale(amax, fmt)
    y = _apply_inverse_scale(xb, scale)
    y = y.reshape(x.shape)
    return y, scale


def quantize_mxfp4(x: jax.Array):
    """x [..., K] -> (packed uint8 [..., K/2], scale uint8 [..., K/32])."""
    y, scale = _quantize(jnp.asarray(x), "mxfp4")
    return pack_fp4(e2m1_encode(y)), scale


def quantize_mxfp8(x: jax.Array):
    """x [..., K] -> (E4M3FN bits uint8 [..., K], scale uint8 [..., K/32])."""
    y, scale = _quantize(jnp.asarray(x), "mxfp8")
    return e4m3_encode(y), scale


def _scale_rows(values, scale, dtype):
    vb = _blocks(values, jnp) * e8m0_to_float(scale)[..., None]
    return vb.reshape(values.shape).astype(dtype)


def dequantize_mxfp4(packed: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    return _scale_rows(e2m1_decode(unpack_fp4(packed)), scale, dtype)


def dequantize_mxfp8(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    return _scale_rows(e4m3_decode(q), scale, dtype)


def _quantize_np(x, fmt: str):
    x = np.asarray(x, np.float32)
    _check_blocks(x.shape)
    xb = _blocks(x, np)
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(xb), axis=-1)
    scale = e8m0_scale_np(amax, fmt)
    with np.errstate(invalid="ignore", over="ignore"):
        y = (xb.astype(np.float64) * _inverse_scale_np(scale)[..., None]).astype(np.float32)
    return y.reshape(x.shape), scale


def quantize_mxfp4_np(x):
    y, scale = _quantize_np(x, "mxfp4")
    return pack_fp4(e2m1_encode_np(y)), scale


def quantize_mxfp8_np(x):
    y, scale = _quantize_np(x, "mxfp8")
    return e4m3_encode_np(y), scale


def _scale_rows_np(values, scale, dtype):
    with np.errstate(invalid="ignore"):
        vb = _blocks(values.astype(np.float64), np) * e8m0_to_float_np(scale)[..., None]
    return vb.reshape(values.shape).astype(dtype)


def dequantize_mxfp4_np(packed, scale, dtype=np.float32):
    return _scale_rows_np(e2m1_decode_np(unpack_fp4(np.asarray(packed))), np.asarray(scale), dtype)


def dequantize_mxfp8_np(q, scale, dtype=np.float32):
    return _scale_rows_np(e4m3_decode_np(q), np.asarray(scale), dtype)


def quantize(x, fmt: str):
    """jnp quantiser by format name ("mxfp4" or "mxfp8")."""
    if fmt == "mxfp4":
        return quantize_mxfp4(x)
    if fmt == "mxfp8":
        return quantize_mxfp8(x)
    raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")


def dequantize(q, scale, fmt: str, dtype=jnp.float32):
    if fmt == "mxfp4":
        return dequantize_mxfp4(q, scale, dtype)
    if fmt == "mxfp8":
        return dequantize_mxfp8(q, scale, dtype)
    raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
