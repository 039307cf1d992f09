"""Grouped matmuls through MXFP4 expert weights (the layer's derivative,
layer/autodiff.py gmm_p), in Triton: any block height, either weight layout.

Rows come in blocks of BM; block m goes through expert block_expert[m]
(-1: its rows come out 0). For one expert's matrix W [N, K] (MXFP4, E8M0
scales along K):
  forward    (TRANSPOSE False): out[r] = lhs[r] @ W^T, lhs [P, K], out [P, N];
  transposed (TRANSPOSE True):  out[r] = lhs[r] @ W,   lhs [P, N], out [P, K].
Operands go to the tensor cores as bf16 (the upcast with its scale is exact),
sums are f32, and the output is f32. Program (n, m) computes output columns
[n * BN, (n + 1) * BN) of row block m (grids are (n_tiles, row_blocks, 1)).

The forward orientation is the layer's gemm loop (gemm_loop.py, tokens on
the MMA's M side, triton's dot_scaled). The transposed one contracts over
W's rows, so the scales lie along the output axis, where dot_scaled cannot
take them: each K step's W tile [BK rows, BN columns] is upcast in registers
(upcast.py: even and odd elements of each packed byte, each times its own
block's scale) and multiplied in two dots, into the even and odd output
columns. The Gluon kernels (moe_gmm_wgmma.py) serve the large blocks.
"""

import triton
import triton.language as tl

from jax_mxfp4_moe.cuda.kernels.addressing import SCALE_BYTES, VALUE_BYTES, expert_bytes, row_offsets, step_offset
from jax_mxfp4_moe.cuda.kernels.gemm_loop import gemm_loop
from jax_mxfp4_moe.cuda.kernels.mx import BF16
from jax_mxfp4_moe.cuda.kernels.upcast import e2m1_even_odd, e8m0_bf16


@triton.jit
def mx_dot_columns(acc_even, acc_odd, a, w, ws, FOLD: tl.constexpr):
    """acc_even += a @ W[:, even columns], acc_odd += a @ W[:, odd columns]
    for a [BM, BK] bf16 and W [BK, 2C] as packed E2M1 w [BK, C] (column 2i in
    the low nibble of byte i) with one E8M0 scale byte per 32 columns ws
    [BK, C / 16]: each element times its own block's scale (exact)."""
    R: tl.constexpr = w.shape[0]
    C: tl.constexpr = w.shape[1]
    even, odd = e2m1_even_odd(w, FOLD)
    s = e8m0_bf16(ws, FOLD)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (R, C // 16, 16)), (R, C))
    acc_even = tl.dot(a, even * s, acc_even)
    acc_odd = tl.dot(a, odd * s, acc_odd)
    return acc_even, acc_odd


@triton.jit
def _transposed_tile(a_ptr, rows, w_ptr, ws_ptr, pid_n, N_W, K_W, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, FOLD: tl.constexpr,
                     TILED: tl.constexpr):
    """[BM, BN]: rows of lhs [P, N_W] times W[:, pid_n * BN + (0..BN)] of one
    expert (w_ptr, ws_ptr at its values and scales), over all N_W rows of W,
    BK at a time. Rows past N_W are clamped (lhs reads 0 there); columns
    past K_W read the sm90 tiles' padding or, canonical, are masked off."""
    C: tl.constexpr = BN // 2
    k0 = pid_n * BN
    kp = tl.arange(0, C)
    ks = tl.arange(0, BN // 32)
    col_ok = k0 + 2 * kp < K_W
    blk_ok = k0 + 32 * ks < K_W
    acc_even = tl.zeros((BM, C), tl.float32)
    acc_odd = tl.zeros((BM, C), tl.float32)
    a_rows = rows.to(tl.int64) * N_W
    for n0 in range(0, N_W, BK):
        nn = n0 + tl.arange(0, BK)
        n_ok = nn < N_W
        a = tl.load(a_ptr + a_rows[:, None] + nn[None, :], mask=n_ok[None, :], other=0.0)
        w_row = tl.minimum(nn, N_W - 1)
        w_ptrs = (w_ptr + row_offsets(w_row, K_W, VALUE_BYTES, TILED)[:, None]
                  + step_offset(k0, BN, VALUE_BYTES, TILED) + kp[None, :])
        s_ptrs = (ws_ptr + row_offsets(w_row, K_W, SCALE_BYTES, TILED)[:, None]
                  + step_offset(k0, BN, SCALE_BYTES, TILED) + ks[None, :])
        if TILED:
            w = tl.load(w_ptrs)
            ws = tl.load(s_ptrs)
        else:
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0)
            ws = tl.load(s_ptrs, mask=blk_ok[None, :], other=0)
        acc_even, acc_odd = mx_dot_columns(acc_even, acc_odd, a.to(tl.bfloat16), w, ws, FOLD)
    return tl.reshape(tl.join(acc_even, acc_odd), (BM, BN))


@triton.jit
def moe_gmm(a_ptr, be_ptr, w_ptr, ws_ptr, out_ptr, N_W, K_W,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TRANSPOSE: tl.constexpr,
            FOLD: tl.constexpr, EVEN_K: tl.constexpr, TILED: tl.constexpr):
    """out [P, NO] f32, block m's rows through expert be[m] (module docstring);
    lhs a [P, KC] bf16; W's values and scales in the canonical layout or
    the sm90 one (TILED). NO, KC: N_W, K_W forward; K_W, N_W transposed.
    EVEN_K (forward): K_W is a multiple of BK (no masks in the K loop)."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    e = tl.load(be_ptr + m)
    rows = m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    if TRANSPOSE:
        NO = K_W
    else:
        NO = N_W
    acc = tl.zeros((BM, BN), tl.float32)
    if e >= 0:
        w_ptr += e.to(tl.int64) * expert_bytes(N_W, K_W, VALUE_BYTES, TILED)
        ws_ptr += e.to(tl.int64) * expert_bytes(N_W, K_W, SCALE_BYTES, TILED)
        if TRANSPOSE:
            acc = _transposed_tile(a_ptr, rows, w_ptr, ws_ptr, pid_n, N_W, K_W, BM, BN, BK,
                                   FOLD, TILED)
        else:
            acc = gemm_loop(a_ptr, rows.to(tl.int64) * K_W, rows >= 0, w_ptr, ws_ptr,
                            tl.minimum(cols, N_W - 1), 0, K_W, K_W, BM, BN, BK, BF16, 0, FOLD,
                            EVEN_K, TILED)
    out = out_ptr + rows.to(tl.int64)[:, None] * NO + cols[None, :]
    tl.store(out, acc, mask=(cols < NO)[None, :])
