"""The inline PTX of the CUDA decode upcast (cuda/kernels/upcast.py),
executed on CPU by a small interpreter of the instructions it uses, against
ml_dtypes' E2M1 and the E8M0 definition: every byte value, every position in
the packed word. The GPU tests run the same text on an H100; this catches an
edited shift, mask or selector without one.

Packing follows tl.inline_asm_elementwise(pack=4): four uint8 elements in one
32-bit operand (element i in byte i), and per bf16 output two 32-bit results,
element 2j in the low half of the j-th.
"""

import re

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("triton", reason="triton not installed")

from jax_mxfp4_moe.cuda.compile import KERNEL_PACKAGE  # noqa: E402

upcast = pytest.importorskip(f"{KERNEL_PACKAGE}.upcast")

MASK32 = 0xFFFFFFFF


def _bf16x2_mul(a: int, b: int) -> int:
    halves = np.array([a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16], np.uint16).view(ml_dtypes.bfloat16)
    prod = (halves[:2].astype(np.float64) * halves[2:].astype(np.float64)).astype(ml_dtypes.bfloat16)
    lo, hi = prod.view(np.uint16).astype(np.uint32)
    return int(lo | (hi << 16))


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = src[s & 7]
        if s & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def run_ptx(asm: str, inputs: dict) -> dict:
    """Executes `asm` (the subset of PTX the kernels use) on 32-bit values;
    `inputs` maps "$n" to ints. Returns every register written."""
    regs = dict(inputs)

    def val(tok):
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", tok):
            return int(tok, 0)
        raise KeyError(f"read of unset register or bad operand {tok!r}")

    body = re.sub(r"//[^\n]*", "", asm).replace("{", "").replace("}", "")
    for stmt in filter(None, (s.strip() for s in body.split(";"))):
        op, _, rest = stmt.partition(" ")
        if op == ".reg":
            continue
        ops = [t.strip() for t in rest.split(",")]
        d, args = ops[0], ops[1:]
        if op == "mov.b32":
            regs[d] = val(args[0])
        elif op == "prmt.b32":
            regs[d] = _prmt(val(args[0]), val(args[1]), val(args[2]))
        elif op == "shl.b32":
            regs[d] = (val(args[0]) << val(args[1])) & MASK32
        elif op == "add.u32":
            regs[d] = (val(args[0]) + val(args[1])) & MASK32
        elif op == "and.b32":
            regs[d] = val(args[0]) & val(args[1])
        elif op == "or.b32":
            regs[d] = val(args[0]) | val(args[1])
        elif op == "mul.rn.bf16x2":
            regs[d] = _bf16x2_mul(val(args[0]), val(args[1]))
        else:
            raise NotImplementedError(f"instruction {op!r} in: {stmt}")
    return regs


def _bf16_pair(word: int) -> np.ndarray:
    return np.array([word & 0xFFFF, word >> 16], np.uint16).view(ml_dtypes.bfloat16)


def _words():
    """Words whose bytes take every value in every position, plus random ones."""
    b = np.arange(256, dtype=np.uint32)
    rolled = [b | ((b + 85) % 256) << 8 | ((b + 170) % 256) << 16 | ((b + 255) % 256) << 24]
    rng = np.random.default_rng(0)
    return np.concatenate(rolled + [rng.integers(0, 2**32, 512, dtype=np.uint32)])


def _e2m1(codes) -> np.ndarray:
    return np.asarray(codes, np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)


def test_e2m1_even_odd_ptx_is_exact_for_every_byte():
    asm = upcast.E2M1_EVEN_ODD_ASM.value
    for word in _words():
        word = int(word)
        r = run_ptx(asm, {"$4": word})
        data = [(word >> (8 * i)) & 0xFF for i in range(4)]
        even = np.concatenate([_bf16_pair(r["$0"]), _bf16_pair(r["$1"])]).astype(np.float64)
        odd = np.concatenate([_bf16_pair(r["$2"]), _bf16_pair(r["$3"])]).astype(np.float64)
        want_even = _e2m1([d & 0xF for d in data])
        want_odd = _e2m1([d >> 4 for d in data])
        np.testing.assert_array_equal(even, want_even, err_msg=f"word {word:#010x}")
        np.testing.assert_array_equal(odd, want_odd, err_msg=f"word {word:#010x}")
        # E2M1 -0 (code 8) stays -0: the sign bit is carried, not recomputed
        np.testing.assert_array_equal(np.signbit(even), np.signbit(want_even))
        np.testing.assert_array_equal(np.signbit(odd), np.signbit(want_odd))


