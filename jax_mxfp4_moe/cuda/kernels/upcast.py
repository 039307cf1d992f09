"""MXFP4 -> bf16 upcast in registers (inline PTX), for the decode tiles.

The packed E2M1 bytes become bf16 pairs by an elementwise bit-twiddle (no
reshuffle through shared memory), and E8M0 scale bytes become bf16 powers of
two, so that one bf16x2 multiply per pair applies the scale.
"""

import triton
import triton.language as tl


def _e2m1_high_nibbles_asm(src: str, selector: str, out: str, bias: bool) -> str:
    """PTX: the high nibbles of two bytes of `src` -> bf16x2 register `out`.
    prmt puts byte i in a half's low byte and its sign-replicated copy
    (selector nibble | 8) in the high byte: after << 2 the nibble's magnitude
    sits at bits 6-8 and bit 15 is its sign, so one mask leaves the bf16 bits."""
    return (f"prmt.b32 t, {src}, 0, {selector};\nshl.b32 t, t, 2;\n"
            f"and.b32 {out}, t, 0x81c081c0;" + (f"\nmul.rn.bf16x2 {out}, {out}, bias;" if bias else ""))


def _e2m1_even_odd_asm(bias: bool) -> str:
    return ("{ .reg .b32 t, lo, bias;\nmov.b32 bias, 0x7e807e80;\nshl.b32 lo, $4, 4;\n"
            + "\n".join(_e2m1_high_nibbles_asm(src, sel, out, bias) for src, sel, out in (
                ("lo", "0x9180", "$0"), ("lo", "0xb3a2", "$1"), ("$4", "0x9180", "$2"),
                ("$4", "0xb3a2", "$3"))) + "\n}")


# The bf16 bits of an E2M1 code n are (n & 8) << 12 | (n & 7) << 6 = its value
# * 2**-126 (E2M1's subnormal 0.5 lands on a bf16 subnormal, exactly); one
# bf16x2 multiply by 2**126 (0x7e80) makes it the value, unless the scale
# carries that factor (FOLD). Odd elements are the high nibbles of bytes 0, 1
# (selector 0x9180), then 2, 3 (0xb3a2); even ones are the high nibbles of
# the word shifted left by 4 (byte i keeps its place).
E2M1_EVEN_ODD_ASM: tl.constexpr = tl.constexpr(_e2m1_even_odd_asm(bias=True))
E2M1_EVEN_ODD_RAW_ASM: tl.constexpr = tl.constexpr(_e2m1_even_odd_asm(bias=False))


@triton.jit
def e2m1_even_odd(w, RAW: tl.constexpr):
    """Packed E2M1 [R, C] (uint8, element 2i in the low nibble) -> (even, odd)
    elements as bf16 [R, C] each, exact; times 2**-126 when RAW.
    Elementwise (same shape in and out), so triton can load the bytes straight
    into the MMA operand layout."""
    if RAW:
        asm: tl.constexpr = E2M1_EVEN_ODD_RAW_ASM
    else:
        asm: tl.constexpr = E2M1_EVEN_ODD_ASM
    return tl.inline_asm_elementwise(
        asm=asm, constraints="=r,=r,=r,=r,r", args=[w], dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True, pack=4)


# Scale bytes 0, 1 of a word to the halves' exponent fields, then bytes 2, 3;
# FOLD adds 126 to each field (2**126 * 2**(byte - 127), normal for bytes <= 128).
def _e8m0_bf16_asm(fold: bool) -> str:
    add = "\nadd.u32 {0}, {0}, 0x3f003f00;" if fold else ""
    return ("{ .reg .b32 t;\n"
            "prmt.b32 t, $2, 0, 0x5140;\nshl.b32 $0, t, 7;" + add.format("$0") + "\n"
            "prmt.b32 t, $2, 0, 0x7362;\nshl.b32 $1, t, 7;" + add.format("$1") + "\n}")


E8M0_BF16_ASM: tl.constexpr = tl.constexpr(_e8m0_bf16_asm(fold=False))
E8M0_BF16_FOLD_ASM: tl.constexpr = tl.constexpr(_e8m0_bf16_asm(fold=True))


@triton.jit
def e8m0_bf16(ws, FOLD: tl.constexpr):
    """E8M0 scale bytes -> 2**(byte - 127) as bf16 (the exponent field is the
    byte), or 2**(byte - 1) when FOLD (bytes <= 128 only, which the caller knows:
    cuda_kernels.FOLD_MAX_SCALE_BYTE). Without FOLD, two
    departures from the reference, for bytes no real weights use: 255 (NaN)
    gives +inf, so the block's elements become +-inf (0 * inf: NaN) rather
    than NaN; 0 gives 0 rather than 2**-127, flushing elements of magnitude
    <= 6 * 2**-127 to zero (an all-zero block, byte 0, is exact). With FOLD
    byte 0 is exact too."""
    if FOLD:
        asm: tl.constexpr = E8M0_BF16_FOLD_ASM
    else:
        asm: tl.constexpr = E8M0_BF16_ASM
    return tl.inline_asm_elementwise(
        asm=asm, constraints="=r,=r,r", args=[ws], dtype=tl.bfloat16, is_pure=True, pack=4)
