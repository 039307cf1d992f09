"""MoE expert GEMMs over sorted rows, MXFP4 weights upcast in-kernel.

Both kernels walk BM-row blocks of the sort contract (docs/DESIGN.md §3): program
(n, m[, k]) handles rows [m*BM, (m+1)*BM) of the sorted order, whose expert is
sorted_expert_ids[m]; blocks at or past num_valid[0] return at once.
DIRECT (decode: at most NMAX (token, slot) entries) skips the sort: every
program derives its block from topk_ids itself (direct_rows), the same
blocks the contract would give; the sid/sw pointers then hold topk_ids and
topk_weights, flat. moe_decode runs both gemms of such a layer in one launch.
Weights are MXFP4 [E, N, K/2] (element 2i in the low nibble) with E8M0 scales
[E, N, K/32], upcast to bf16 in-kernel for the tensor cores.

Activation formats (A_FMT / OUT_FMT) are spec's codes (mx.py: BF16, MXFP4, MXFP8). The MX
modes quantise with the formats rule and keep the exact dequantised values in
bf16 (Hopper has no fp4 tensor-core op, so the dot runs on bf16 either way).

The operand orders (SWAP) are gemm_loop.py's.
"""

import triton
import triton.language as tl

from jax_mxfp4_moe import spec
from jax_mxfp4_moe.cuda.kernels.addressing import SCALE_BYTES, VALUE_BYTES, expert_bytes
from jax_mxfp4_moe.cuda.kernels.gemm_loop import gemm_loop
from jax_mxfp4_moe.cuda.kernels.mx import BF16, MXFP8, mx_fake_quant
from jax_mxfp4_moe.cuda.kernels.routing import route

# The kernels' activation codes (spec.ACTIVATION_KINDS): 0 silu, 1 swiglu_oai.
SILU: tl.constexpr = tl.constexpr(spec.ACTIVATION_KINDS["silu"].code)


# ---------------------------------------------------------------------------
# gemm1: x @ W1^T + b1, activation, re-quantisation
# ---------------------------------------------------------------------------

