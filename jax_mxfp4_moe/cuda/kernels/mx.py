"""MX (OCP Microscaling) element and scale arithmetic as Triton device functions.

The scale rule is `jax_mxfp4_moe.numerics.formats`' (FlyDSL's MXFP4 rule
``f32_to_e8m0(amax / 2**emax)``, applied to both formats): v = amax / 4
(MXFP4) or amax / 256 (MXFP8), both exact; byte = biased exponent of v, +1
when mantissa bit 22 is set and (any lower mantissa bit or the exponent is
non-zero); NaN/Inf -> 255. Elements are x * 2**(127 - byte) (applied as two
normal power-of-two factors, like formats) rounded to nearest even,
saturating.
"""

import triton
import triton.language as tl

from jax_mxfp4_moe import spec

# Format codes of the A_FMT / OUT_FMT constexprs, and the format facts the
# device functions use (spec.MX_FORMATS).
BF16: tl.constexpr = tl.constexpr(spec.BF16_CODE)
MXFP4: tl.constexpr = tl.constexpr(spec.MX_FORMATS["mxfp4"].code)
MXFP8: tl.constexpr = tl.constexpr(spec.MX_FORMATS["mxfp8"].code)
FP4_INV_DIVISOR: tl.constexpr = tl.constexpr(2.0 ** -spec.MX_FORMATS["mxfp4"].emax)
FP8_INV_DIVISOR: tl.constexpr = tl.constexpr(2.0 ** -spec.MX_FORMATS["mxfp8"].emax)
FP8_MAX: tl.constexpr = tl.constexpr(spec.MX_FORMATS["mxfp8"].elem_max)

@triton.jit
def e8m0_scale(amax, FP8: tl.constexpr):
    """Scale byte (int32) of blocks whose absolute maximum is ``amax`` (f32)."""
    if FP8:
        v = amax * FP8_INV_DIVISOR
    else:
        v = amax * FP4_INV_DIVISOR
    u = v.to(tl.int32, bitcast=True)
    exp = (u >> 23) & 0xFF
    round_up = ((u & 0x400000) != 0) & (((u & 0x3FFFFF) != 0) | (exp > 0))
    byte = tl.where(round_up & (exp != 0xFF), exp + 1, exp)
    return byte


@triton.jit
def apply_inverse_scale(xb, byte):
    """xb [R, B, 32] * 2**(127 - byte[R, B]) exactly, as formats does it: two
    factors in [2**-64, 2**64], so none is a denormal."""
    e = 127 - byte
    e1 = e // 2
    e1 = tl.where((e < 0) & (e1 * 2 != e), e1 - 1, e1)  # floor division
    e2 = e - e1
    f1 = ((e1 + 127) << 23).to(tl.float32, bitcast=True)
    f2 = ((e2 + 127) << 23).to(tl.float32, bitcast=True)
    return xb * f1[:, :, None] * f2[:, :, None]


@triton.jit
def e8m0_value(byte):
    """2**(byte - 127) as f32; 0 -> 2**-127 (denormal), 255 -> NaN."""
    v = (byte << 23).to(tl.float32, bitcast=True)
    v = tl.where(byte == 0, 5.877471754111438e-39, v)
    return tl.where(byte == 255, float("nan"), v)


# E2M1 rounding: the boundaries and tie directions of formats.E2M1_ROUNDING.
@triton.jit
def e2m1_round(a):
    """|y| -> nearest E2M1 magnitude (ties to even, saturating at 6)."""
    q = tl.where(a <= 5.0, 4.0, 6.0)
    q = tl.where(a < 3.5, 3.0, q)
    q = tl.where(a <= 2.5, 2.0, q)
    q = tl.where(a < 1.75, 1.5, q)
    q = tl.where(a <= 1.25, 1.0, q)
    q = tl.where(a < 0.75, 0.5, q)
    q = tl.where(a <= 0.25, 0.0, q)
    return q


@triton.jit
def e2m1_code(a):
    """|y| -> E2M1 magnitude code 0..7 (same rounding as e2m1_round)."""
    c = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    c += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
    c += (a > 5.0).to(tl.int32)
    return c


@triton.jit
def clip_fp8(y):
    # where() keeps NaN, unlike tl.clamp.
    y = tl.where(y > FP8_MAX, FP8_MAX, y)
    return tl.where(y < -FP8_MAX, -FP8_MAX, y)


@triton.jit
def mx_fake_quant(x, ROWS: tl.constexpr, COLS: tl.constexpr, FP8: tl.constexpr):
    """Quantise x [ROWS, COLS] (f32, blocks of 32 along COLS) and dequantise
    again: returns the exact values the MX encoding represents, as f32."""
    xb = tl.reshape(x, (ROWS, COLS // 32, 32))
    amax = tl.max(tl.abs(xb), axis=2)
    has_nan = tl.max((xb != xb).to(tl.int32), axis=2)
    amax = tl.where(has_nan != 0, float("nan"), amax)
    byte = e8m0_scale(amax, FP8)
    y = apply_inverse_scale(xb, byte)
    if FP8:
        q = clip_fp8(y).to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)
    else:
        q = e2m1_round(tl.abs(y))
        q = tl.where(y < 0, -q, q)
    q = q * e8m0_value(byte)[:, :, None]
    return tl.reshape(q, (ROWS, COLS))
