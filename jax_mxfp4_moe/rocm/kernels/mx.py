"""MX block quantisation inside a kernel: the rule of ``jax_mxfp4_moe.numerics.formats``.

A 32-element block (possibly spread over several lanes, each holding a run
of it) is quantised in three steps:

    amax = integer max of |x| bits       (NaN's bits exceed Inf's and every
                                          finite value's: NaN propagates)
    byte = biased exponent of amax * 2**-emax, +1 when mantissa bit 22 is
           set and (bit 21, any lower bit, or a non-zero exponent); 255 for
           NaN/Inf                        (emax 2 for E2M1, 8 for E4M3FN)
    q    = ldexp(x, 127 - byte), converted by v_cvt_scalef32_pk_fp4_f32 /
           v_cvt_scalef32_pk_fp8_f32 with scale 1.0

Why the hardware conversion is exactly the rule (``functional_model`` models the
sequence and ``tests/test_rocm_host.py`` checks it against ``formats`` over
every input class, exhaustively where feasible):

- ldexp by 127 - byte is exact for every q that is a normal f32; a q below
  2**-126 is below E2M1's and E4M3's smallest half-step, so whatever f32
  rounding or flushing happens, it converts to a zero of its sign.
- The CDNA4 ISA defines both conversions as round-to-nearest-even, the rule's
  rounding.  The scale operand 1.0 (exponent 127) leaves q unscaled, so no
  assumption about how the instruction treats an E8M0 exponent of 0 enters.
- For a finite block the rule puts amax * 2**(127 - byte) in [3, 6) (E2M1)
  and [192, 384) (E4M3), so no element needs saturation, which the ISA
  summary does not specify.
- A block with a NaN or Inf gets byte 255 (the block decodes to NaN), and
  its NaN/Inf elements need the rule's special cases (E2M1: Inf -> +-6, NaN
  -> a zero of the opposite sign; E4M3: clip to +-448, NaN -> 0x7F | sign)
  that no instruction states: those lanes take the integer/compare sequence
  below instead, in a branch that finite data never enters.
"""

import flydsl.expr as fx
from flydsl._mlir import ir
from flydsl._mlir.dialects import llvm, vector
from flydsl.expr import rocdl

from jax_mxfp4_moe.numerics.formats import E2M1_ROUNDING, FP4_SCALE_DIVISOR, FP8_MAX, FP8_SCALE_DIVISOR
from jax_mxfp4_moe.spec import MX_BLOCK

from jax_mxfp4_moe.rocm.kernels.common import f32_bits, f32_from_bits, if_else, raw, shr

_SCALE_FACTOR = {"mxfp4": 1.0 / FP4_SCALE_DIVISOR, "mxfp8": 1.0 / FP8_SCALE_DIVISOR}
NAN_SCALE = 255
VALUES_PER_WORD = {"mxfp4": 8, "mxfp8": 4}


def abs_bits(x):
    """|x| as its f32 bits (i32)."""
    return f32_bits(x) & fx.Int32(0x7FFFFFFF)


def imax(a, b):
    """Max of two non-negative i32 (|x| bits: the signed compare is the unsigned one)."""
    a, b = fx.Int32(a), fx.Int32(b)
    return (a > b).select(a, b)


def amax_bits(values):
    """Integer max of the |x| bits of ``values`` (the block maximum, NaN-propagating)."""
    m = abs_bits(values[0])
    for v in values[1:]:
        m = imax(m, abs_bits(v))
    return m


def scale_byte(amax, fmt):
    """E8M0 byte (fx.Int32) of a block whose |x| maximum has the f32 bits ``amax``."""
    u = f32_bits(f32_from_bits(amax) * fx.Float32(_SCALE_FACTOR[fmt]))
    exp = shr(u, 23) & fx.Int32(0xFF)
    lower = ((u & fx.Int32(0x200000)) != fx.Int32(0)) | ((u & fx.Int32(0x1FFFFF)) != fx.Int32(0)) | (exp > fx.Int32(0))
    round_up = ((u & fx.Int32(0x400000)) != fx.Int32(0)) & lower & (exp != fx.Int32(0xFF))
    return round_up.select(exp + fx.Int32(1), exp)