def test_e8m0_bf16_ptx_gives_the_power_of_two_and_documented_edges():
    asm = upcast.E8M0_BF16_ASM.value
    for word in _words():
        word = int(word)
        r = run_ptx(asm, {"$2": word})
        got = np.concatenate([_bf16_pair(r["$0"]), _bf16_pair(r["$1"])]).astype(np.float64)
        for byte, g in zip(((word >> (8 * i)) & 0xFF for i in range(4)), got):
            if byte == 255:
                assert g == np.inf  # documented: NaN scale -> +inf
            elif byte == 0:
                assert g == 0.0  # documented: 2**-127 flushed to 0
            else:
                assert g == 2.0 ** (byte - 127), byte


def _even_odd(asm, word):
    r = run_ptx(asm, {"$4": word})
    return (np.concatenate([_bf16_pair(r["$0"]), _bf16_pair(r["$1"])]),
            np.concatenate([_bf16_pair(r["$2"]), _bf16_pair(r["$3"])]))


def test_folded_scale_times_raw_bits_is_the_mx_value():
    """FOLD: the raw E2M1 bits (value * 2**-126, no bias multiply) times the
    folded scale (2**(byte - 1)) in one bf16 multiply give value * 2**(byte -
    127) exactly, for every code and every byte <= FOLD_MAX_SCALE_BYTE (0 included)."""
    from jax_mxfp4_moe.cuda.config import FOLD_MAX_SCALE_BYTE
    raw_asm, fold_asm = upcast.E2M1_EVEN_ODD_RAW_ASM.value, upcast.E8M0_BF16_FOLD_ASM.value
    codes = np.arange(256, dtype=np.uint32)  # byte j of word w: even code j & 15, odd j >> 4
    raw = {}
    for w in range(64):
        even, odd = _even_odd(raw_asm, int(codes[4 * w] | codes[4 * w + 1] << 8
                                           | codes[4 * w + 2] << 16 | codes[4 * w + 3] << 24))
        for i in range(4):
            raw[4 * w + i] = (even[i], odd[i])
    for j, (e, o) in raw.items():  # the raw values themselves, subnormal 0.5 included
        assert float(e) == _e2m1([j & 15])[0] * 2.0 ** -126, j
        assert float(o) == _e2m1([j >> 4])[0] * 2.0 ** -126, j
    for byte in range(FOLD_MAX_SCALE_BYTE + 1):
        r = run_ptx(fold_asm, {"$2": byte * 0x01010101})
        scales = np.concatenate([_bf16_pair(r["$0"]), _bf16_pair(r["$1"])])
        assert all(float(v) == 2.0 ** (byte - 1) for v in scales), byte
        s = scales[0]
        for j, (e, o) in raw.items():
            for got, code in ((e * s, j & 15), (o * s, j >> 4)):  # a bf16 multiply, as the kernel's
                want = _e2m1([code])[0] * 2.0 ** (byte - 127)
                assert float(got) == want and np.signbit(got) == np.signbit(want), (byte, code)


def test_interpreter_rejects_what_it_does_not_know():
    with pytest.raises(NotImplementedError):
        run_ptx("{ sub.u32 $0, $1, 1; }", {"$1": 0})
    with pytest.raises(KeyError):
        run_ptx("{ or.b32 $0, t, 1; }", {})
    # prmt's sign-replicate mode and byte order, by hand
    assert _prmt(0x80402010, 0, 0x3210) == 0x80402010
    assert _prmt(0x80402010, 0, 0x000B) == 0x101010FF
    assert _prmt(0x11223344, 0x55667788, 0x4140) == 0x88338844


def test_wgmma_producer_upcast_ptx_gives_every_element_in_order_times_the_scale():
    """The Gluon prefill producer's upcast (moe_wgmma.E2M1_PAIRS_ASM): one
    word of 8 E2M1 codes and the folded scale 2**(byte - 1) as a bf16 pair ->
    4 bf16x2 words holding elements 0..7 in K order, each the E2M1 value times
    2**(byte - 127), exactly (signs of zero kept), for every code in every
    position and every scale byte the fold admits."""
    from jax_mxfp4_moe.cuda.config import FOLD_MAX_SCALE_BYTE
    wgmma = pytest.importorskip(f"{KERNEL_PACKAGE}.moe_wgmma")
    asm = wgmma.E2M1_PAIRS_ASM.value
    words = _words()
    for byte in (0, 1, 60, 126, 127, FOLD_MAX_SCALE_BYTE):
        scale = np.array([2.0 ** (byte - 1)], ml_dtypes.bfloat16).view(np.uint16)[0]
        pair = int(scale) | int(scale) << 16
        for word in words:
            word = int(word)
            r = run_ptx(asm, {"$4": word, "$5": pair, "$6": pair})
            got = np.concatenate([_bf16_pair(r[f"${j}"]) for j in range(4)]).astype(np.float64)
            codes = [(word >> (4 * i)) & 0xF for i in range(8)]  # element 2i: low nibble of byte i
            want = _e2m1(codes) * 2.0 ** (byte - 127)
            np.testing.assert_array_equal(got, want, err_msg=f"word {word:#010x} byte {byte}")
            np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
