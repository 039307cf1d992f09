"""The K loop of the MoE GEMMs: loads of one K step and the MMA on the upcast
weights (triton's dot_scaled, or the register upcast of upcast.py at decode).

SWAP selects the operand order:
  0: A @ W^T, tokens on the MMA's M side (tl.dot_scaled upcasts W): prefill.
  1: W @ A^T, weight rows on the M side, so the token block BM can be 16
     (tl.dot_scaled upcasts W).
  2: as 1, with W upcast by e2m1_even_odd: an elementwise bit-twiddle of the
     packed bytes (no reshuffle of the upcast values through shared memory),
     multiplied against x's even and odd columns in two dots: decode.
"""

import triton
import triton.language as tl

from jax_mxfp4_moe.cuda.kernels.addressing import SCALE_BYTES, VALUE_BYTES, row_offsets, step_offset
from jax_mxfp4_moe.cuda.kernels.mx import BF16, MXFP8, mx_fake_quant
from jax_mxfp4_moe.cuda.kernels.upcast import e2m1_even_odd, e8m0_bf16


@triton.jit
def mx_dot_even_odd(acc, xe, xo, w, ws, FOLD: tl.constexpr):
    """acc += upcast(w, ws) @ [xe | xo] over interleaved K: W as the MMA's A
    operand, its even and odd elements against x's even and odd columns.
    FOLD: the 2**126 of the raw E2M1 bits rides on the scale (one bf16x2
    multiply per pair instead of two)."""
    R: tl.constexpr = w.shape[0]
    C: tl.constexpr = w.shape[1]
    even, odd = e2m1_even_odd(w, FOLD)
    s = e8m0_bf16(ws, FOLD)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (R, C // 16, 16)), (R, C))
    acc = tl.dot(even * s, tl.trans(xe), acc)
    acc = tl.dot(odd * s, tl.trans(xo), acc)
    return acc


@triton.jit
def mx_dot(acc, a, w, ws, SWAP: tl.constexpr):
    """acc += a @ upcast(w, ws)^T, or its transpose when SWAP."""
    if SWAP:
        # Passing acc here trips a shape check in triton 3.9 (it swaps the
        # operands of an e2m1-lhs dot internally): add the product instead.
        acc = acc + tl.dot_scaled(w, ws, "e2m1", tl.trans(a), None, "bf16")
    else:
        acc = tl.dot_scaled(a, None, "bf16", tl.trans(w), ws, "e2m1", acc)
    return acc


@triton.jit
def load_tiles(a_ptr, a_row_off, a_row_ok, w_ptr, ws_ptr, w_row, k0, k_hi, K,
                BK: tl.constexpr, EVEN_K: tl.constexpr, TILED: tl.constexpr):
    """A [BM, BK], packed W [BN, BK/2] and scales [BN, BK/32] of one K step.
    A's rows that are not kept are masked off (at decode most of the block:
    their copies are not issued); every W row is in bounds (the callers
    clamp the ones they do not keep), so W and its scales are masked only
    past k_hi, and not at all when K is a multiple of BK (EVEN_K) or in the
    sm90 layout (TILED: past k_hi they read the tiles' padding, zeros)."""
    kk = k0 + tl.arange(0, BK)
    a_ptrs = a_ptr + a_row_off[:, None] + kk[None, :]
    if EVEN_K:
        a = tl.load(a_ptrs, mask=a_row_ok[:, None], other=0.0)
    else:
        a = tl.load(a_ptrs, mask=a_row_ok[:, None] & (kk < k_hi)[None, :], other=0.0)
    w = load_w(w_ptr, w_row, k0, k_hi, K, BK, EVEN_K, TILED)
    ks = tl.arange(0, BK // 32)
    s_ptrs = (ws_ptr + row_offsets(w_row, K, SCALE_BYTES, TILED)[:, None] + step_offset(k0, BK, SCALE_BYTES, TILED)
              + ks[None, :])
    if EVEN_K or TILED:
        ws = tl.load(s_ptrs)
    else:
        ws = tl.load(s_ptrs, mask=(k0 // 32 + ks < k_hi // 32)[None, :], other=0)
    return a, w, ws


@triton.jit
def load_w(w_ptr, w_row, k0, k_hi, K, BK: tl.constexpr, EVEN_K: tl.constexpr,
            TILED: tl.constexpr):
    """Packed W [BN, BK/2] of one K step (zeros past k_hi: TILED, the
    padding; else masked, with k_hi/2 written (k_hi/32)*16)."""
    kp = tl.arange(0, BK // 2)
    w_ptrs = (w_ptr + row_offsets(w_row, K, VALUE_BYTES, TILED)[:, None] + step_offset(k0, BK, VALUE_BYTES, TILED)
              + kp[None, :])
    if EVEN_K or TILED:
        return tl.load(w_ptrs)
    else:
        return tl.load(w_ptrs, mask=(k0 // 2 + kp < k_hi // 32 * 16)[None, :], other=0)


@triton.jit
def gemm_loop(a_ptr, a_row_off, a_row_ok, w_ptr, ws_ptr, w_row, k_lo, k_hi, K,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               A_FMT: tl.constexpr, SWAP: tl.constexpr, FOLD: tl.constexpr,
               EVEN_K: tl.constexpr, TILED: tl.constexpr):
    """Sum over k in [k_lo, k_hi) of A[rows, k] * W[w_row, k] -> [BM, BN]
    (rows of A not a_row_ok read as 0); every W row must be in bounds (the
    caller clamps the ones it does not keep and discards their sums).

    A plain loop, so that triton's pipeliner (num_stages) turns the loads into
    cp.async copies several steps ahead; it can only because every pointer
    and K are compiled as 16-byte aligned (cuda_kernels)."""
    if SWAP:
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        a, w, ws = load_tiles(a_ptr, a_row_off, a_row_ok, w_ptr, ws_ptr, w_row, k0, k_hi, K, BK,
                               EVEN_K, TILED)
        if A_FMT == BF16:
            a = a.to(tl.bfloat16)
        else:
            a = mx_fake_quant(a.to(tl.float32), BM, BK, A_FMT == MXFP8).to(tl.bfloat16)
        if SWAP == 2:
            xe, xo = tl.split(tl.reshape(a, (BM, BK // 2, 2)))
            acc = mx_dot_even_odd(acc, xe, xo, w, ws, FOLD)
        else:
            acc = mx_dot(acc, a, w, ws, SWAP)
    if SWAP:
        acc = tl.trans(acc)
    return acc