def _ldexp(x, e):
    f32 = ir.F32Type.get()
    return fx.Float32(llvm.call_intrinsic(f32, "llvm.ldexp.f32.i32", [raw(fx.Float32(x)), raw(fx.Int32(e))], [], []))


def _hw_words(values, byte, fmt):
    """Packed words of ``values`` (a multiple of 8 / 4) via the scaled conversions (scale 1.0)."""
    e = fx.Int32(127) - byte
    q = [_ldexp(v, e) for v in values]
    one = raw(fx.Float32(1.0))
    i32 = ir.IntegerType.get_signless(32)
    words = []
    if fmt == "mxfp4":
        for w in range(len(q) // 8):
            acc = raw(fx.Int32(0))
            for sel in range(4):  # byte sel: elements 2 sel (low nibble) and 2 sel + 1
                acc = rocdl.cvt_scalef32_pk_fp4_f32(i32, acc, raw(q[8 * w + 2 * sel]), raw(q[8 * w + 2 * sel + 1]),
                                                    one, sel)
            words.append(fx.Int32(acc))
        return words
    v2i16 = ir.VectorType.get([2], ir.IntegerType.get_signless(16))
    for w in range(len(q) // 4):
        acc = llvm.bitcast(v2i16, raw(fx.Int32(0)))
        for hi in range(2):  # 16-bit half: elements 2 hi (low byte) and 2 hi + 1
            acc = rocdl.cvt_scalef32_pk_fp8_f32(v2i16, acc, raw(q[4 * w + 2 * hi]), raw(q[4 * w + 2 * hi + 1]),
                                                one, bool(hi))
        words.append(fx.Int32(llvm.bitcast(i32, acc)))
    return words


def _scaled_exact(values, byte):
    """x * 2**(127 - byte) as two power-of-two factors (exact for every finite x)."""
    e = fx.Int32(127) - byte  # in [-128, 127]
    e1 = e >> fx.Int32(1)  # arithmetic shift: floor(e / 2)
    e2 = e - e1
    f1 = f32_from_bits((e1 + fx.Int32(127)) << fx.Int32(23))
    f2 = f32_from_bits((e2 + fx.Int32(127)) << fx.Int32(23))
    return [v * f1 * f2 for v in values]


def _sign_bit(x):
    return shr(f32_bits(x), 31)


def e2m1_code(x):
    """f32 -> E2M1 code 0..15 (fx.Int32); NaN -> zero with the opposite sign (ml_dtypes)."""
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


def _sw_words(values, byte, fmt):
    scaled = _scaled_exact(values, byte)
    if fmt == "mxfp4":
        return _pack_words([e2m1_code(v) for v in scaled], 4)
    return _pack_words([e4m3_code(v) for v in scaled], 8)


def convert(values, byte, fmt):
    """Packed words (element 2i in the low nibble / byte order) of a lane's run
    of a block whose scale byte is ``byte``: hardware conversions; the
    integer sequence for lanes of a NaN-scale block (see the module doc)."""
    if fmt not in VALUES_PER_WORD:
        raise ValueError(f"fmt: expected 'mxfp4' or 'mxfp8', got {fmt!r}")
    if len(values) % VALUES_PER_WORD[fmt]:
        raise ValueError(f"values: a multiple of {VALUES_PER_WORD[fmt]} per lane, got {len(values)}")
    return if_else(byte == fx.Int32(NAN_SCALE), len(values) // VALUES_PER_WORD[fmt],
                   lambda: _sw_words(values, byte, fmt), lambda: _hw_words(values, byte, fmt))


def quantize_block(values, fmt):
    """32 f32 held by one thread -> (scale byte, packed words: 4 for mxfp4, 8 for mxfp8)."""
    if len(values) != MX_BLOCK:
        raise ValueError(f"values: expected {MX_BLOCK}, got {len(values)}")
    byte = scale_byte(amax_bits(values), fmt)
    return byte, convert(values, byte, fmt)