@triton.jit
def gemm1_tile(x_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, count_ptr,
                rows, entry, tok, row_ok, expert, pid_n, pid_s, H, I, swiglu_alpha, swiglu_limit,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                A_FMT: tl.constexpr, OUT_FMT: tl.constexpr, ACT: tl.constexpr,
                INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr,
                SPLIT_K: tl.constexpr, FOLD: tl.constexpr, EVEN_K: tl.constexpr,
                TILED: tl.constexpr, CLEAN: tl.constexpr, SLICE_STEPS: tl.constexpr):
    """out[r, n] = act(x[tok(r)] @ W1[e, (gate|up)(n)]^T + b1) for the BN
    columns n of tile pid_n, H-slice pid_s (SLICE_STEPS K steps each but the
    last, which takes the rest; 0: slices as equal as K allows). SPLIT_K > 1: the slice is added
    into part [T*k, 2I] f32 at each row's entry (token * k + slot: the routed
    entries, fewer than the block rows at decode) and the last of the tile's SPLIT_K programs to
    arrive (count_ptr, the tile's int32 counter) applies the epilogue; part
    and the counters start at 0, and CLEAN: that program leaves them at 0
    again (a workspace, ffi.Workspace). Returns whether this program stored
    the tile."""
    e = expert.to(tl.int64)
    entry = tl.where(row_ok, entry, 0)  # padding rows' sentinel tokens index nothing
    # Accumulator column j holds gate (j even) or up (j odd) of n = n0 + j // 2.
    j = tl.arange(0, 2 * BN)
    n = pid_n * BN + j // 2
    w_row_ok = n < I
    n = tl.minimum(n, I - 1)  # columns past I read the last one (discarded)
    up = j % 2
    if INTERLEAVED:
        w_row = 2 * n + up
    else:
        w_row = n + up * I
    if SLICE_STEPS > 0:
        k_len = SLICE_STEPS * BK
    else:
        k_len = tl.cdiv(tl.cdiv(H, BK), SPLIT_K) * BK
    k_lo = pid_s * k_len
    w_ptr += e * expert_bytes(2 * I, H, VALUE_BYTES, TILED)
    ws_ptr += e * expert_bytes(2 * I, H, SCALE_BYTES, TILED)
    acc = gemm_loop(x_ptr, tok * H, row_ok, w_ptr, ws_ptr, w_row, k_lo,
                     tl.minimum(k_lo + k_len, H), H, BM, 2 * BN, BK, A_FMT, SWAP, FOLD, EVEN_K,
                     TILED)
    last = True
    if SPLIT_K > 1:
        part = part_ptr + entry[:, None] * (2 * I) + (pid_n * 2 * BN + j)[None, :]
        ok = row_ok[:, None] & w_row_ok[None, :]
        tl.atomic_add(part, acc, mask=ok, sem="relaxed")
        # Every thread's partial sums are in before the tile's counter moves
        # (release); the last program reads them all back (acquire).
        tl.debug_barrier()
        last = tl.atomic_add(count_ptr, 1, sem="acq_rel") == SPLIT_K - 1
    if last:
        if SPLIT_K > 1:
            acc = tl.load(part, mask=ok, other=0.0, cache_modifier=".cg")
            if CLEAN:
                tl.debug_barrier()  # every thread has read its sums
                tl.store(part, tl.zeros_like(acc), mask=ok)
                tl.store(count_ptr, 0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + e * (2 * I) + w_row, mask=w_row_ok, other=0.0)[None, :]
        g, u = tl.split(tl.reshape(acc, (BM, BN, 2)))
        if ACT == SILU:
            h = g / (1.0 + tl.exp(-g)) * u
        else:
            # where() rather than min/clamp so that NaN propagates.
            g = tl.where(g > swiglu_limit, swiglu_limit, g)
            u = tl.where(u > swiglu_limit, swiglu_limit, u)
            u = tl.where(u < -swiglu_limit, -swiglu_limit, u)
            h = g / (1.0 + tl.exp(-swiglu_alpha * g)) * (u + 1.0)
        if OUT_FMT != BF16:
            h = mx_fake_quant(h, BM, BN, OUT_FMT == MXFP8)
        cols = pid_n * BN + tl.arange(0, BN)
        tl.store(out_ptr + rows[:, None] * I + cols[None, :], h.to(tl.bfloat16),
                 mask=row_ok[:, None] & (cols < I)[None, :])
    return last


@triton.jit
def moe_gemm1(x_ptr, w_ptr, ws_ptr, b_ptr, sid_ptr, sexp_ptr, nv_ptr, out_ptr, part_ptr,
              T, H, I, E, TOPK, swiglu_alpha, swiglu_limit,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              A_FMT: tl.constexpr, OUT_FMT: tl.constexpr, ACT: tl.constexpr,
              INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
              SWAP: tl.constexpr, SPLIT_K: tl.constexpr, FOLD: tl.constexpr,
              EVEN_K: tl.constexpr, DIRECT: tl.constexpr, NMAX: tl.constexpr,
              TILED: tl.constexpr):
    """gemm1 of the sorted rows (gemm1_tile), program (n, m, s) = column tile,
    row block, H-slice; ACT 0 = silu, 1 = swiglu_oai; out is [P, I] bf16.
    SPLIT_K > 1: part holds [T*TOPK, 2I] f32 partial sums, then one int32
    counter per tile (all zeroed by the caller)."""
    m = tl.program_id(1)
    rows, tok, slot, row_ok, expert, _, active = route(sid_ptr, sid_ptr, sexp_ptr, nv_ptr, T,
                                                        TOPK, E, m, BM, NMAX, DIRECT, False)
    if active:
        tile = m * tl.num_programs(0) + tl.program_id(0)
        count_ptr = (part_ptr + T * TOPK * 2 * I).to(tl.pointer_type(tl.int32)) + tile
        gemm1_tile(x_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, count_ptr, rows,
                    tok * TOPK + slot, tok, row_ok, expert, tl.program_id(0), tl.program_id(2),
                    H, I, swiglu_alpha, swiglu_limit, BM, BN, BK, A_FMT, OUT_FMT, ACT,
                    INTERLEAVED, HAS_BIAS, SWAP, SPLIT_K, FOLD, EVEN_K, TILED, False, 0)


