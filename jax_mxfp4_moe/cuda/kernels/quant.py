"""Activation quantisation to MXFP4 / MXFP8 bytes (formats' rule, bit-exact)."""

import triton
import triton.language as tl

from jax_mxfp4_moe.cuda.kernels.mx import apply_inverse_scale, clip_fp8, e2m1_code, e8m0_scale, mx_fake_quant


@triton.jit
def moe_quant(x_ptr, q_ptr, s_ptr, n_rows, K,
              BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr):
    """x [n_rows, K] -> q (fp4 packed [n_rows, K/2] or e4m3 [n_rows, K]) and
    scale bytes [n_rows, K/32]. K is a multiple of 32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    ok = row_ok[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    xb = tl.reshape(x, (BLOCK_R, BLOCK_K // 32, 32))
    amax = tl.max(tl.abs(xb), axis=2)
    has_nan = tl.max((xb != xb).to(tl.int32), axis=2)
    amax = tl.where(has_nan != 0, float("nan"), amax)
    byte = e8m0_scale(amax, FP8)
    y = tl.reshape(apply_inverse_scale(xb, byte), (BLOCK_R, BLOCK_K))
    if FP8:
        q = clip_fp8(y).to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
        tl.store(q_ptr + rows[:, None] * K + cols[None, :], q, mask=ok)
    else:
        sign = (y.to(tl.int32, bitcast=True) >> 31) & 1
        is_nan = y != y
        # NaN encodes as a zero with the opposite sign bit (ml_dtypes).
        code = tl.where(is_nan, (1 - sign) << 3, e2m1_code(tl.abs(y)) | (sign << 3))
        lo, hi = tl.split(tl.reshape(code, (BLOCK_R, BLOCK_K // 2, 2)))
        packed = (lo | (hi << 4)).to(tl.uint8)
        pcols = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        pok = row_ok[:, None] & (pcols < K // 2)[None, :]
        tl.store(q_ptr + rows[:, None] * (K // 2) + pcols[None, :], packed, mask=pok)
    scols = tl.program_id(1) * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    sok = row_ok[:, None] & (scols < K // 32)[None, :]
    tl.store(s_ptr + rows[:, None] * (K // 32) + scols[None, :], byte.to(tl.uint8), mask=sok)


@triton.jit
def moe_quant_dequant(x_ptr, y_ptr, n_rows, K,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr):
    """y = the values x [n_rows, K] takes in MXFP4/MXFP8, as bf16 (exact: an
    fp4/fp8 element times a power of two fits bf16)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rows < n_rows)[:, None] & (cols < K)[None, :]
    offs = rows[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, mx_fake_quant(x, BLOCK_R, BLOCK_K, FP8).to(tl.bfloat16), mask=ok)
