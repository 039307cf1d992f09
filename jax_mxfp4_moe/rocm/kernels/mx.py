"""MX block quantisation inside a kernel: the rule of ``jax_mxfp4_moe.numerics.formats``.

One thread quantises one 32-element block held as 32 ``fx.Float32`` values:

    v    = amax * 2**-emax (emax 2 for E2M1, 8 for E4M3FN; exact)
    byte = biased exponent of v, +1 when mantissa bit 22 is set and
           (bit 21, any lower bit, or a non-zero exponent); 255 for NaN/Inf
    q    = x * 2**(127 - byte) as two power-of-two factors (exact), then
           round-to-nearest-even, saturating (E4M3FN clips to +-448 first)

Element conversion is integer/compare arithmetic (no hardware cvt), so the
rounding is the one ``ml_dtypes`` uses, bit for bit.
"""


import flydsl.expr as fx

from jax_mxfp4_moe.numerics.formats import E2M1_ROUNDING, FP4_SCALE_DIVISOR, FP8_MAX, FP8_SCALE_DIVISOR

from jax_mxfp4_moe.rocm.kernels.common import f32_bits, f32_from_bits, shr

_SCALE_FACTOR = {"mxfp4": 1.0 / FP4_SCALE_DIVISOR, "mxfp8": 1.0 / FP8_SCALE_DIVISOR}


def block_scale(values, fmt):
    """E8M0 byte (fx.Int32) of a block and the values brought into element range."""
    amax = abs(values[0])
    for v in values[1:]:
        amax = amax.maximumf(abs(v))  # NaN-propagating maximum
    u = f32_bits(amax * fx.Float32(_SCALE_FACTOR[fmt]))
    exp = shr(u, 23) & fx.Int32(0xFF)
    lower = ((u & fx.Int32(0x200000)) != fx.Int32(0)) | ((u & fx.Int32(0x1FFFFF)) != fx.Int32(0)) | (exp > fx.Int32(0))
    round_up = ((u & fx.Int32(0x400000)) != fx.Int32(0)) & lower & (exp != fx.Int32(0xFF))
    byte = round_up.select(exp + fx.Int32(1), exp)
    e = fx.Int32(127) - byte  # in [-128, 127]
    e1 = e >> fx.Int32(1)  # arithmetic shift: floor(e / 2)
    e2 = e - e1
    f1 = f32_from_bits((e1 + fx.Int32(127)) << fx.Int32(23))
    f2 = f32_from_bits((e2 + fx.Int32(127)) << fx.Int32(23))
    return byte, [v * f1 * f2 for v in values]


def _sign_bit(x):
    return shr(f32_bits(x), 31)


def e2m1_code(x):
    """f32 -> E2M1 code 0..15 (fx.Int32); NaN -> zero with the opposite sign."""
    a = abs(x)
    code = fx.Int32(0)
    for bound, tie_up in E2M1_ROUNDING:
        hit = (a >= fx.Float32(bound)) if tie_up else (a > fx.Float32(bound))
        code = code + hit.select(fx.Int32(1), fx.Int32(0))
    sign = _sign_bit(x)
    is_nan = x != x
    sign = is_nan.select(fx.Int32(1) - sign, sign)
    code = is_nan.select(fx.Int32(0), code)
    return code | (sign << fx.Int32(3))


def e4m3_code(x):
    """f32 -> E4M3FN bits (fx.Int32), clipped to +-448; NaN -> 0x7F with its sign."""
    sign = _sign_bit(x)
    c = x.maximumf(fx.Float32(-FP8_MAX)).minimumf(fx.Float32(FP8_MAX))
    a = abs(c)
    ab = f32_bits(a)
    # Normal range (>= 2**-6): round the 23-bit mantissa to 3 bits, nearest even;
    # a carry moves into the exponent; rebias 127 -> 7.
    r = ab + fx.Int32(0x7FFFF) + (shr(ab, 20) & fx.Int32(1))
    normal = shr(r, 20) - fx.Int32(120 << 3)
    # Subnormal range: multiples of 2**-9, round half to even via the 2**23 trick.
    m = (a * fx.Float32(512.0) + fx.Float32(8388608.0)) - fx.Float32(8388608.0)
    sub = m.to(fx.Int32)
    code = (a < fx.Float32(2.0**-6)).select(sub, normal)
    code = (c != c).select(fx.Int32(0x7F), code)
    return code | (sign << fx.Int32(7))


def _pack_words(codes, bits):
    """Codes of `bits` bits -> i32 words, the first code in the lowest bits."""
    per = 32 // bits
    words = []
    for w in range(len(codes) // per):
        acc = fx.Int32(0)
        for j in range(per):
            acc = acc | (codes[per * w + j] << fx.Int32(bits * j))
        words.append(acc)
    return words


def pack_fp4_words(codes):
    """32 E2M1 codes -> 4 i32 words (element 2i in the low nibble, little endian)."""
    return _pack_words(codes, 4)


def pack_fp8_words(codes):
    """32 E4M3 bytes -> 8 i32 words (little endian)."""
    return _pack_words(codes, 8)


def quantize_block(values, fmt):
    """32 f32 -> (scale byte, packed words: 4 for mxfp4, 8 for mxfp8)."""
    byte, scaled = block_scale(values, fmt)
    if fmt == "mxfp4":
        return byte, pack_fp4_words([e2m1_code(v) for v in scaled])
    if fmt == "mxfp8":
        return byte, pack_fp8_words([e4m3_code(v) for v in scaled])
    raise ValueError(f"fmt: expected 'mxfp4' or 'mxfp8', got {fmt!r}")