# ---------------------------------------------------------------------------
# gemm2: inter @ W2^T + b2, times the routing weight, into y[token]
# ---------------------------------------------------------------------------

@triton.jit
def gemm2_tile(inter_ptr, w_ptr, ws_ptr, b_ptr, rows, row_ok, expert, wgt, pid_n, pid_s, H, I,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr,
                FOLD: tl.constexpr, EVEN_K: tl.constexpr, TILED: tl.constexpr):
    """wgt(r) * (inter[r] @ W2[e, n]^T [+ b2[e, n] in slice 0]) over I-slice
    pid_s, for the BN columns n of tile pid_n -> (acc [BM, BN], cols, col_ok)."""
    e = expert.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < H
    k_len = tl.cdiv(tl.cdiv(I, BK), SPLIT_K) * BK
    k_lo = pid_s * k_len
    # Columns past H read row H - 1 of W2 (discarded).
    w_ptr += e * expert_bytes(H, I, VALUE_BYTES, TILED)
    ws_ptr += e * expert_bytes(H, I, SCALE_BYTES, TILED)
    acc = gemm_loop(inter_ptr, rows * I, row_ok, w_ptr, ws_ptr, tl.minimum(cols, H - 1), k_lo,
                     tl.minimum(k_lo + k_len, I), I, BM, BN, BK, 0, SWAP, FOLD, EVEN_K, TILED)
    if HAS_BIAS:
        if pid_s == 0:
            acc += tl.load(b_ptr + e * H + cols, mask=col_ok, other=0.0)[None, :]
    return acc * wgt[:, None], cols, col_ok


@triton.jit
def moe_gemm2(inter_ptr, w_ptr, ws_ptr, b_ptr, sid_ptr, sw_ptr, sexp_ptr, nv_ptr, y_ptr,
              T, H, I, E, TOPK,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
              DETERMINISTIC: tl.constexpr, SWAP: tl.constexpr, FOLD: tl.constexpr,
              EVEN_K: tl.constexpr, DIRECT: tl.constexpr, NMAX: tl.constexpr,
              TILED: tl.constexpr):
    """gemm2 of the sorted rows (gemm2_tile), program (n, m, s), added into y
    [T, H] f32 with atomics, or (DETERMINISTIC, SPLIT_K == 1) stored into
    y [T, TOPK, H] f32 at (token, slot)."""
    m = tl.program_id(1)
    rows, tok, slot, row_ok, expert, wgt, active = route(sid_ptr, sw_ptr, sexp_ptr, nv_ptr, T,
                                                          TOPK, E, m, BM, NMAX, DIRECT, True)
    if active:
        acc, cols, col_ok = gemm2_tile(inter_ptr, w_ptr, ws_ptr, b_ptr, rows, row_ok, expert,
                                        wgt, tl.program_id(0), tl.program_id(2), H, I, BM, BN,
                                        BK, SPLIT_K, HAS_BIAS, SWAP, FOLD, EVEN_K, TILED)
        ok = row_ok[:, None] & col_ok[None, :]
        if DETERMINISTIC:
            tl.store(y_ptr + (tok * TOPK + slot)[:, None] * H + cols[None, :], acc, mask=ok)
        else:
            tl.atomic_add(y_ptr + tok[:, None] * H + cols[None, :], acc, mask=ok, sem="relaxed")
