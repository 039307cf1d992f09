"""The prefill gemm1's activation pre-pass: x's rows in sorted order.

Hopper's TMA copies boxes of a tensor and cannot gather rows, so the wgmma
gemm1 (moe_wgmma.py) reads x already gathered into the sort contract's order,
[P, H] bf16: row p holds x[token(p)], quantised and dequantised first in the
MX modes (the formats rule, exact in bf16), zeros for padding rows. Rows at
or past num_valid[0] are not written (gemm1 never reads them).
"""

import triton
import triton.language as tl

from jax_mxfp4_moe.cuda.kernels.mx import BF16, MXFP8, mx_fake_quant
from jax_mxfp4_moe.cuda.kernels.routing import TOKEN_MASK


@triton.jit
def moe_gather(x_ptr, sid_ptr, nv_ptr, out_ptr, T, H, P,
               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, A_FMT: tl.constexpr):
    """out[p, :] = fmt(x[sorted_token_ids[p] & TOKEN_MASK, :]) for p < num_valid[0];
    A_FMT: spec format code (mx.py BF16, MXFP4, MXFP8). H is a multiple of 32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    used = tl.load(nv_ptr)
    if tl.program_id(0) * BLOCK_R < used:
        live = rows < used  # used <= P
        tok = tl.load(sid_ptr + rows, mask=live, other=0) & TOKEN_MASK
        real = live & (tok < T)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < H
        src = x_ptr + tok.to(tl.int64)[:, None] * H + cols[None, :]
        x = tl.load(src, mask=real[:, None] & col_ok[None, :], other=0.0)
        if A_FMT != BF16:
            x = mx_fake_quant(x.to(tl.float32), BLOCK_R, BLOCK_K, A_FMT == MXFP8)
        dst = out_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :]
        tl.store(dst, x.to(tl.bfloat16), mask=live[:, None] & col_ok[None, :])
